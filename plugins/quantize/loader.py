"""The streaming quantized loader: an expert never sits in host RAM in bf16.

Loading a 14B expert the usual way holds the whole bf16 state dict (28 GB)
in host RAM before anything is quantized. :func:`load_quantized_expert`
never does: the module is built on the ``meta`` device from the subfolder's
``config.json`` (:func:`wantrain.model.build_empty`), then the safetensors
shards are read tensor by tensor, one layer at a time; each layer is
materialised in the run's dtype, quantized with optimum-quanto and frozen,
its accuracy-recovery adapter attached (:mod:`.ara`), and only then is the
next layer read. Peak host memory is about the quantized model plus one bf16
layer (see ``benchmarks/load_memory.py``). The tensors come from a
:class:`wantrain.formats.sources.TensorSource`: the Diffusers shards, or an
original single file (ComfyUI's) with its names converted and fp8 scales applied.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

from wantrain.errors import ModelError, ProfileProblem
from wantrain.formats.sources import (  # noqa: F401 - the file helpers, re-exported
    INDEX_FILE, SINGLE_FILE, read_config, read_tensors, subfolder_file, tensor_source, weight_map)
from wantrain.model import build_empty

from . import uint4

log = logging.getLogger("wantrain.quant")

TRANSFORMER_QTYPES = ("none", "qfloat8", "qint8", "qint4", "qint4+ara", "uint4", "uint4+ara")
#: the 4-bit grids an ARA is made against (written into ARA file metadata)
GRIDS = {"qint4": "quanto-qint4-g128", "uint4": "torchao-uint4-g64"}
TEXT_ENCODER_QTYPES = ("none", "qfloat8", "qint8")
#: kept in high precision by default: embeddings (patch, text, time), the
#: modulation (time projection, ``scale_shift_table`` -- a parameter, never
#: quantized), every norm, and the output head.
DEFAULT_EXCLUDE = ("patch_embedding", "condition_embedder.*", "*norm*", "proj_out")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def quanto_qtype(name: str):
    """``"qint4+ara"`` -> ``optimum.quanto.qint4`` (the ``+ara`` suffix is ours)."""
    from optimum import quanto

    base = name.split("+")[0]
    return {"qfloat8": quanto.qfloat8, "qint8": quanto.qint8, "qint4": quanto.qint4}[base]


def excluded(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch on the module's full name (``blocks.3.attn1.to_q``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------- files


def fingerprint(files: Iterable[Path]) -> str:
    """Identifies the weights an SVD cache was computed from (names and sizes)."""
    h = hashlib.sha256()
    for f in sorted({Path(p) for p in files}):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the loader


def _target_dtype(module: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    parts = name.split(".")
    return torch.float32 if any(k in parts for k in keep) else dtype


def materialise(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Put loaded tensors into a meta-initialised module (frozen, on the CPU)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, tensor in tensors.items():
        set_module_tensor_to_device(module, name, "cpu", value=tensor, dtype=_target_dtype(module, name, dtype))


def quantize_linears(
    module: torch.nn.Module, qtype: str, exclude: Iterable[str], prefix: str = "", skip: tuple[str, ...] = (),
    only: str | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize (and freeze) every ``nn.Linear`` of ``module`` whose full name
    (``prefix + name``) is not excluded -- or just the one named ``only``.
    Returns the original weights of the quantized layers (``{full name:
    tensor}``) for the caller to use or drop."""
    from optimum.quanto import quantize

    names, originals = [], {}
    for name, sub in module.named_modules():
        full = prefix + name
        if (skip and name.startswith(skip)) or (only is not None and name != only):
            continue
        if type(sub) is torch.nn.Linear and not excluded(full, exclude):
            names.append(name)
            originals[full] = sub.weight.detach()
    if names and qtype.split("+")[0] == "uint4":
        for name in names:  # torchao's grid, in a Linear subclass of ours (see uint4.py)
            parent, _, child = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            setattr(owner, child, uint4.UInt4Linear.from_linear(owner.get_submodule(child)))
    elif names:
        quantize(module, weights=quanto_qtype(qtype), include=names)
        for name in names:
            freeze_portable(module.get_submodule(name))
    return originals


def freeze_portable(layer: torch.nn.Module) -> None:
    """quanto's ``freeze``, keeping a 4-bit weight in quanto's kernel-agnostic
    form (``optimized=False``). Frozen on the host, a bf16 qint4 weight is
    otherwise packed for quanto's CPU int4 matmul, which can only be unpacked
    -- to dequantize it for the ARA's SVD, for every backward pass, and for the
    move to the GPU -- by a matmul with the identity: 13-16 s per A14B FFN
    layer on 2 cores (benchmarks/real_scale_cpu.py), about an hour per expert.
    The agnostic form dequantizes in 0.5 s and is packed for the GPU's kernel
    by quanto itself when the expert moves there."""
    from optimum.quanto import freeze
    from optimum.quanto.tensor.weights import quantize_weight

    if layer.weight_qtype is None or layer.weight_qtype.bits != 4:
        freeze(layer)
        return
    scale, shift = layer.optimizer(layer.weight, qtype=layer.weight_qtype, axis=0, group_size=layer.weight_group_size)
    layer.weight = torch.nn.Parameter(quantize_weight(
        layer.weight, qtype=layer.weight_qtype, axis=0, scale=scale, shift=shift, group_size=layer.weight_group_size,
        activation_qtype=layer.activation_qtype, optimized=False), requires_grad=False)


