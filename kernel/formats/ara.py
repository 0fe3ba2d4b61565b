"""Accuracy-recovery adapter (ARA) files: LoRA-layout tensors for any linear
layer of an expert (blocks and the layers outside them), read into
``{diffusers layer name: (down, up, scale)}`` and written back.

Key names share :func:`wantrain.formats.lora.module_name` with the LoRA
reader: ComfyUI / original Wan names or diffusers names, under
``diffusion_model.`` / ``transformer.`` / ``base_model.model.`` / ``model.``
or none; ``lora_A``/``lora_B`` (PEFT's ``lora_A.default`` too) or
``lora_down``/``lora_up``; kohya-style flattened names
(``lora_transformer_transformer_1_blocks_0_attn1_to_q``); an optional
``.alpha`` (scale = alpha / rank, else 1 -- ai-toolkit writes none, its ARA
runs at alpha = rank). A file whose names carry ``transformer_1.`` /
``transformer_2.`` (ai-toolkit's DualWanTransformer3DModel: ``transformer_1``
is the high-noise expert, ``transformer_2`` the low-noise one) holds both
experts: each expert reads its half. Every form ai-toolkit writes the
published ``wan22_14b_t2i_torchao_uint4`` adapter in:
``diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A.weight`` (its
ComfyUI-side save), ``transformer.transformer_1.blocks.0.attn1.to_q...``
(its in-memory PEFT names), and the same without the outer prefix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from . import safetensors as st
from .lora import _UNDERSCORED, comfy_name, module_name

Layers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]

_ARA_KEY = re.compile(r"^(.+?)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$|^(.+?)\.(alpha)$")
_KINDS = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up", "alpha": "alpha"}
#: kohya-style flattened names: lora_transformer_[transformer_1_]blocks_0_attn1_to_q
_FLAT = re.compile(r"^lora_(?:unet|transformer)_(?:(transformer_[12])_)?blocks_(\d+)_(\w+)$")


def _dotted(name: str) -> str:
    """A flattened (kohya-style) module name in dotted form; others unchanged."""
    m = _FLAT.match(name)
    if m and m.group(3) in _UNDERSCORED:
        return f"{m.group(1) + '.' if m.group(1) else ''}blocks.{m.group(2)}.{_UNDERSCORED[m.group(3)]}"
    return name


def parse_ara_state(state: Mapping[str, torch.Tensor], expert: str | None = None) -> Layers:
    """LoRA-layout tensors -> ``{layer: (down, up, scale)}``; of a two-expert
    file, ``expert``'s half (ValueError when ``expert`` is not given)."""
    parts: dict[str | None, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        m = _ARA_KEY.match(key)
        if not m:
            raise ValueError(f"unexpected key {key!r} in an ARA file (expected ...lora_A.weight / lora_B.weight / alpha)")
        head, kind = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        module = module_name(_dotted(head))
        parts.setdefault(module.expert, {}).setdefault(module.name, {})[_KINDS[kind]] = tensor
    if set(parts) - {None}:  # names carry the expert
        if expert is None:
            raise ValueError("the ARA file holds both experts (transformer_1 / transformer_2); say which expert to read")
        chosen = parts.get(expert, {})
    else:
        chosen = parts.get(None, {})
    out = {}
    for name, p in chosen.items():
        if "down" not in p or "up" not in p:
            raise ValueError(f"ARA entry {name} lacks its {'up (lora_B)' if 'down' in p else 'down (lora_A)'} weight")
        rank = p["down"].shape[0]
        scale = float(p["alpha"].float().item()) / rank if "alpha" in p else 1.0
        out[name] = (p["down"], p["up"], scale)
    return out


def read_ara_file(path: str | Path, expert: str | None = None) -> tuple[Layers, dict[str, str]]:
    """``({layer: (down, up, scale)}, metadata)`` of an ARA file (``expert``'s
    half of a two-expert file)."""
    tensors, meta = st.read(path)
    return parse_ara_state(tensors, expert), meta


def ara_to_state(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], layout: str = "diffusers") -> dict[str, torch.Tensor]:
    """``{layer: (down, up, scale)}`` -> file tensors in the ``"diffusers"`` or
    ``"comfy"`` key layout (``.alpha`` written so that alpha / rank = scale)."""
    out = {}
    for name, (down, up, scale) in layers.items():
        base = f"diffusion_model.{comfy_name(name)}" if layout == "comfy" else name
        out[f"{base}.lora_A.weight"] = down.contiguous()
        out[f"{base}.lora_B.weight"] = up.contiguous()
        out[f"{base}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def write_ara_file(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], path: Path, meta: Mapping[str, str]) -> Path:
    """An ARA file (diffusers key layout) written atomically."""
    return st.write_atomic(ara_to_state(layers), path, meta)


def ara_file_header(path: str | Path) -> tuple[set[str | None], dict[str, str]]:
    """The experts an ARA file's names carry (``None``: names without
    ``transformer_1.`` / ``transformer_2.``) and its metadata, from its
    header alone -- what ``wantrain check`` needs without reading tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys, meta = list(fh.keys()), dict(fh.metadata() or {})
    out: set[str | None] = set()
    for key in keys:
        m = _ARA_KEY.match(key)
        if m:
            out.add(module_name(_dotted(m.group(1) or m.group(3))).expert)
    return out, meta
