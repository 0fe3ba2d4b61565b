"""Cache latents (``[plugins.latent_cache]``): encode each sample once, then
train without the VAE on the device.

Which datasets: those with ``cache_latents = true`` in their ``[[datasets]]``
table. Enabling this plugin with no such dataset is a profile error.

What is cached: every sample variant such a dataset can produce
(``TrainData.iter_items()``): each item x each resolution's bucket x each
flip that ``flip_x`` / ``flip_y`` allow x, for ``frame_sampling = "fps"``,
each of the clip's fixed windows. A cached "fps" dataset draws its window
per epoch from up to 8 windows spread evenly over the clip, half a window
apart, instead of from any start -- fewer distinct windows, each encoded once.

Where: ``<dataset folder>/.wantrain_cache/latents/`` (``folder`` overrides
it for every dataset), one ``<key>.safetensors`` per sample variant with the
tensor ``latents`` ``[16, F', H/8, W/8]`` (normalised, like
``wantrain.model.encode_pixels`` returns them) and metadata naming the source
file. ``key`` = sha256 of the VAE's identity (the content hashes of the
model's ``vae/`` files -- or the hub id --, VAE class and config) and the
data key (the file's content hash, bucket, source frame indices -- so
num_frames, sampling mode and window -- and flips). No absolute path is part
of it: a moved or copied project reuses its cache. Runs with other settings
add their own entries beside these ones; entries of an older cache format
are deleted and encoded again. A cache that cannot be written (read-only
folder, full disk) stops the run with one error line.

Stale entries: an entry whose source file's content has changed since (or
which cannot be read, or whose metadata does not match its name) is deleted
and encoded again. Nothing else is deleted.

Events:

- ``check_profile``: at least one dataset must set ``cache_latents``;
- ``on_run_start``: encode what is missing (a file that fails to decode is
  excluded from training with one ``skip`` warning), tell the data loader to
  stop decoding pixels for cached datasets, and -- when every dataset is
  cached -- move the VAE to the CPU (``run.vae.to("cpu")``; previews then
  decode on the CPU unless the sample plugin moves it back);
- ``encode_videos``: the batch's latents from disk (first result wins over the
  kernel's VAE encode); a batch from a dataset that is not cached gets None so
  the kernel encodes it.
- ``encode_condition`` (image-to-video archs): the condition latents of each
  sample (the VAE encoding of its start frame -- I2V-A14B: with the zeros and
  optional last frame after it) are cached beside its latents, under a key
  that adds the arch's conditioning, the last-frame mode and the override
  images' content (``clip.png``).

Config keys: ``folder`` (str, optional), ``dtype`` ("fp32" keeps the exact
bits the VAE gave; "bf16" halves the disk space).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import attrs
import torch
from safetensors import safe_open

from wantrain import distributed, hookimpl
from wantrain.data.media import MediaError
from wantrain.errors import ProfileProblem, WantrainError
from wantrain.formats import sources
from wantrain.formats.safetensors import write_atomic
from wantrain.profile import one_of
from wantrain.run import Run

log = logging.getLogger("wantrain.latent_cache")

CACHE_DIR = ".wantrain_cache/latents"
FORMAT = "wantrain-latents-2"  # 2: the model is known by its VAE files' content, not its path
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@attrs.frozen(kw_only=True)
class Config:
    #: one folder for every cached dataset; default "<dataset folder>/.wantrain_cache/latents"
    folder: str | None = None
    #: "fp32": the VAE's exact output; "bf16": half the disk space
    dtype: str = attrs.field(default="fp32", validator=one_of("fp32", "bf16"))


# ---------------------------------------------------------------- keys and storage


def vae_identity(run) -> str:
    """Hash of what decides the latents besides the pixels: the model and the VAE."""
    vae = run.vae
    config = dict(getattr(vae, "config", {}) or {})
    for volatile in ("_name_or_path", "_diffusers_version", "_commit_hash"):
        config.pop(volatile, None)
    payload = {"model": model_identity(run.profile.model.name_or_path), "vae": type(vae).__name__, "config": config}
    single = sources.source_identity(getattr(run, "source", None), "vae")
    if single:  # [model] vae = a single file: keyed by that file, not name_or_path
        payload["model"] = single
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(spec: str) -> object:
    """A local model by the content of its ``vae/`` files (name -> hash), so
    a moved or copied model keeps its cache; a hub id by its name."""
    from wantrain.data import file_hash

    vae_dir = Path(spec).expanduser() / "vae"
    if not vae_dir.is_dir():
        return spec
    return {p.relative_to(vae_dir).as_posix(): file_hash(str(p)) for p in sorted(vae_dir.rglob("*")) if p.is_file()}


class LatentStore:
    """Latents on disk, one safetensors file per (VAE, sample variant)."""

    def __init__(self, folder: Path, identity: str, dtype: torch.dtype = torch.float32):
        self.folder, self.identity, self.dtype = Path(folder), identity, dtype

    def path(self, data_key: str) -> Path:
        name = hashlib.sha256(f"{self.identity}:{data_key}".encode()).hexdigest()[:48]
        return self.folder / f"{name}.safetensors"

    def get(self, data_key: str) -> torch.Tensor | None:
        """The latents, or None when missing, unreadable or not what the name says
        (such a file is deleted so that it is encoded again)."""
        path = self.path(data_key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                latents = fh.get_tensor("latents")
            if meta.get("format") != FORMAT or meta.get("data_key") != data_key or meta.get("identity") != self.identity:
                raise ValueError("metadata does not match")
            return latents.to(torch.float32)
        except Exception as exc:  # noqa: BLE001 - any damage means: encode again
            log.warning("latent_cache: stale or damaged entry %s (%s); encoding it again", path.name, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, data_key: str, latents: torch.Tensor, source: str, file_hash: str) -> Path:
        path = self.path(data_key)
        meta = {"format": FORMAT, "data_key": data_key, "identity": self.identity, "source": source, "file_hash": file_hash}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return write_atomic({"latents": latents.detach().to("cpu", self.dtype)}, path, meta)
        except OSError as exc:
            raise cannot_write(self.folder, exc) from None

    def prune_stale(self, current: dict[str, str]) -> int:
        """Delete damaged entries and entries whose source file (a key of
        ``current``) now has another content hash (the value). Entries of
        other files and other settings stay. Returns how many were deleted."""
        removed = 0
        for path in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else ():
            if _stale(path, current):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise cannot_write(self.folder, exc) from None
                removed += 1
        return removed


def cannot_write(folder: Path, exc: OSError) -> WantrainError:
    """A read-only dataset folder or a full disk: the user's to fix, in one line."""
    reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc)).lower()
    return WantrainError(ProfileProblem("plugins.latent_cache.folder", f"cannot write the latent cache ({reason})", str(folder),
                                        "free space, or set [plugins.latent_cache] folder to a writable place with room"))


