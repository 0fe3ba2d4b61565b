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
:mod:`wantrain.formats.ara`: ComfyUI, diffusers/PEFT or kohya names; a file
with ``transformer_1.`` / ``transformer_2.`` names -- ai-toolkit's, e.g. the
published ``wan22_14b_t2i_torchao_uint4`` -- serves both experts, each
reading its half); ``"svd"``: the truncated SVD of the quantization
residual ``W - dequant(Q(W))`` at a given rank, computed while the layer is in
memory; or ``"calibrated"``: the rank-``r`` correction that minimises the
layer's output error on activations captured from the model itself
(:mod:`.calibrate`). Computed ones are cached on disk (ARA files of their own).

A file must fit: an adapter for every quantized layer of the expert, made
for the grid in use (``wantrain.ara.grid`` in the metadata of the files we
write: ``quanto-qint4-g128`` / ``torchao-uint4-g64``). Anything else is a
:class:`~wantrain.errors.ProfileError` naming the count and the fix, never
a run at plain 4-bit behind a warning.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

import torch

from wantrain.errors import ProfileError, ProfileProblem
from wantrain.formats.ara import ara_file_header, read_ara_file, write_ara_file
from wantrain.profile import resolve_beside

from .loader import GRIDS, fingerprint

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
    device = (layer.packed if hasattr(layer, "packed") else layer.weight).device  # uint4: no float weight to build
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
    if hasattr(layer, "packed"):  # uint4.UInt4Linear
        return layer.dequantize()
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


def ara_cache_path(source, subfolder: str, qtype: str, rank: int, method: str = "svd") -> Path:
    """Where a computed ARA (``method`` ``svd`` | ``calibrated``) of an
    expert is cached: next to the model when the model folder is local and
    writable, else under ``$WANTRAIN_CACHE`` (default
    ``~/.cache/wantrain``)/``ara/<model>/``."""
    name = f"wantrain_ara_{method}_{qtype.split('+')[0]}_r{rank}.safetensors"
    single = getattr(source, "files", {}).get(subfolder)  # an original single file ([model] high_noise = ...)
    if single is not None:
        if os.access(single.parent, os.W_OK):
            return single.parent / f"{single.stem}.{name}"
        return Path(os.environ.get("WANTRAIN_CACHE", Path.home() / ".cache" / "wantrain")) / "ara" / single.stem / name
    if source.local and os.access(Path(source.local) / subfolder, os.W_OK):
        return Path(source.local) / subfolder / name
    root = Path(os.environ.get("WANTRAIN_CACHE", Path.home() / ".cache" / "wantrain"))
    safe = re.sub(r"[^\w.@-]+", "--", source.spec.strip("/"))
    return root / "ara" / safe / subfolder / name


FIX = ('use an ARA file made for this model and grid, keep the layers it lacks in high precision '
       '([plugins.quantize] exclude), or compute one: ara = "calibrated" (or "svd")')


