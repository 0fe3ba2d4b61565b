"""Accuracy-recovery adapters (ARA) for quantized experts.

An ARA is a frozen low-rank pair beside a quantized linear layer, restoring
part of what quantization lost::

    y = Q(W) x + scale * up(down(x))         (+ the trained LoRA, added by peft)

It lives inside the quantized layer (an :class:`AraAdapter` child named
``ara`` and a forward hook), so peft wraps the layer as its base layer: the
ARA is part of the "base model", is never trained (its tensors are buffers,
not parameters), never appears in the LoRA files, and stays on inside
``run.lora_disabled``.

ARA sources: a LoRA-layout file (read and written by
:mod:`wantrain.formats.ara`: ComfyUI or diffusers names; a file with
``transformer_1.`` / ``transformer_2.`` names serves both experts, each
reading its half), or ``"svd"``: the truncated SVD of the quantization
residual ``W - dequant(Q(W))`` at a given rank, computed while the layer is in
memory and cached on disk (an ARA file of its own).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

import torch

from wantrain.formats.ara import read_ara_file, write_ara_file
from wantrain.profile import resolve_beside

from .loader import fingerprint

log = logging.getLogger("wantrain.quant")


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
    return resolve_beside(spec, base_dir)


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
    (layers the file lacks stay without one, counted in the log); of a
    two-expert file, ``expert``'s half. Otherwise
    SVD at ``rank``: adapters come from ``cache`` when it was computed from
    the same weights, quantizer and rank; missing ones are computed from the
    residual and the cache is (re)written at the end.
    """

    def __init__(self, qtype: str, rank: int = 16, file: Path | None = None, cache: Path | None = None,
                 expert: str | None = None):
        self.qtype, self.rank, self.file, self.cache, self.expert = qtype, rank, file, cache, expert
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
            self.from_file, _ = read_ara_file(self.file, self.expert)
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
            everything = {**self.cached, **self.computed}
            try:
                write_ara_file(everything, self.cache, self._meta())
                log.info("ARA (SVD rank %d) for %d layers cached in %s", self.rank, len(everything), self.cache)
            except OSError as exc:
                log.warning("could not cache the ARA in %s (%s); it will be recomputed next time", self.cache, exc)


