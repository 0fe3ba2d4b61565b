"""Quantized experts: a block-by-block loader, and accuracy-recovery adapters (ARA).

Loading a 14B expert the usual way holds the whole bf16 state dict (28 GB)
in host RAM before anything is quantized. :func:`load_quantized_expert`
never does: the module is built on the ``meta`` device from the subfolder's
``config.json``, then the safetensors shards are read tensor by tensor, one
transformer block at a time; each block is materialised in the run's dtype,
its linear layers quantized with optimum-quanto and frozen, and only then is
the next block read. Peak host memory is about the quantized model plus one
bf16 block (see ``benchmarks/load_memory.py``).

An *accuracy-recovery adapter* is a frozen low-rank pair beside a quantized
linear layer, restoring part of what quantization lost::

    y = Q(W) x + scale * up(down(x))         (+ the trained LoRA, added by peft)

It lives inside the quantized layer (an :class:`AraAdapter` child named
``ara`` and a forward hook), so peft wraps the layer as its base layer: the
ARA is part of the "base model", is never trained (its tensors are buffers,
not parameters), never appears in :func:`wantrain.lora.lora_state`, and stays
on inside :func:`wantrain.lora.lora_disabled`.

ARA sources: a LoRA-layout file (ComfyUI ``diffusion_model.blocks...`` or
diffusers ``blocks...`` / ``transformer.blocks...``, ``lora_A``/``lora_B`` or
``lora_down``/``lora_up``, optional ``.alpha``), or ``"svd"``: the truncated
SVD of the quantization residual ``W - dequant(Q(W))`` at a given rank,
computed while the bf16 block is in memory and cached on disk.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import ModelError, ProfileProblem

log = logging.getLogger("wantrain.quant")

TRANSFORMER_QTYPES = ("none", "qfloat8", "qint8", "qint4", "qint4+ara")
TEXT_ENCODER_QTYPES = ("none", "qfloat8", "qint8")
#: kept in high precision by default: embeddings (patch, text, time), the
#: modulation (time projection, ``scale_shift_table`` -- a parameter, never
#: quantized), every norm, and the output head.
DEFAULT_EXCLUDE = ("patch_embedding", "condition_embedder.*", "*norm*", "proj_out")
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
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


def subfolder_file(source, subfolder: str, filename: str) -> Path | None:
    """A file of the model (local folder or hub), or None when it does not exist."""
    if source.local:
        path = Path(source.local) / subfolder / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return Path(hf_hub_download(source.repo, f"{subfolder}/{filename}", revision=source.revision))
    except EntryNotFoundError:
        return None


def read_config(source, subfolder: str) -> dict:
    path = subfolder_file(source, subfolder, "config.json")
    if path is None:
        raise ModelError(ProfileProblem("model.name_or_path", f"has no {subfolder}/config.json", source.spec))
    return json.loads(path.read_text())


def weight_map(source, subfolder: str) -> dict[str, Path]:
    """``{tensor name: shard path}`` for a sharded or single-file subfolder."""
    index = subfolder_file(source, subfolder, INDEX_FILE)
    if index is not None:
        names = json.loads(index.read_text())["weight_map"]
        shards = {shard: subfolder_file(source, subfolder, shard) for shard in sorted(set(names.values()))}
        return {key: shards[shard] for key, shard in names.items()}
    single = subfolder_file(source, subfolder, SINGLE_FILE)
    if single is None:
        raise ModelError(ProfileProblem("model.name_or_path", f"has no safetensors weights in {subfolder}/", source.spec))
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as fh:
        return {key: single for key in fh.keys()}


def fingerprint(files: Iterable[Path]) -> str:
    """Identifies the weights an SVD cache was computed from (names and sizes)."""
    h = hashlib.sha256()
    for f in sorted({Path(p) for p in files}):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


def read_tensors(keys: Iterable[str], files: Mapping[str, Path]) -> dict[str, torch.Tensor]:
    """Read ``keys`` into memory of their own, opening each shard once and
    closing it right after, so no file stays mapped into this process."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    out = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as fh:
            for key in names:
                # a copy: safetensors may hand out views of its file mapping,
                # and one small tensor kept (a bias) would keep the whole
                # shard mapped and its pages in this process's RSS
                out[key] = fh.get_tensor(key).clone()
    return out


# ---------------------------------------------------------------- the loader


def build_empty(config: Mapping[str, Any]) -> torch.nn.Module:
    """The expert on the ``meta`` device (buffers such as the RoPE tables stay real)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=False):
        return WanTransformer3DModel.from_config(config)


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
    from optimum.quanto import freeze, quantize

    names, originals = [], {}
    for name, sub in module.named_modules():
        full = prefix + name
        if (skip and name.startswith(skip)) or (only is not None and name != only):
            continue
        if type(sub) is torch.nn.Linear and not excluded(full, exclude):
            names.append(name)
            originals[full] = sub.weight.detach()
    if names:
        quantize(module, weights=quanto_qtype(qtype), include=names)
        for name in names:
            freeze(module.get_submodule(name))
    return originals


def quantized_linears(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, QLinear)`` pairs, peft wrappers looked through."""
    from optimum.quanto.nn import QLinear

    out = []
    for name, sub in module.named_modules():
        if isinstance(sub, QLinear):
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
    ara: "AraPlan | None" = None,
) -> torch.nn.Module:
    """Build the expert on ``meta`` and stream it in, quantizing layer by layer.

    Peak host memory: the quantized model so far plus one layer in ``dtype``.
    With ``ara``, each quantized linear gets its recovery adapter while its
    block is loaded (from the plan's file / cache, or by SVD of the residual).
    """
    exclude = tuple(exclude)
    _glibc_mmap_large_allocations()
    module = build_empty(read_config(source, subfolder))
    files = weight_map(source, subfolder)
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
        ara.begin(files.values())
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
        tensors = read_tensors(layer_keys, files)
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


