"""Loading: a planned batch -> pixels and captions; the object the loop holds.

:class:`SampleSpec` is everything that decides one sample's pixels (path,
bucket, source frames, flips) and hashes to its :meth:`~SampleSpec.cache_key`.
:class:`BatchLoader` turns a planned batch into a :class:`Batch` (decode,
cover-resize, centre crop, flip, captions), in the main process or in
DataLoader workers -- the order is the same either way; a file that fails is
replaced by the next item of its group and reported. :class:`TrainData` is
what the loop holds: batches, the resumable position, and a few methods for
plugins that store per-sample results. :func:`build_train_data` scans a
profile and returns it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator, Sequence

import attrs
import numpy as np
import torch
from PIL import Image

from ..errors import DataError, ProfileProblem
from ..profile import Profile
from . import media
from .buckets import crop_box
from .captions import final_caption
from .frames import frame_plan, window_starts
from .media import MediaError
from .plan import STATE_VERSION, BatchPlan, Draw, Planner, _start_state
from .report import DatasetReport
from .scan import ScannedDataset, scan_profile

log = logging.getLogger("wantrain.data")

CACHE_KEY_VERSION = 1


@attrs.frozen(kw_only=True)
class SampleSpec:
    """Everything that decides one sample's pixels (and so its latents)."""

    dataset: int
    unit: int
    path: str
    kind: str
    bucket: tuple[int, int]  # (width, height)
    indices: tuple[int, ...]  # source frames
    flip_x: bool
    flip_y: bool
    #: image-to-video: the override start / last images (None: the clip's own frames)
    start: str | None = None
    last: str | None = None

    def cache_key(self) -> str:
        """Hash of the file's content and every setting that changes the
        latent: bucket, source frame indices (so num_frames, sampling mode
        and window), flips."""
        payload = {"v": CACHE_KEY_VERSION, "file": file_hash(self.path), "kind": self.kind, "bucket": list(self.bucket),
                   "frames": list(self.indices), "flip": [self.flip_x, self.flip_y]}
        for name in ("start", "last"):  # only when present: text-to-video keys stay as they were
            if getattr(self, name):
                payload[name] = file_hash(getattr(self, name))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str) -> str:
    """blake2b of the file's bytes, memoised per (path, size, mtime)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def make_spec(ds: ScannedDataset, unit_id: int, draw: Draw) -> SampleSpec:
    unit = ds.units[unit_id]
    item = ds.items[unit.item]
    return SampleSpec(dataset=ds.index, unit=unit_id, path=item.path, kind=item.kind, bucket=(unit.width, unit.height),
                      indices=frame_plan(item, ds.config, draw.window, ds.cached), flip_x=draw.flip_x, flip_y=draw.flip_y,
                      start=item.start if ds.start_frames else None, last=item.last if ds.last_frame else None)


def resize_crop(frame: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Cover-resize then centre crop one RGB frame to ``bucket`` (w, h)."""
    height, width = frame.shape[:2]
    if (width, height) == tuple(bucket):
        return frame
    box = crop_box(width, height, bucket)
    return np.asarray(Image.fromarray(frame).resize(tuple(bucket), Image.Resampling.BICUBIC, box=box))


def load_pixels(spec: SampleSpec, image: str | None = None) -> torch.Tensor:
    """Decode, resize, crop and flip one sample: float32 ``[3, F, H, W]`` in
    [-1, 1] (``image``: that image instead, at the sample's bucket and flips)."""
    if spec.kind == "image" or image:
        frames = media.read_image(image or spec.path, min_size=spec.bucket)[None]
    else:
        frames = media.read_frames(spec.path, spec.indices)
    width, height = spec.bucket
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = resize_crop(frame, spec.bucket)
    if spec.flip_x:
        out = out[:, :, ::-1]
    if spec.flip_y:
        out = out[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(out)).permute(3, 0, 1, 2)
    return pixels.to(torch.float32) / 127.5 - 1.0


