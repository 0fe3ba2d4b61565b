"""DoRA, LoKr and LoHa tensors in files: the LyCORIS names ComfyUI's
``comfy/weight_adapter`` reads under ``diffusion_model.``, their shapes, rank
and alpha, and the weight each one adds (``delta``: what a ComfyUI merge
computes, and what peft computed while training).

Per module (``diffusion_model.blocks.0.self_attn.q`` + ``.``):

=======  ==========================================================  ===================================
type     tensors                                                     weight after merging (scale s)
=======  ==========================================================  ===================================
lora     ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r),       W + s * B @ A,  s = alpha / r
         ``alpha``
dora     lora's, + ``dora_scale`` (out, 1)                            dora_scale * V / ||V||_row,
                                                                     V = W + s * B @ A
lokr     ``lokr_w1`` (a, c), ``lokr_w2`` (b, d) -- or ``lokr_w2_a``   W + s * kron(w1, w2),
         (b, r) + ``lokr_w2_b`` (r, d) --, ``alpha``                  s = alpha / r (w2 factored),
                                                                     1 (w2 full: no alpha written)
loha     ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in),               W + s * (w1a @ w1b) * (w2a @ w2b),
         ``hada_w2_a``, ``hada_w2_b``, ``alpha``                      s = alpha / r
=======  ==========================================================  ===================================

DoRA's magnitude is written as DoRA defines it (peft, LyCORIS with
``wd_on_out``): V is normalised by its own row norms. ComfyUI releases up to
at least v0.3.77 divide by the rows of W instead of V on this axis (open
pull request Comfy-Org/ComfyUI#15458); the difference is the ratio
||W + dW|| / ||W|| per row, small for a LoRA-sized dW (docs/adapters.md).
"""

from __future__ import annotations

from typing import Mapping

import torch

#: LyCORIS tensor names read and written (``lokr_t2`` / ``hada_t*``: convolution factors, read to be refused)
PARTS = ("dora_scale", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
         "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def type_of(parts: Mapping[str, torch.Tensor]) -> str:
    """The adapter type of one module's tensors (``A``/``B``/``alpha`` and LyCORIS names)."""
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    if any(p.startswith("hada_") for p in parts):
        return "loha"
    return "dora" if "dora_scale" in parts else "lora"


def rank_of(kind: str, parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank alpha is divided by (as ComfyUI takes it); None for a LoKr
    whose factors are both full matrices (no rank, scale 1)."""
    if kind in ("lora", "dora"):
        return int(parts["A"].shape[0])
    if kind == "loha":
        return int(parts["hada_w1_b"].shape[0])
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in parts:
            return int(parts[key].shape[0])
    return None


def shape_problem(kind: str, parts: Mapping[str, torch.Tensor]) -> str | None:
    """What makes one LoKr / LoHa module unusable, or None (LoRA's own checks are the caller's)."""
    if any(p in parts for p in ("lokr_t2", "hada_t1", "hada_t2")):
        return "holds Tucker (convolution) factors; Wan's targeted layers are linear"
    if kind == "loha":
        missing = [p for p in LOHA if p not in parts]
        if missing:
            return f"lacks {missing[0]}"
        (w1a, w1b, w2a, w2b) = (parts[p] for p in LOHA)
        if any(t.ndim != 2 for t in (w1a, w1b, w2a, w2b)):
            return "hada_* tensors must be matrices"
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0] or w1a.shape[0] != w2a.shape[0] \
                or w1b.shape[1] != w2b.shape[1]:
            return (f"hada shapes do not fit together ({list(w1a.shape)}, {list(w1b.shape)}, "
                    f"{list(w2a.shape)}, {list(w2b.shape)})")
        return None
    for side in ("1", "2"):
        full, a, b = f"lokr_w{side}", f"lokr_w{side}_a", f"lokr_w{side}_b"
        if full not in parts and not (a in parts and b in parts):
            return f"lacks {full} (or {a} and {b})"
        if full not in parts and parts[a].shape[1] != parts[b].shape[0]:
            return f"{a} has rank {parts[a].shape[1]} but {b} has rank {parts[b].shape[0]}"
    return None


def scale(kind: str, parts: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    """The multiplier of the weight delta ComfyUI applies (alpha None: not in the file)."""
    rank = rank_of(kind, parts)
    return 1.0 if alpha is None or rank is None else alpha / rank


# ---------------------------------------------------------------- kernel names <-> file names

#: kernel (peft) part -> file part, for the parts whose names differ
KERNEL_TO_FILE = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector.weight": "dora_scale"}
FILE_TO_KERNEL = {v: k for k, v in KERNEL_TO_FILE.items()}


def to_file_part(part: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A kernel part and tensor -> the file's (DoRA's magnitude becomes a column, as ComfyUI broadcasts it)."""
    name = KERNEL_TO_FILE.get(part, part)
    return name, tensor.reshape(-1, 1) if name == "dora_scale" else tensor


def to_kernel_part(part: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The inverse of :func:`to_file_part`."""
    name = FILE_TO_KERNEL.get(part, part)
    return name, tensor.reshape(-1) if part == "dora_scale" else tensor