# ---------------------------------------------------------------- ARA


class AraAdapter(torch.nn.Module):
    """A frozen low-rank correction ``scale * up(down(x))``; its tensors are
    buffers, so no optimizer and no ``requires_grad`` switch can reach them."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.register_buffer("down", down.detach().contiguous())
        self.register_buffer("up", up.detach().contiguous())
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x.to(self.down.dtype), self.down)
        return torch.nn.functional.linear(h, self.up) * self.scale


def _ara_hook(module, args, output):
    return output + module.ara(args[0]).to(output.dtype)


def attach_ara(layer: torch.nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> AraAdapter:
    """Put an ARA beside a (quantized) linear layer; replaces one already there."""
    if up.shape[0] != layer.out_features or down.shape[1] != layer.in_features or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"ARA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a linear layer "
            f"{layer.in_features} -> {layer.out_features}"
        )
    device = layer.weight.device
    adapter = AraAdapter(down.to(device), up.to(device), scale)
    if getattr(layer, "ara", None) is None:
        layer.register_forward_hook(_ara_hook)
    layer.ara = adapter
    return adapter


def ara_layers(module: torch.nn.Module) -> dict[str, AraAdapter]:
    """``{layer name: adapter}`` in diffusers naming (peft wrappers looked through)."""
    return {n[: -len(".ara")].replace(".base_layer", ""): m for n, m in module.named_modules() if isinstance(m, AraAdapter)}


@torch.no_grad()
def svd_ara(weight: torch.Tensor, dequantized: torch.Tensor, rank: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD of ``weight - dequantized``: ``(down [r, in], up [out, r])``.

    Exact SVD for small layers; randomized (``torch.svd_lowrank``, seeded,
    oversampled by 8, 4 power iterations) for large ones."""
    residual = weight.float() - dequantized.float()
    rank = min(rank, *residual.shape)
    if min(residual.shape) <= 1024:
        # small: exact, single-threaded (multi-threaded LAPACK on a busy
        # machine is orders of magnitude slower for matrices this size)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        finally:
            torch.set_num_threads(threads)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(residual, q=min(rank + 8, *residual.shape), niter=4)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    return (root[:, None] * v.T).to(dtype).contiguous(), (u * root[None, :]).to(dtype).contiguous()


@torch.no_grad()
def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    w = layer.weight
    return w.dequantize() if hasattr(w, "dequantize") else w.detach()


# --------------------------------------------------------------- ARA files

_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.")
_COMFY_TOP = {"head.head": "proj_out", "text_embedding.0": "condition_embedder.text_embedder.linear_1",
              "text_embedding.2": "condition_embedder.text_embedder.linear_2",
              "time_embedding.0": "condition_embedder.time_embedder.linear_1",
              "time_embedding.2": "condition_embedder.time_embedder.linear_2",
              "time_projection.1": "condition_embedder.time_proj"}
_ARA_KEY = re.compile(r"^(.+?)\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$")


def _diffusers_name(name: str) -> str:
    from .lora import COMFY_TO_DIFFUSERS

    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in COMFY_TO_DIFFUSERS:
        return f"blocks.{m.group(1)}.{COMFY_TO_DIFFUSERS[m.group(2)]}"
    return _COMFY_TOP.get(name, name)