def planned_linears(module: torch.nn.Module, exclude: Iterable[str]) -> list[str]:
    """The linear layers :func:`quantize_linears` will quantize (works on ``meta``)."""
    return [n for n, sub in module.named_modules() if type(sub) is torch.nn.Linear and not excluded(n, exclude)]


def quantized_linears(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, QLinear | UInt4Linear)`` pairs, peft wrappers looked through."""
    from optimum.quanto.nn import QLinear

    out = []
    for name, sub in module.named_modules():
        if isinstance(sub, (QLinear, uint4.UInt4Linear)):
            out.append((name.replace(".base_layer", ""), sub))
    return out


@torch.no_grad()
def load_quantized_expert(
    source,
    subfolder: str,
    *,
    dtype: torch.dtype,
    qtype: str,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    ara=None,
) -> torch.nn.Module:
    """Build the expert on ``meta`` and stream it in, quantizing layer by layer.

    Peak host memory: the quantized model so far plus one layer in ``dtype``.
    With ``ara``, each quantized linear gets its recovery adapter while its
    block is loaded (from the plan's file / cache, or by SVD of the residual).
    """
    exclude = tuple(exclude)
    _glibc_mmap_large_allocations()
    files = tensor_source(source, subfolder)  # Diffusers shards, or an original single file (names converted)
    module = build_empty(files.config())
    expected = set(module.state_dict().keys())
    unknown = sorted(set(files) - expected)
    if unknown:
        log.warning("%s: %d tensors in the checkpoint have no place in the model (e.g. %s); ignored", subfolder, len(unknown), unknown[0])
    groups: dict[int, list[str]] = {}
    rest = []
    for key in files:
        if key not in expected:
            continue
        m = _BLOCK.match(key)
        (groups.setdefault(int(m.group(1)), []) if m else rest).append(key)
    if ara is not None:
        ara.begin(files.values(), planned_linears(module, exclude))
    _load_group(module, "", rest, files, dtype, qtype, exclude, ara)
    for i, block in enumerate(module.blocks):
        _load_group(block, f"blocks.{i}.", groups.get(i, []), files, dtype, qtype, exclude, ara)
        if (i + 1) % 10 == 0 or i + 1 == len(module.blocks):
            log.debug("%s: %d/%d blocks loaded and quantized", subfolder, i + 1, len(module.blocks))
    # (not state_dict(): quanto would unpack every quantized weight to serialise it)
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ModelError(ProfileProblem("model.name_or_path", f"{subfolder} lacks {len(missing)} weights (e.g. {missing[0]})", source.spec))
    if ara is not None:
        ara.finish()
    return module.requires_grad_(False).eval()


def _glibc_mmap_large_allocations() -> None:
    """Have glibc serve allocations of 1 MiB and more with mmap.

    Its default threshold rises after the first large free, after which a
    block's bf16 tensors come from the heap, interleave with the small
    quantized tensors that stay, and the freed space can never be given back:
    measured, RSS grew by 6x the quantized size. With a fixed threshold every
    freed bf16 tensor returns to the OS at once. No-op off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc
        pass


def _load_group(module, prefix, keys, files, dtype, qtype, exclude, ara) -> None:
    """Read ``keys`` (one block, or everything outside the blocks when
    ``prefix`` is empty) one layer at a time: materialise a layer, quantize
    it, attach its ARA, let its full-precision weight go, then the next --
    so at most one layer's weights are in flight, not a whole block."""
    # outside the blocks (prefix ""), the blocks themselves are still on meta
    skip = ("blocks.",) if prefix == "" else ()
    for layer, layer_keys in _by_layer(keys, prefix).items():
        tensors = files.read(layer_keys)
        materialise(module, {k[len(prefix):]: v for k, v in tensors.items()}, dtype)
        del tensors
        originals = quantize_linears(module, qtype, exclude, prefix=prefix, skip=skip, only=layer)
        if ara is not None:
            for full, weight in originals.items():
                ara.attach(module, full[len(prefix):], full, weight)
        del originals


def _by_layer(keys: Iterable[str], prefix: str) -> dict[str, list[str]]:
    """Group tensor names by the module that owns them (``attn1.to_q``)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key[len(prefix):].rpartition(".")[0], []).append(key)
    return groups


def quantize_module(module: torch.nn.Module, qtype: str, exclude: Iterable[str] = ()) -> int:
    """Quantize every linear layer of an already loaded module in place (the
    text encoder); returns how many layers were quantized."""
    return len(quantize_linears(module, qtype, tuple(exclude)))