class AraPlan:
    """How the ARA of one expert is obtained while it loads.

    ``file`` given: of a two-expert file, ``expert``'s half; it must hold an
    adapter for every layer the loader will quantize (:meth:`begin` checks
    before a weight is read) and be made for the grid in use. Otherwise
    ``method`` ``"svd"`` at ``rank``: adapters come from ``cache`` when it
    was computed from the same weights, grid and rank; missing ones are
    computed from the residual while each layer is in memory. ``method``
    ``"calibrated"``: cached ones attach while loading; the rest are left
    ``pending`` for :func:`.calibrate.calibrate_ara`, which needs the whole
    quantized expert to run. The cache is (re)written by :meth:`finish`.
    """

    def __init__(self, qtype: str, rank: int = 16, file: Path | None = None, cache: Path | None = None,
                 expert: str | None = None, method: str = "svd", calibration: str = "", shared: bool = False):
        self.qtype, self.rank, self.file, self.cache, self.expert = qtype, rank, file, cache, expert
        #: one file named for both experts: it must carry transformer_1. / transformer_2. names
        self.shared = shared
        self.method, self.calibration = method, calibration
        self.grid = GRIDS[qtype.split("+")[0]]
        self.from_file: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.computed: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.attached = 0
        self.pending: list[str] = []
        self.ignored: list[str] = []
        self._fingerprint = ""

    def _meta(self) -> dict[str, str]:
        from importlib.metadata import version

        library = ("torchao", version("torchao")) if self.grid.startswith("torchao") else ("quanto", version("optimum-quanto"))
        meta = {"wantrain.ara": self.method, "wantrain.ara.grid": self.grid, "qtype": self.qtype.split("+")[0],
                "rank": str(self.rank), "weights": self._fingerprint, library[0]: library[1]}
        if self.method == "calibrated":
            meta["wantrain.ara.calibration"] = self.calibration
        return meta

    def begin(self, files: Iterable[Path], layers: Iterable[str] = ()) -> None:
        """Before any weight is read: the file's (or cache's) adapters;
        ``layers``: every layer the loader will quantize."""
        self._fingerprint = fingerprint(files)
        if self.file is not None:
            self._read_file(list(layers))
            return
        if self.cache is not None and self.cache.is_file():
            cached, meta = read_ara_file(self.cache)
            if all(meta.get(k) == v for k, v in self._meta().items()):
                self.cached = cached
            else:
                log.info("ARA cache %s was computed from other weights or settings; recomputing", self.cache)

    def _read_file(self, layers: list[str]) -> None:
        where = "plugins.quantize.ara"
        if self.shared and not (ara_file_header(self.file)[0] - {None}):
            raise ProfileError(ProfileProblem(where, f"{self.file.name} has no transformer_1. / transformer_2. names: one expert's "
                                              "adapters cannot serve both experts", str(self.file),
                                              "write {expert} where the file names differ (high_noise / low_noise)"))
        try:
            self.from_file, meta = read_ara_file(self.file, self.expert)
        except ValueError as exc:
            raise ProfileError(ProfileProblem(where, f"{self.file.name} cannot be read as an ARA file: {exc}", str(self.file), FIX)) from exc
        grid = meta.get("wantrain.ara.grid") or grid_from_name(self.file.name)
        if grid is not None and grid != self.grid:
            raise ProfileError(ProfileProblem(
                where, f"{self.file.name} was made for the {grid} grid, but the experts are quantized to {self.qtype.split('+')[0]} "
                f"({self.grid}); it would correct an error the layers do not have", str(self.file),
                f'set transformer = "{QTYPE_OF_GRID.get(grid, "?")}+ara" to match the file, or compute an ARA for this grid: ara = "calibrated"'))
        missing = [n for n in layers if n not in self.from_file]
        if missing:
            half = f" (its {self.expert} half)" if self.expert else ""
            raise ProfileError(ProfileProblem(
                where, f"{self.file.name}{half} has no adapter for {len(missing)} of the {len(layers)} quantized layers "
                f"(e.g. {missing[0]}); the run would be plain 4-bit there", str(self.file), FIX))
        self.ignored = sorted(set(self.from_file) - set(layers))
        if self.ignored:
            log.info("ARA file %s: %d adapters are for layers kept in high precision (e.g. %s); not needed, not attached",
                     self.file.name, len(self.ignored), self.ignored[0])

    def attach(self, parent: torch.nn.Module, rel: str, full: str, weight: torch.Tensor) -> None:
        layer = parent.get_submodule(rel)
        if self.file is not None:
            entry = self.from_file[full]  # begin() made sure it is there
        else:
            entry = self.cached.get(full)
            if entry is None and self.method == "calibrated":
                self.pending.append(full)  # needs activations: computed once the whole expert is in
                return
            if entry is None:
                down, up = svd_ara(weight, dequantized_weight(layer), self.rank, weight.dtype)
                entry = (down, up, 1.0)
                self.computed[full] = entry
        self.put(layer, full, entry, weight.dtype if weight.is_floating_point() else None)

    def put(self, layer: torch.nn.Module, full: str, entry, dtype: torch.dtype | None = None) -> None:
        down, up, scale = entry
        dtype = dtype or down.dtype
        try:
            attach_ara(layer, down.to(dtype), up.to(dtype), scale)
        except ValueError as exc:
            if self.file is None:
                raise
            raise ProfileError(ProfileProblem("plugins.quantize.ara", f"{self.file.name}: {full}: {exc}", str(self.file), FIX)) from exc
        self.attached += 1

    def finish(self) -> None:
        if self.file is not None or self.pending:
            return
        if self.computed and self.cache is not None:
            everything = {**self.cached, **self.computed}
            try:
                write_ara_file(everything, self.cache, self._meta())
                log.info("ARA (%s rank %d) for %d layers cached in %s", self.method, self.rank, len(everything), self.cache)
            except OSError as exc:
                log.warning("could not cache the ARA in %s (%s); it will be recomputed next time", self.cache, exc)


QTYPE_OF_GRID = {g: q for q, g in GRIDS.items()}


def grid_from_name(name: str) -> str | None:
    """A file without our metadata: the grid its name announces, if any
    (ostris' published adapters are named ``..._torchao_uint4.safetensors``)."""
    low = name.lower()
    if "uint4" in low:
        return GRIDS["uint4"]
    if "qint4" in low:
        return GRIDS["qint4"]
    return None