def parse_ara_state(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """LoRA-layout tensors (ComfyUI or diffusers keys) -> ``{layer: (down, up, scale)}``.

    ``scale`` is ``alpha / rank`` where an ``.alpha`` is present, else 1."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _ARA_KEY.match(key)
        if not m:
            raise ValueError(f"unexpected key {key!r} in an ARA file (expected ...lora_A.weight / lora_B.weight / alpha)")
        kind = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up"}.get(m.group(2), "alpha")
        parts.setdefault(_diffusers_name(m.group(1)), {})[kind] = tensor
    out = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ValueError(f"ARA entry {name} lacks its {'up (lora_B)' if 'down' in p else 'down (lora_A)'} weight")
        rank = p["down"].shape[0]
        scale = float(p["alpha"].float().item()) / rank if "alpha" in p else 1.0
        out[name] = (p["down"], p["up"], scale)
    return out


def read_ara_file(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    return parse_ara_state(state), meta


def ara_to_state(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], layout: str = "diffusers") -> dict[str, torch.Tensor]:
    """``{layer: (down, up, scale)}`` -> file tensors in the ``"diffusers"`` or
    ``"comfy"`` key layout (``.alpha`` written so that alpha / rank = scale)."""
    from .lora import DIFFUSERS_TO_COMFY

    top = {v: k for k, v in _COMFY_TOP.items()}
    out = {}
    for name, (down, up, scale) in layers.items():
        if layout == "comfy":
            m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
            base = f"blocks.{m.group(1)}.{DIFFUSERS_TO_COMFY[m.group(2)]}" if m and m.group(2) in DIFFUSERS_TO_COMFY else top.get(name, name)
            base = "diffusion_model." + base
        else:
            base = name
        out[f"{base}.lora_A.weight"] = down.contiguous()
        out[f"{base}.lora_B.weight"] = up.contiguous()
        out[f"{base}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def resolve_ara_path(spec: str, expert: str, base_dir: Path | None = None) -> Path:
    """A local path or ``hf://org/repo[@revision]/path/in/repo.safetensors``;
    ``{expert}`` is replaced by ``high_noise`` / ``low_noise``."""
    spec = spec.replace("{expert}", expert)
    if spec.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        repo_part, _, filename = spec[5:].partition("/")
        org = repo_part
        name, _, filename = filename.partition("/")
        repo, _, revision = f"{org}/{name}".partition("@")
        return Path(hf_hub_download(repo, filename, revision=revision or None))
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def ara_cache_path(source, subfolder: str, qtype: str, rank: int) -> Path:
    """Where the SVD ARA of an expert is cached: next to the model when the
    model folder is local and writable, else under ``$WANTRAIN_CACHE``
    (default ``~/.cache/wantrain``)/``ara/<model>/``."""
    name = f"wantrain_ara_svd_{qtype.split('+')[0]}_r{rank}.safetensors"
    if source.local and os.access(Path(source.local) / subfolder, os.W_OK):
        return Path(source.local) / subfolder / name
    root = Path(os.environ.get("WANTRAIN_CACHE", Path.home() / ".cache" / "wantrain"))
    safe = re.sub(r"[^\w.@-]+", "--", source.spec.strip("/"))
    return root / "ara" / safe / subfolder / name


class AraPlan:
    """How the ARA of one expert is obtained while it loads.

    ``file`` given: every quantized layer named in the file gets its adapter
    (layers the file lacks stay without one, counted in the log). Otherwise
    SVD at ``rank``: adapters come from ``cache`` when it was computed from
    the same weights, quantizer and rank; missing ones are computed from the
    residual and the cache is (re)written at the end.
    """

    def __init__(self, qtype: str, rank: int = 16, file: Path | None = None, cache: Path | None = None):
        self.qtype, self.rank, self.file, self.cache = qtype, rank, file, cache
        self.from_file: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.computed: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.attached = 0
        self.skipped: list[str] = []
        self._fingerprint = ""

    def _meta(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"wantrain.ara": "svd", "qtype": self.qtype.split("+")[0], "rank": str(self.rank),
                "weights": self._fingerprint, "quanto": version("optimum-quanto")}

    def begin(self, files: Iterable[Path]) -> None:
        self._fingerprint = fingerprint(files)
        if self.file is not None:
            self.from_file, _ = read_ara_file(self.file)
            return
        if self.cache is not None and self.cache.is_file():
            layers, meta = read_ara_file(self.cache)
            if all(meta.get(k) == v for k, v in self._meta().items()):
                self.cached = layers
            else:
                log.info("ARA cache %s was computed from other weights or settings; recomputing", self.cache)

    def attach(self, parent: torch.nn.Module, rel: str, full: str, weight: torch.Tensor) -> None:
        layer = parent.get_submodule(rel)
        if self.file is not None:
            entry = self.from_file.get(full)
            if entry is None:
                self.skipped.append(full)
                return
        else:
            entry = self.cached.get(full)
            if entry is None:
                down, up = svd_ara(weight, dequantized_weight(layer), self.rank, weight.dtype)
                entry = (down, up, 1.0)
                self.computed[full] = entry
        down, up, scale = entry
        dtype = weight.dtype if weight.is_floating_point() else down.dtype
        attach_ara(layer, down.to(dtype), up.to(dtype), scale)
        self.attached += 1

    def finish(self) -> None:
        if self.file is not None:
            if self.skipped:
                log.warning("ARA file %s has no adapter for %d quantized layers (e.g. %s); they run without one",
                            self.file, len(self.skipped), self.skipped[0])
            return
        if self.computed and self.cache is not None:
            from .lora import write_atomic

            everything = {**self.cached, **self.computed}
            try:
                write_atomic(ara_to_state(everything), self.cache, self._meta())
                log.info("ARA (SVD rank %d) for %d layers cached in %s", self.rank, len(everything), self.cache)
            except OSError as exc:
                log.warning("could not cache the ARA in %s (%s); it will be recomputed next time", self.cache, exc)


def target_names(modules: Iterable[str]) -> "re.Pattern[str]":
    """The LoRA target pattern (``blocks.N.<module>``) the kernel gives peft."""
    from .lora import target_regex

    return re.compile(target_regex(modules))