def condition_frames(spec: SampleSpec, pixels: torch.Tensor, last_frame: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image-to-video: the start frame ``[3, H, W]`` of a sample -- its
    override image, else the sample's own first frame -- and, with
    ``last_frame``, its last frame likewise (else None)."""
    first = load_pixels(spec, spec.start)[:, 0] if spec.start else pixels[:, 0]
    last = (load_pixels(spec, spec.last)[:, 0] if spec.last else pixels[:, -1]) if last_frame else None
    return first, last


@attrs.frozen(kw_only=True)
class Batch:
    """One batch: every sample from one dataset, one bucket, one frame count."""

    pixels: torch.Tensor | None  # float32 [B, 3, F, H, W] in [-1, 1]; None when latents come from a cache
    captions: list[str]  # final captions ("" when dropped)
    templates: list[str | None]  # captions before trigger substitution ("[trigger]" in), None when dropped
    paths: list[str]
    cache_keys: list[str]
    is_regularization: list[bool]
    dataset_index: list[int]
    specs: tuple[SampleSpec, ...] = ()  # what each sample is, to load it again (a plugin's store misses)
    #: prior preservation: a regularization dataset's ``prior_loss_weight`` (None for other datasets)
    prior_loss_weight: float | None = None
    #: image-to-video archs, with pixels: each sample's start (last) frame ``[B, 3, H, W]``
    start: torch.Tensor | None = None
    last: torch.Tensor | None = None
    #: data parallel: (first item of this rank in the global batch, its size, this rank's loss weight); None alone
    share: tuple[int, int, float] | None = None

    def __len__(self) -> int:
        return len(self.paths)


@attrs.frozen
class _Loaded:
    plan: BatchPlan
    batch: Batch
    failures: tuple[tuple[int, str, str], ...]  # (dataset, path, reason)


class BatchLoader(torch.utils.data.Dataset):
    """Turns a :class:`BatchPlan` into a :class:`Batch` (in workers or not).

    An item that fails to load is replaced by the next item of the same
    (bucket, frames) group, deterministically, and reported."""

    def __init__(self, datasets: Sequence[ScannedDataset], trigger_word: str | None, skip_pixels: frozenset[int], excluded: dict[str, str]):
        self.datasets, self.trigger_word = datasets, trigger_word
        self.skip_pixels, self.excluded = skip_pixels, dict(excluded)
        self._bad: dict[str, str] = {}  # files found bad in this process

    def __getitem__(self, plan: BatchPlan) -> _Loaded:
        ds = self.datasets[plan.dataset]
        failures: list[tuple[int, str, str]] = []
        samples = [self._sample(ds, unit, draw, failures) for unit, draw in zip(plan.units, plan.draws)]
        pixels = None if ds.index in self.skip_pixels else torch.stack([s[0] for s in samples])
        start = last = None
        if ds.start_frames and pixels is not None:
            frames = [condition_frames(s[1], s[0], ds.last_frame) for s in samples]
            start = torch.stack([f[0] for f in frames])
            last = torch.stack([f[1] for f in frames]) if ds.last_frame else None
        batch = Batch(
            start=start,
            last=last,
            pixels=pixels,
            captions=[final_caption(s[2], self.trigger_word) if s[2] is not None else "" for s in samples],
            templates=[s[2] for s in samples],
            paths=[s[1].path for s in samples],
            cache_keys=[s[1].cache_key() for s in samples],
            is_regularization=[ds.config.is_regularization] * len(samples),
            dataset_index=[ds.index] * len(samples),
            specs=tuple(s[1] for s in samples),
            prior_loss_weight=ds.config.prior_loss_weight if ds.config.is_regularization else None,
            share=plan.share,
        )
        return _Loaded(plan, batch, tuple(failures))

    def _sample(self, ds: ScannedDataset, unit_id: int, draw: Draw, failures: list) -> tuple:
        for candidate in _substitutes(ds, unit_id):
            spec = make_spec(ds, candidate, draw)
            reason = self.excluded.get(spec.path) or self._bad.get(spec.path)
            if reason is None:
                try:
                    pixels = None if ds.index in self.skip_pixels else load_pixels(spec)
                except (MediaError, OSError) as exc:
                    reason = self._bad[spec.path] = str(exc) if isinstance(exc, MediaError) else f"cannot read the file ({exc})"
                    failures.append((ds.index, spec.path, reason))
                    continue
                template = None if draw.drop_caption else ds.items[ds.units[candidate].item].template
                return pixels, spec, template
        raise DataError(ProfileProblem(f"datasets[{ds.index}]", f"every item of bucket {ds.units[unit_id].key} failed to load", ds.folder, "see the skip warnings above"))


def _substitutes(ds: ScannedDataset, unit_id: int) -> list[int]:
    """``unit_id`` first, then the rest of its group in a fixed rotation."""
    for group in ds.groups:
        if unit_id in group:
            at = group.index(unit_id)
            return list(group[at:]) + list(group[:at])
    return [unit_id]


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------
# the object the loop holds


class TrainData:
    """Batches for training, deterministic from the seed, restorable.

    ``num_workers > 0`` decodes in a torch DataLoader (``prefetch`` batches per
    worker ahead) in exactly the order ``num_workers = 0`` gives."""

    def __init__(self, datasets: Sequence[ScannedDataset], report: DatasetReport, *, seed: int, trigger_word: str | None,
                 num_workers: int = 0, prefetch: int = 2, shard: tuple[int, int] = (0, 1)):
        self.datasets, self.report, self.seed = tuple(datasets), report, seed
        #: data parallel: (rank, world size); batches are planned globally (world x batch_size) and sliced
        self.rank, self.world = shard
        self.trigger_word, self.num_workers, self.prefetch = trigger_word, num_workers, prefetch
        self._position = _start_state(len(self.datasets), 0)
        self._skip_pixels: set[int] = set()
        self._excluded: dict[str, str] = {}
        self._iter: Iterator[_Loaded] | None = None
        self._batch_size = 0

    # ------------------------------------------------------------- batches

    def next_batch(self, batch_size: int) -> Batch:
        if self._iter is None or batch_size != self._batch_size:
            self._restart(batch_size)
        loaded = next(self._iter)
        for dataset, path, reason in loaded.failures:
            self.report.record_skip(dataset, path, reason)
        self._position = loaded.plan.state_after
        return loaded.batch

    def _restart(self, batch_size: int) -> None:
        self._stop()
        if self._position["batch_size"] != batch_size * self.world:
            self._position = _rebatch(self._position, batch_size * self.world)
        planner = Planner(self.datasets, self.seed, self._position)
        plans = planner if self.world == 1 else _RankShare(planner, self.rank, self.world)
        loader = BatchLoader(self.datasets, self.trigger_word, frozenset(self._skip_pixels), self._excluded)
        if self.num_workers <= 0:
            self._iter = (loader[plan] for plan in plans)
        else:
            self._iter = iter(torch.utils.data.DataLoader(
                loader, batch_size=None, sampler=plans, num_workers=self.num_workers, collate_fn=_identity,
                prefetch_factor=self.prefetch, worker_init_fn=_worker_init))
        self._batch_size = batch_size

    def _stop(self) -> None:
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iter = None

    def close(self) -> None:
        self._stop()

    # ------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """The position after the last batch returned (JSON-serialisable)."""
        extra = {"world_size": self.world} if self.world > 1 else {}  # one process: the state as it always was
        return {**json.loads(json.dumps(self._position)), "seed": self.seed, "fingerprint": self.fingerprint(), **extra}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or len(state.get("datasets", ())) != len(self.datasets):
            raise DataError(ProfileProblem("resume", "data position does not match this profile's datasets", fix="resume with the profile the checkpoint was made with"))
        if state.get("fingerprint") not in (None, self.fingerprint()) or state.get("seed", self.seed) != self.seed:
            log.warning("the datasets or seed changed since the checkpoint: the data order will differ from the original run")
        self._stop()
        self._position = {k: json.loads(json.dumps(state[k])) for k in ("version", "batch_size", "step", "datasets")}

    def fingerprint(self) -> str:
        text = json.dumps([[ds.config.repeats, ds.config.weight, [i.path for i in ds.items], [attrs.astuple(u) for u in ds.units]] for ds in self.datasets])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ------------------------------------------------------------- for plugins
    # For plugins that store per-sample results (a dataset with
    # cache_latents = true draws only from a finite set of sample variants,
    # so each can be computed once and stored): list the variants, load one,
    # stop decoding what is stored, drop files that failed. Call them before
    # training starts to keep runs reproducible.

    def iter_items(self) -> Iterator[SampleSpec]:
        """Every sample variant a dataset with ``cache_latents = true`` can
        produce: each unit x each cached "fps" window x each flip."""
        for ds in self.datasets:
            if not ds.config.cache_latents:
                continue
            for unit_id, unit in enumerate(ds.units):
                yield from _variants(ds, unit_id)

    def load(self, spec: SampleSpec) -> torch.Tensor:
        """Pixels ``[3, F, H, W]`` of one sample (MediaError when it is bad)."""
        return load_pixels(spec)

    def load_condition(self, spec: SampleSpec, pixels: torch.Tensor | None = None,
                       last_frame: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image-to-video: the start (and last) frame ``[3, H, W]`` of one
        sample, from its override images or its own frames (``last_frame``:
        default, the sample's dataset's setting)."""
        if last_frame is None:
            last_frame = next(ds.last_frame for ds in self.datasets if ds.index == spec.dataset)
        if pixels is None and not (spec.start and (spec.last or not last_frame)):
            pixels = load_pixels(spec)
        return condition_frames(spec, pixels, last_frame)

    def skip_pixels(self, datasets: Sequence[int]) -> None:
        """Stop decoding pixels for these datasets (a plugin supplies their
        latents); their batches then have ``pixels = None``."""
        self._skip_pixels |= set(datasets)
        self._stop()

    def exclude(self, dataset: int, path: str, reason: str) -> None:
        """Treat ``path`` as bad from now on (replaced like a file that fails
        to load); call before training starts to keep runs reproducible."""
        self._excluded[path] = reason
        self.report.record_skip(dataset, path, reason)
        self._stop()

    def __len__(self) -> int:
        return sum(len(ds.items) for ds in self.datasets)


def _rebatch(state: dict, batch_size: int) -> dict:
    """A new batch size starts a fresh epoch in every dataset that is mid-epoch."""
    out = json.loads(json.dumps(state))
    out["batch_size"] = batch_size
    for pos in out["datasets"]:
        if pos["cursor"] > 0:
            pos["epoch"], pos["cursor"] = pos["epoch"] + 1, 0
    return out


def _variants(ds: ScannedDataset, unit_id: int) -> Iterator[SampleSpec]:
    cfg = ds.config
    item = ds.items[ds.units[unit_id].item]
    windows = len(window_starts(item, cfg.num_frames)) if item.kind == "video" and cfg.frame_sampling == "fps" else 1
    for w in range(windows):
        for flip_x in (False, True) if cfg.flip_x else (False,):
            for flip_y in (False, True) if cfg.flip_y else (False,):
                draw = Draw(window=(w + 0.5) / windows, flip_x=flip_x, flip_y=flip_y, drop_caption=False)
                yield make_spec(ds, unit_id, draw)


class _RankShare:
    """The planner's global batches, each cut to this rank's share (``wantrain.distributed.data``)."""

    def __init__(self, planner: Planner, rank: int, world: int):
        self.planner, self.rank, self.world = planner, rank, world

    def __iter__(self) -> Iterator[BatchPlan]:
        from ..distributed.data import slice_plan

        return (slice_plan(plan, self.rank, self.world) for plan in self.planner)


def build_train_data(profile: Profile, *, seed: int, num_workers: int = 0) -> TrainData:
    """Scan every dataset of ``profile`` (no model needed) and return the
    batch source. Raises DataError with every problem at once: a missing
    folder, a dataset with no usable item, ``[trigger]`` without a trigger word."""
    datasets, report, problems = scan_profile(profile)
    if problems:
        raise DataError(problems)
    datasets = [ds for ds in datasets if ds.config.role == "train"]  # "held_out" datasets are for plugins to measure
    if not datasets:
        raise DataError(ProfileProblem("datasets", 'has no dataset to train on: every one is role = "held_out"',
                                       fix='give at least one dataset role = "train" (the default)'))
    from ..distributed import data_rank, data_world

    return TrainData(datasets, report, seed=seed, trigger_word=profile.job.trigger_word, num_workers=num_workers,
                     shard=(data_rank(), data_world()))
