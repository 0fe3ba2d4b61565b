"""LoRA adapters: attach with peft, export to / import from the file layouts.

Our files use the ComfyUI (original Wan) layout, one file per expert::

    diffusion_model.blocks.{i}.self_attn.{q,k,v,o}.lora_A.weight / .lora_B.weight / .alpha
    diffusion_model.blocks.{i}.cross_attn.{q,k,v,o}...
    diffusion_model.blocks.{i}.ffn.{0,2}...

``alpha`` is a scalar tensor; the forward scale is alpha / rank. diffusers
reads this layout directly (``WanPipeline.load_lora_weights``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open

ADAPTER = "default"

# diffusers module path inside a block  <->  original Wan / ComfyUI name
DIFFUSERS_TO_COMFY = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
COMFY_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_TO_COMFY.items()}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(lora_A|lora_B)\.weight$")


def target_regex(modules: Iterable[str]) -> str:
    alternatives = "|".join(re.escape(m) for m in modules)
    return rf"blocks\.\d+\.({alternatives})"


def attach_lora(module: torch.nn.Module, rank: int, alpha: float, modules: Iterable[str], seed: int) -> list[torch.nn.Parameter]:
    """Add one LoRA adapter (fp32 weights) to a frozen expert; return its parameters.

    Initialisation is seeded (``seed``) and independent of the global RNG.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_regex(modules), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    params = []
    for name, param in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def lora_layers(module: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def lora_disabled(module: torch.nn.Module):
    """Run ``module`` as if the trained adapter were absent.

    The adapter's scale is set to 0 (exactly zero contribution) rather than
    peft's ``disable_adapters``, so frozen adapters living beside it (the
    accuracy-recovery adapter of 4-bit experts) stay on, and no
    ``requires_grad`` flag is touched.
    """
    saved = []
    for _, layer in lora_layers(module):
        if ADAPTER in layer.scaling:
            saved.append((layer, layer.scaling[ADAPTER]))
            layer.scaling[ADAPTER] = 0.0
    try:
        yield module
    finally:
        for layer, scale in saved:
            layer.scaling[ADAPTER] = scale


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"blocks.{i}.{path}.lora_A.weight": tensor, ...}`` in diffusers naming, fp32."""
    out = {}
    for name, layer in lora_layers(module):
        if ADAPTER not in layer.lora_A:
            continue
        out[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
        out[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
    return out


def load_lora_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy diffusers-named LoRA tensors into the attached adapter (shapes must match)."""
    layers = dict(lora_layers(module))
    for key, tensor in state.items():
        name, _, part = key.rpartition(".lora_")
        kind = "lora_" + part.split(".")[0]
        layer = layers.get(name)
        if layer is None or ADAPTER not in getattr(layer, kind):
            raise KeyError(f"LoRA tensor {key} has no matching adapter in the model")
        weight = getattr(layer, kind)[ADAPTER].weight
        if weight.shape != tensor.shape:
            raise ValueError(f"LoRA tensor {key} has shape {tuple(tensor.shape)}, the adapter {tuple(weight.shape)}")
        with torch.no_grad():
            weight.copy_(tensor.to(weight.dtype))


def to_comfy(state: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Diffusers-named fp32 tensors -> ComfyUI layout with ``.alpha`` per module."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _BLOCK_KEY.match(key)
        if not m:
            raise ValueError(f"unexpected LoRA key {key}")
        block, path, kind = m.groups()
        base = f"diffusion_model.blocks.{block}.{DIFFUSERS_TO_COMFY[path]}"
        out[f"{base}.{kind}.weight"] = tensor.to(dtype).contiguous()
        out[f"{base}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def from_comfy(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """ComfyUI layout -> (diffusers-named tensors, {module: alpha})."""
    out, alphas = {}, {}
    pattern = re.compile(r"^diffusion_model\.blocks\.(\d+)\.(.+?)\.(lora_A\.weight|lora_B\.weight|alpha)$")
    for key, tensor in state.items():
        m = pattern.match(key)
        if not m or m.group(2) not in COMFY_TO_DIFFUSERS:
            raise ValueError(f"unexpected key {key} in a ComfyUI-layout LoRA")
        block, path, kind = m.groups()
        name = f"blocks.{block}.{COMFY_TO_DIFFUSERS[path]}"
        if kind == "alpha":
            alphas[name] = float(tensor.float().item())
        else:
            out[f"{name}.{kind}"] = tensor.float()
    return out, alphas


def metadata(*, profile_toml: str, step: int | None, base_model: str, trigger_word: str | None, rank: int, alpha: float, expert: str) -> dict[str, str]:
    meta = {
        "format": "pt",
        "wantrain.version": _version(),
        "wantrain.expert": expert,
        "wantrain.step": "final" if step is None else str(step),
        "wantrain.base_model": base_model,
        "wantrain.rank": str(rank),
        "wantrain.alpha": f"{alpha:g}",
        "wantrain.trigger_word": trigger_word or "",
        "wantrain.profile": profile_toml,
        # read by tools that show kohya-style metadata
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": f"wan2.2_t2v_a14b_{expert}",
    }
    return meta


def _version() -> str:
    from . import __version__

    return __version__


_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def serialize(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bytes:
    """safetensors bytes with a canonical header (keys sorted), so the same
    tensors and metadata always give the same bytes. (The safetensors
    library writes its metadata from a hash map, in an order that changes
    between calls.) The result is read by ``safetensors.safe_open``."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    chunks, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def write_atomic(tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str]) -> Path:
    """Write a safetensors file under a temporary name, fsync it, rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(serialize(tensors, meta))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    return tensors, meta


def lora_filename(name: str, expert: str, step: int | None) -> str:
    return f"{name}_{expert}.safetensors" if step is None else f"{name}_{step:09d}_{expert}.safetensors"


def describe(meta: Mapping[str, str]) -> dict[str, Any]:
    return {k: (json.loads(v) if v[:1] in "[{" else v) for k, v in meta.items() if k != "wantrain.profile"}