def _stale(path: Path, current: dict[str, str]) -> bool:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - damaged
        return True
    if meta.get("format") != FORMAT:  # an older version of ours: encoded again; not ours: left alone
        return str(meta.get("format", "")).startswith("wantrain-latents-")
    source = meta.get("source")
    return source in current and current[source] != meta.get("file_hash")


# ---------------------------------------------------------------- filling the cache


@attrs.define
class FillStats:
    reused: int = 0
    encoded: int = 0
    failed: list[tuple[int, str, str]] = attrs.Factory(list)  # (dataset, path, reason)


def fill(stores: dict[int, LatentStore], specs: Iterable, load: Callable, encode: Callable[[torch.Tensor], torch.Tensor],
         file_hash: Callable[[str], str], progress: Callable[[int, int], None] = lambda done, total: None,
         key: Callable = lambda spec: spec.cache_key()) -> FillStats:
    """Encode every spec whose latents are missing. ``load(spec)`` gives
    pixels ``[3, F, H, W]`` (MediaError for a bad file); ``encode`` maps
    pixels ``[1, 3, F, H, W]`` to latents ``[1, 16, F', h, w]``;
    ``progress(done, total)`` is told after every spec; ``key(spec)`` is the
    entry's data key (condition latents add their own suffix)."""
    stats = FillStats()
    bad: set[str] = set()
    specs = list(specs)
    progress(0, len(specs))
    for done, spec in enumerate(specs, 1):
        if done > 1:
            progress(done - 1, len(specs))
        if spec.path in bad:
            continue
        store, data_key = stores[spec.dataset], key(spec)
        if store.get(data_key) is not None:
            stats.reused += 1
            continue
        try:
            pixels = load(spec)
        except (MediaError, OSError) as exc:
            bad.add(spec.path)
            stats.failed.append((spec.dataset, spec.path, str(exc)))
            continue
        with torch.no_grad():
            latents = encode(pixels[None])[0]
        store.put(data_key, latents, spec.path, file_hash(spec.path))
        stats.encoded += 1
    if specs:
        progress(len(specs), len(specs))
    return stats


def cached_datasets(profile) -> list[int]:
    return [i for i, ds in enumerate(profile.datasets) if ds.cache_latents]


def make_stores(config: Config, profile, data, identity: str) -> dict[int, LatentStore]:
    dtype = DTYPES[config.dtype]
    stores = {}
    for ds in data.datasets:
        if ds.config.cache_latents:
            folder = profile.resolve_path(config.folder) if config.folder else Path(ds.folder) / CACHE_DIR
            stores[ds.index] = LatentStore(folder, identity, dtype)
    return stores


