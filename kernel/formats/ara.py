"""Accuracy-recovery adapter (ARA) files: LoRA-layout tensors for any linear
layer of an expert (blocks and the layers outside them), read into
``{diffusers layer name: (down, up, scale)}`` and written back.

Key names share :func:`wantrain.formats.lora.module_name` with the LoRA
reader: ComfyUI / original Wan names or diffusers names, under
``diffusion_model.`` / ``transformer.`` / ``base_model.model.`` / ``model.``
or none; ``lora_A``/``lora_B`` or ``lora_down``/``lora_up``; an optional
``.alpha`` (scale = alpha / rank, else 1). A file whose names carry
``transformer_1.`` / ``transformer_2.`` (ai-toolkit's two-expert model)
holds both experts: each expert reads its half.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from . import safetensors as st
from .lora import comfy_name, module_name

Layers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]

_ARA_KEY = re.compile(r"^(.+?)\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$")
_KINDS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up", "alpha": "alpha"}


def parse_ara_state(state: Mapping[str, torch.Tensor], expert: str | None = None) -> Layers:
    """LoRA-layout tensors -> ``{layer: (down, up, scale)}``; of a two-expert
    file, ``expert``'s half (ValueError when ``expert`` is not given)."""
    parts: dict[str | None, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        m = _ARA_KEY.match(key)
        if not m:
            raise ValueError(f"unexpected key {key!r} in an ARA file (expected ...lora_A.weight / lora_B.weight / alpha)")
        module = module_name(m.group(1))
        parts.setdefault(module.expert, {}).setdefault(module.name, {})[_KINDS[m.group(2)]] = tensor
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