# ---------------------------------------------------------------- the plugin


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    if profile.datasets and not cached_datasets(profile):
        return [ProfileProblem("plugins.latent_cache", "is enabled but no dataset sets cache_latents = true",
                               fix="add cache_latents = true to the [[datasets]] to cache, or disable latent_cache")]
    return []


class Plugin:
    def __init__(self, config: Config | None = None):
        self.config = config or Config()
        self.stores: dict[int, LatentStore] = {}

    @hookimpl
    def estimate_memory(self):
        return {"latents_cached": True, "note": "latents cached before training; the VAE leaves the GPU"}

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @hookimpl
    def on_run_start(self, run: Run):
        from wantrain import data as wdata, model

        self.stores = make_stores(self.config, run.profile, run.data, vae_identity(run))
        current = {item.path: wdata.file_hash(item.path) for ds in run.data.datasets if ds.index in self.stores for item in ds.items}
        removed = sum(store.prune_stale(current) for store in {id(s): s for s in self.stores.values()}.values()) if not distributed.rank() else 0
        distributed.barrier()  # torchrun: rank 0 pruned; then each rank encodes its share into the same folder
        items = distributed.my_share(list(run.data.iter_items()))
        stats = fill(self.stores, items, run.data.load, lambda px: model.encode_pixels(run.vae, px), wdata.file_hash,
                     lambda done, total: run.pm.hook.on_progress(run=run, task="caching latents", done=done, total=total))
        if run.arch.takes_start_frame:
            more = fill(self.stores, items, lambda spec: self.condition_pixels(run, spec),
                        lambda px: model.encode_pixels(run.vae, px), wdata.file_hash,
                        lambda done, total: run.pm.hook.on_progress(run=run, task="caching start frames", done=done, total=total),
                        key=lambda spec: self.condition_key(run, spec))
            stats.reused, stats.encoded, stats.failed = stats.reused + more.reused, stats.encoded + more.encoded, stats.failed + more.failed
        stats.failed = distributed.merged(stats.failed)  # every rank excludes every bad file (and waits for the others)
        for dataset, path, reason in stats.failed:
            run.data.exclude(dataset, path, reason)
        run.data.skip_pixels(list(self.stores))
        log.info("latent_cache: %d latents reused, %d encoded, %d stale removed, %d files skipped",
                 stats.reused, stats.encoded, removed, len(stats.failed))
        if len(self.stores) == len(run.data.datasets) and run.vae is not None:
            run.vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("latent_cache: every dataset is cached; the VAE left %s", run.device)

    @staticmethod
    def condition_key(run: Run, spec, video_key: str | None = None) -> str:
        """``video_key``: the sample's cache key when the batch has it (else a stat + hash of the file)."""
        return f"{video_key or spec.cache_key()}:condition:{run.arch.start_frame}:last={run.profile.model.last_frame}"

    @staticmethod
    def condition_pixels(run: Run, spec, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The condition video ``[3, F, H, W]`` of one sample (the kernel's layout)."""
        from wantrain.archs.condition import condition_video

        first, last = run.data.load_condition(spec, pixels)
        return condition_video(run.arch, first[None], None if last is None else last[None], len(spec.indices))[0]

    @hookimpl
    def encode_condition(self, run: Run, batch):
        if not self.stores or any(d not in self.stores for d in batch.dataset_index):
            return None
        from wantrain import data as wdata, model

        out = []
        for spec, video_key in zip(batch.specs, batch.cache_keys):  # the keys the loader made: once per sample
            key = self.condition_key(run, spec, video_key)
            latents = self.stores[spec.dataset].get(key)
            if latents is None:  # deleted mid-run: encode it now
                with torch.no_grad():
                    latents = model.encode_pixels(run.vae, self.condition_pixels(run, spec)[None])[0].cpu()
                self.stores[spec.dataset].put(key, latents, spec.path, wdata.file_hash(spec.path))
            out.append(latents)
        return torch.stack(out).to(run.device)

    @hookimpl
    def encode_videos(self, run: Run, batch):
        if not self.stores or any(d not in self.stores for d in batch.dataset_index):
            return None
        from wantrain import data as wdata, model

        out = []
        for spec, key in zip(batch.specs, batch.cache_keys):
            latents = self.stores[spec.dataset].get(key)
            if latents is None:  # deleted mid-run: encode it now, wherever the VAE is
                pixels = batch.pixels[len(out)] if batch.pixels is not None else run.data.load(spec)
                with torch.no_grad():
                    latents = model.encode_pixels(run.vae, pixels[None])[0].cpu()
                self.stores[spec.dataset].put(key, latents, spec.path, wdata.file_hash(spec.path))
            out.append(latents)
        return torch.stack(out).to(run.device)


@hookimpl
def memory_remedies(memory):
    from wantrain.commands.estimate import Remedy

    if memory.latents_cached:
        return []
    return [Remedy(20, 'enable the "latent_cache" plugin and cache_latents = true (VAE off the GPU)', {"latents_cached": True})]
