"""Datasets: scan folders, assign buckets, plan frames, build captions, load batches.

What happens, once, when a run starts (:func:`build_train_data`, no model
needed):

1. every ``[[datasets]]`` folder is scanned (recursively, dot-folders
   skipped); each image or clip is probed cheaply (header, first frame, last
   packet) and either kept as an :class:`Item` or skipped with one warning
   ``skip <path>: <reason>`` counted in the :class:`DatasetReport`;
2. each item gets one bucket per resolution (:func:`bucket_for`) and a frame
   count (``num_frames`` for clips, 1 for still images);
3. captions are read and turned into *templates* (``[trigger]`` still in).

Then, per batch, a deterministic planner picks a dataset (by ``weight``), the
next batch of that dataset's shuffled epoch (one bucket, one frame count) and
each sample's random choices (fps window, flips, caption dropout) -- all from
``numpy`` seed sequences keyed by (seed, dataset, epoch, batch, slot), never
from global RNG. Loading (decode, cover-resize, centre crop, flip) runs in
the main process or in DataLoader workers; the order is the same either way
and the position is a small JSON dict (:meth:`TrainData.state_dict`).

``docs/data.md`` explains every rule and decision for users.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch
from PIL import Image

from . import media
from .errors import DataError, ProfileProblem, WantrainError
from .media import MediaError
from .profile import DatasetConfig, Profile

log = logging.getLogger("wantrain.data")

MODEL_FPS = 16  # Wan 2.2 generates 16 fps video
TRIGGER = "[trigger]"
MAX_CACHED_WINDOWS = 8  # "fps" windows per clip when its latents are cached
SPEED_LIMIT = 2.0  # warn when "uniform" plays a clip faster/slower than this
STATE_VERSION = 1
CACHE_KEY_VERSION = 1
# seed-sequence purposes (changing one changes every run's data order)
_ORDER, _SAMPLE, _MIX = 1, 2, 3


# --------------------------------------------------------------------------
# items, buckets, frame plans


@attrs.frozen(kw_only=True)
class Item:
    """One usable image or clip of a dataset."""

    path: str
    kind: str  # "image" | "video"
    width: int  # as displayed (EXIF / display-matrix rotation applied)
    height: int
    num_frames: int  # source frames; 1 for an image
    fps: float  # source frame rate; 0.0 for an image
    template: str  # caption before trigger substitution ("[trigger]" in it)


@attrs.frozen(kw_only=True)
class Unit:
    """An item at one resolution: what a batch slot holds."""

    item: int
    resolution: int
    width: int  # bucket width
    height: int  # bucket height
    frames: int  # frames per sample (1 for images)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.frames)


def bucket_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket (w, h) of an item of native size ``width x height`` at
    ``resolution``: sides multiples of 16, area <= resolution^2, never larger
    than the item on either side (no upscaling); among those, for each width
    the tallest height, and of these the one whose aspect ratio is closest
    (in log space) to the item's; ties go to the larger area."""
    limit = resolution * resolution
    aspect = width / height
    best: tuple[tuple[float, int], tuple[int, int]] | None = None
    for bw in range(16, min(width, limit // 16) + 1, 16):
        bh = min(limit // bw, height) // 16 * 16
        if bh < 16:
            continue
        score = (abs(math.log(bw / bh / aspect)), -bw * bh)
        if best is None or score < best[0]:
            best = (score, (bw, bh))
    if best is None:
        raise MediaError(f"too small: {width}x{height} has a side below 16 px")
    return best[1]


def needs_upscaling(width: int, height: int, resolution: int) -> bool:
    """True when the item is too small to fill the bucket a large item of the
    same shape would get at ``resolution`` (so it trains smaller)."""
    scale = math.ceil(2 * resolution / min(width, height))
    big = bucket_for(width * scale, height * scale, resolution)
    small = bucket_for(width, height, resolution)
    return small[0] * small[1] < big[0] * big[1]


def crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """Source box (left, top, right, bottom) of a cover-resize + centre crop."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    cw, ch = bw / scale, bh / scale
    left, top = (width - cw) / 2, (height - ch) / 2
    return (left, top, left + cw, top + ch)


def uniform_indices(num_source: int, frames: int) -> tuple[int, ...]:
    """``frames`` indices spread over the whole clip, first and last included:
    ``i_k = round(k * (N - 1) / (F - 1))``; one frame -> the middle one."""
    if frames == 1:
        return ((num_source - 1) // 2,)
    den = frames - 1
    return tuple((2 * k * (num_source - 1) + den) // (2 * den) for k in range(frames))


def fps_span(item: Item, frames: int) -> float:
    """Seconds of freedom for an "fps" window's start (negative: too short)."""
    return (item.num_frames - 1) / item.fps - (frames - 1) / MODEL_FPS


def fps_indices(item: Item, frames: int, start: float) -> tuple[int, ...]:
    """Frames at 16 fps from ``start`` seconds: ``i_k = round((s + k/16) * fps)``."""
    last = item.num_frames - 1
    return tuple(min(last, int(round((start + k / MODEL_FPS) * item.fps))) for k in range(frames))


def window_starts(item: Item, frames: int) -> tuple[float, ...]:
    """The fixed "fps" window starts used when latents are cached: evenly
    spaced over the clip, half a window apart, at most MAX_CACHED_WINDOWS."""
    span = max(0.0, fps_span(item, frames))
    step = max((frames - 1) / MODEL_FPS / 2, 1 / MODEL_FPS)
    count = min(MAX_CACHED_WINDOWS, 1 + math.ceil(span / step - 1e-9))
    if count == 1:
        return (0.0,)
    return tuple(span * k / (count - 1) for k in range(count))


def frame_plan(item: Item, cfg: DatasetConfig, window: float, cached: bool) -> tuple[int, ...]:
    """Source frame indices of one sample. ``window`` in [0, 1) picks the
    "fps" window (continuous, or one of :func:`window_starts` when cached)."""
    if item.kind == "image":
        return (0,)
    if cfg.frame_sampling == "uniform":
        return uniform_indices(item.num_frames, cfg.num_frames)
    if cached:
        starts = window_starts(item, cfg.num_frames)
        return fps_indices(item, cfg.num_frames, starts[min(int(window * len(starts)), len(starts) - 1)])
    return fps_indices(item, cfg.num_frames, window * max(0.0, fps_span(item, cfg.num_frames)))


def frames_for(item: Item, cfg: DatasetConfig) -> int:
    """Frames per sample: a still image is always a one-frame sample."""
    return 1 if item.kind == "image" else cfg.num_frames


def too_short(item: Item, cfg: DatasetConfig) -> str | None:
    frames = frames_for(item, cfg)
    if frames == 1:
        return None
    if cfg.frame_sampling == "uniform" and item.num_frames < frames:
        return f"too short: {item.num_frames} frames, num_frames = {frames} needs at least {frames}"
    if cfg.frame_sampling == "fps" and fps_span(item, frames) < -1e-9:
        have = (item.num_frames - 1) / item.fps
        need = (frames - 1) / MODEL_FPS
        return f"too short: {have:.2f} s, {frames} frames at {MODEL_FPS} fps need {need:.2f} s"
    return None


def timing_warning(item: Item, cfg: DatasetConfig) -> str | None:
    frames = frames_for(item, cfg)
    if frames == 1:
        return None
    if cfg.frame_sampling == "fps":
        if item.fps < MODEL_FPS - 0.5:
            return f"source is {item.fps:g} fps, below the model's {MODEL_FPS}: some frames repeat"
        return None
    speed = ((item.num_frames - 1) / item.fps) / ((frames - 1) / MODEL_FPS)
    if speed > SPEED_LIMIT or speed < 1 / SPEED_LIMIT:
        how = "speeds this clip up" if speed > 1 else "slows this clip down"
        return (f"uniform sampling {how} {max(speed, 1 / speed):.1f}x ({frames} frames over "
                f"{(item.num_frames - 1) / item.fps:.1f} s); use frame_sampling = \"fps\" to keep real motion speed")
    return None


# --------------------------------------------------------------------------
# captions


def read_caption(media_path: Path, cfg: DatasetConfig) -> str | None:
    """The same-stem caption file's text (whitespace collapsed), None if
    missing or empty; raises MediaError when it is not UTF-8."""
    path = media_path.with_name(media_path.stem + "." + cfg.caption_ext.lstrip("."))
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MediaError(f"caption {path.name} is not UTF-8 text; save it as UTF-8") from None
    text = " ".join(text.split())
    return text or None


def caption_template(text: str, trigger_word: str | None, is_regularization: bool) -> str:
    """The caption with ``[trigger]`` where the trigger word goes.

    ``[trigger]`` (any case) is kept as the placeholder; with a trigger word
    set, a caption that spells the word literally gets it replaced by the
    placeholder, and a non-regularization caption that has neither gets
    ``"[trigger], "`` prepended. Regularization captions never get one added.
    """
    text = re.sub(r"\[trigger\]", TRIGGER, text, flags=re.IGNORECASE)
    if trigger_word and TRIGGER not in text:
        literal = re.compile(rf"(?<!\w){re.escape(trigger_word)}(?!\w)")
        text = literal.sub(TRIGGER, text)
        if TRIGGER not in text and not is_regularization:
            text = f"{TRIGGER}, {text}" if text else TRIGGER
    return text


def final_caption(template: str, trigger_word: str | None) -> str:
    return template.replace(TRIGGER, trigger_word or "")


# --------------------------------------------------------------------------
# the report


@attrs.define
class DatasetSummary:
    """What a scan found in one dataset (and what loading found later)."""

    index: int
    folder: str
    num_frames: int
    frame_sampling: str
    videos: int = 0
    images: int = 0
    ignored: int = 0  # files of other types (captions excluded)
    skipped: list[tuple[str, str]] = attrs.Factory(list)
    warnings: list[tuple[str, str]] = attrs.Factory(list)
    converted: list[tuple[str, str]] = attrs.Factory(list)
    buckets: dict[str, int] = attrs.Factory(dict)  # "512: 96x64 x33" -> items
    captions: list[tuple[str, str]] = attrs.Factory(list)  # a preview

    @property
    def items(self) -> int:
        return self.videos + self.images

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "folder": self.folder,
            "items": self.items,
            "videos": self.videos,
            "images": self.images,
            "num_frames": self.num_frames,
            "frame_sampling": self.frame_sampling,
            "ignored_files": self.ignored,
            "buckets": [_bucket_dict(name, n) for name, n in sorted(self.buckets.items(), key=_bucket_order)],
            "captions": [{"file": f, "caption": c} for f, c in self.captions],
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            "warnings": [{"file": f, "warning": w} for f, w in self.warnings],
            "converted": [{"file": f, "conversion": c} for f, c in self.converted],
        }


def _bucket_name(resolution: int, unit: Unit) -> str:
    return f"{resolution}: {unit.width}x{unit.height} x{unit.frames}"


def _bucket_order(entry: tuple[str, int]) -> tuple[int, ...]:
    d = _bucket_dict(*entry)
    return (d["resolution"], d["frames"], d["width"], d["height"])


def _bucket_dict(name: str, count: int) -> dict[str, int]:
    resolution, rest = name.split(": ")
    size, frames = rest.split(" x")
    width, height = size.split("x")
    return {"resolution": int(resolution), "width": int(width), "height": int(height), "frames": int(frames), "items": count}


@attrs.define
class DatasetReport:
    datasets: list[DatasetSummary] = attrs.Factory(list)

    def record_skip(self, dataset: int, path: str, reason: str) -> bool:
        """Count a file that failed while loading; False if already counted."""
        summary = self.datasets[dataset]
        if any(f == path for f, _ in summary.skipped):
            return False
        summary.skipped.append((path, reason))
        log.warning("skip %s: %s", path, reason)
        return True

    def lines(self) -> list[str]:
        out = []
        for s in self.datasets:
            out.append(f"dataset {s.index}: {s.folder} -- {s.items} items ({s.videos} videos, {s.images} images), "
                       f"{len(s.skipped)} skipped, {len(s.warnings)} warnings, {len(s.converted)} converted; "
                       f"num_frames {s.num_frames} ({s.frame_sampling})")
            out += [f"  bucket {name}: {n} items" for name, n in sorted(s.buckets.items(), key=_bucket_order)]
            out += [f"  caption {Path(f).name}: {c!r}" for f, c in s.captions]
            out += [f"  skip {f}: {r}" for f, r in s.skipped]
            out += [f"  warning {f}: {w}" for f, w in s.warnings]
            out += [f"  convert {f}: {c}" for f, c in s.converted]
            if s.ignored:
                out.append(f"  ignored {s.ignored} files of other types")
        return out

    def as_dict(self) -> dict[str, Any]:
        sets = [s.as_dict() for s in self.datasets]
        totals = {k: sum(len(d[k]) if isinstance(d[k], list) else d[k] for d in sets) for k in ("items", "skipped", "warnings", "converted")}
        return {"datasets": sets, "totals": totals}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent, ensure_ascii=False)


# --------------------------------------------------------------------------
# scanning


@attrs.frozen(kw_only=True)
class ScannedDataset:
    """A dataset ready to sample: its items, units and (bucket, frames) groups."""

    index: int
    config: DatasetConfig
    folder: str
    items: tuple[Item, ...]
    units: tuple[Unit, ...]
    groups: tuple[tuple[int, ...], ...]  # unit ids per (w, h, frames), keys sorted
    cached: bool  # "fps" windows come from window_starts (latent cache)


def resolve_folder(folder: str, profile_source: str | None) -> Path:
    """Absolute as is; relative: from the current directory, or else from the
    profile's directory when it exists only there."""
    path = Path(folder).expanduser()
    if path.is_absolute() or path.exists() or not profile_source:
        return path
    beside = Path(profile_source).resolve().parent / path
    return beside if beside.exists() else path


def list_files(folder: Path, caption_ext: str) -> tuple[list[Path], int]:
    """Media files (sorted, dot-folders and caption files excluded) and the
    count of other files."""
    media_files, ignored = [], 0
    caption_suffix = "." + caption_ext.lstrip(".").lower()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            suffix = path.suffix.lower()
            if name.startswith(".") or suffix == caption_suffix:
                continue
            if suffix in media.MEDIA_EXTS:
                media_files.append(path)
            else:
                ignored += 1
    return sorted(media_files, key=lambda p: p.relative_to(folder).as_posix()), ignored


def probe_file(path: Path) -> tuple[str, int, int, int, float, list[str]]:
    """(kind, width, height, frames, fps, notes) or MediaError."""
    if path.stat().st_size == 0:
        raise MediaError("empty file (0 bytes)")
    claimed = media.kind_of(path)
    actual = media.sniff(path) or claimed  # unknown signature: let the decoder judge
    notes = [] if actual == claimed else [f"wrong extension: the content is a{'n' if actual == 'image' else ''} {actual}; read as one"]
    if actual == "image":
        info = media.probe_image(path)
        return "image", info.width, info.height, 1, 0.0, notes + list(info.notes)
    info = media.probe_video(path)
    if info.rotation:
        notes.append(f"rotated {info.rotation}° per its display matrix")
    return "video", info.width, info.height, info.num_frames, info.fps, notes


def scan_dataset(index: int, cfg: DatasetConfig, profile: Profile) -> tuple[ScannedDataset | None, DatasetSummary, list[ProfileProblem]]:
    """Scan one ``[[datasets]]`` entry: items, units, summary and problems."""
    where = f"datasets[{index}]"
    folder = resolve_folder(cfg.folder, profile.source)
    summary = DatasetSummary(index=index, folder=str(folder), num_frames=cfg.num_frames, frame_sampling=cfg.frame_sampling)
    if not folder.is_dir():
        fix = "check the path (relative paths start from the current directory)"
        what = "is not a folder" if folder.exists() else "folder not found"
        return None, summary, [ProfileProblem(f"{where}.folder", what, cfg.folder, fix)]
    files, summary.ignored = list_files(folder, cfg.caption_ext)
    items = [item for path in files if (item := _scan_file(path, cfg, profile, summary)) is not None]
    problems = _dataset_problems(where, cfg, profile, items, summary)
    if problems:
        return None, summary, problems
    scanned = _build_units(index, cfg, profile, str(folder), items, summary)
    return scanned, summary, []


def _scan_file(path: Path, cfg: DatasetConfig, profile: Profile, summary: DatasetSummary) -> Item | None:
    try:
        kind, width, height, count, fps, notes = probe_file(path)
        text = read_caption(path, cfg)
    except MediaError as exc:
        return _skip(summary, path, str(exc))
    except OSError as exc:
        return _skip(summary, path, f"cannot read the file ({exc.strerror or exc})")
    template = caption_template(text if text is not None else (cfg.default_caption or ""), profile.job.trigger_word, cfg.is_regularization)
    item = Item(path=str(path), kind=kind, width=width, height=height, num_frames=count, fps=fps, template=template)
    reason = too_short(item, cfg)
    if reason is None and min(width, height) < 16:
        reason = f"too small: {width}x{height} has a side below 16 px"
    if reason:
        return _skip(summary, path, reason)
    if notes:
        summary.converted.append((str(path), "; ".join(notes)))
        log.warning("convert %s: %s", path, "; ".join(notes))
    if text is None and cfg.default_caption is None:
        _warn(summary, path, f"no caption ({path.stem}.{cfg.caption_ext.lstrip('.')}) and no default_caption: trains with an empty caption")
    if (warning := timing_warning(item, cfg)) is not None:
        _warn(summary, path, warning)
    return item


def _skip(summary: DatasetSummary, path: Path, reason: str) -> None:
    summary.skipped.append((str(path), reason))
    log.warning("skip %s: %s", path, reason)
    return None


def _warn(summary: DatasetSummary, path: Path | str, warning: str) -> None:
    summary.warnings.append((str(path), warning))
    log.warning("warning %s: %s", path, warning)


def _dataset_problems(where: str, cfg: DatasetConfig, profile: Profile, items: list[Item], summary: DatasetSummary) -> list[ProfileProblem]:
    problems = []
    if not items:
        why = f"{len(summary.skipped)} files skipped (run `wantrain dataset` to see why)" if summary.skipped else "it holds no .png/.jpg/.jpeg/.webp/.mp4/.mov/.webm/.mkv file"
        problems.append(ProfileProblem(f"{where}.folder", f"no usable image or video: {why}", cfg.folder, "add media or point folder at the right place"))
    if not profile.job.trigger_word:
        users = [Path(i.path).name for i in items if TRIGGER in i.template]
        if users:
            problems.append(ProfileProblem("job.trigger_word", f"captions of {where} use [trigger] ({', '.join(users[:3])}{', ...' if len(users) > 3 else ''}) but no trigger word is set", None, 'set job.trigger_word = "sks" (your token) or remove [trigger] from the captions'))
    return problems


def _build_units(index: int, cfg: DatasetConfig, profile: Profile, folder: str, items: list[Item], summary: DatasetSummary) -> ScannedDataset:
    units, groups = [], {}
    for i, item in enumerate(items):
        summary.videos += item.kind == "video"
        summary.images += item.kind == "image"
        if len(summary.captions) < 3:
            summary.captions.append((item.path, final_caption(item.template, profile.job.trigger_word)))
        for resolution in cfg.resolutions:
            width, height = bucket_for(item.width, item.height, resolution)
            if needs_upscaling(item.width, item.height, resolution):
                _warn(summary, item.path, f"too small for resolution {resolution}: {item.width}x{item.height} trains at {width}x{height} (never upscaled)")
            unit = Unit(item=i, resolution=resolution, width=width, height=height, frames=frames_for(item, cfg))
            groups.setdefault(unit.key, []).append(len(units))
            units.append(unit)
            name = _bucket_name(resolution, unit)
            summary.buckets[name] = summary.buckets.get(name, 0) + 1
    if cfg.cache_latents and "latent_cache" not in profile.plugins.enabled:
        _warn(summary, folder, "cache_latents = true but the latent_cache plugin is not enabled: latents are encoded every step")
    return ScannedDataset(index=index, config=cfg, folder=folder, items=tuple(items), units=tuple(units),
                          groups=tuple(tuple(groups[k]) for k in sorted(groups)), cached=cfg.cache_latents)


def scan_profile(profile: Profile) -> tuple[list[ScannedDataset], DatasetReport, list[ProfileProblem]]:
    """Scan every dataset of ``profile``; problems are collected, not raised."""
    if not profile.datasets:
        return [], DatasetReport(), [ProfileProblem("datasets", "no [[datasets]] in the profile", fix='add a [[datasets]] table with folder = "..."')]
    scanned, report, problems = [], DatasetReport(), []
    for index, cfg in enumerate(profile.datasets):
        found, summary, found_problems = scan_dataset(index, cfg, profile)
        report.datasets.append(summary)
        problems += found_problems
        if found is not None:
            scanned.append(found)
    return scanned, report, problems


# --------------------------------------------------------------------------
# planning: which units, with which random choices, in which order


@attrs.frozen
class Draw:
    """One sample's random choices."""

    window: float  # [0, 1): which "fps" window
    flip_x: bool
    flip_y: bool
    drop_caption: bool


def _seed(seed: int) -> int:
    return seed % (1 << 64)  # seed sequences take non-negative integers


def draw_sample(seed: int, dataset: int, epoch: int, batch: int, slot: int, cfg: DatasetConfig) -> Draw:
    u = np.random.default_rng([_seed(seed), _SAMPLE, dataset, epoch, batch, slot]).random(4)
    return Draw(window=float(u[0]), flip_x=bool(cfg.flip_x and u[1] < 0.5), flip_y=bool(cfg.flip_y and u[2] < 0.5),
                drop_caption=bool(u[3] < cfg.caption_dropout))


def plan_epoch(ds: ScannedDataset, seed: int, epoch: int, batch_size: int) -> list[tuple[int, ...]]:
    """The batches (unit ids) of one epoch of ``ds``: each unit ``repeats``
    times, shuffled within its (bucket, frames) group, cut into batches of
    ``batch_size`` (a group's last batch may be smaller), batches shuffled.
    Each repeat is shuffled on its own, so copies of an item rarely share a batch."""
    rng = np.random.default_rng([_seed(seed), _ORDER, ds.index, epoch])
    batches: list[tuple[int, ...]] = []
    for group in ds.groups:
        ids = np.concatenate([rng.permutation(np.array(group)) for _ in range(ds.config.repeats)])
        batches += [tuple(int(u) for u in ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def pick_dataset(seed: int, step: int, weights: Sequence[float]) -> int:
    """Which dataset batch number ``step`` comes from (probability ~ weight)."""
    if len(weights) == 1:
        return 0
    u = np.random.default_rng([_seed(seed), _MIX, step]).random()
    cumulative = np.cumsum(weights) / float(sum(weights))
    return min(int(np.searchsorted(cumulative, u, side="right")), len(weights) - 1)


@attrs.frozen
class BatchPlan:
    dataset: int
    epoch: int
    number: int
    units: tuple[int, ...]
    draws: tuple[Draw, ...]
    state_after: dict  # the position once this batch is consumed


def _start_state(count: int, batch_size: int) -> dict:
    return {"version": STATE_VERSION, "batch_size": batch_size, "step": 0, "datasets": [{"epoch": 0, "cursor": 0} for _ in range(count)]}


class Planner:
    """An endless, deterministic stream of :class:`BatchPlan` from a position."""

    def __init__(self, datasets: Sequence[ScannedDataset], seed: int, state: dict):
        self.datasets, self.seed = datasets, seed
        self.state = json.loads(json.dumps(state))  # a private copy
        self._epochs: dict[tuple[int, int], list[tuple[int, ...]]] = {}

    def _epoch(self, d: int, epoch: int) -> list[tuple[int, ...]]:
        key = (d, epoch)
        if key not in self._epochs:
            self._epochs = {k: v for k, v in self._epochs.items() if k[0] != d}
            self._epochs[key] = plan_epoch(self.datasets[d], self.seed, epoch, self.state["batch_size"])
        return self._epochs[key]

    def next_plan(self) -> BatchPlan:
        weights = [ds.config.weight for ds in self.datasets]
        d = pick_dataset(self.seed, self.state["step"], weights)
        pos = self.state["datasets"][d]
        if pos["cursor"] >= len(self._epoch(d, pos["epoch"])):
            pos["epoch"], pos["cursor"] = pos["epoch"] + 1, 0
        epoch, number = pos["epoch"], pos["cursor"]
        units = self._epoch(d, epoch)[number]
        cfg = self.datasets[d].config
        draws = tuple(draw_sample(self.seed, d, epoch, number, slot, cfg) for slot in range(len(units)))
        pos["cursor"] += 1
        self.state["step"] += 1
        return BatchPlan(dataset=d, epoch=epoch, number=number, units=units, draws=draws, state_after=json.loads(json.dumps(self.state)))

    def __iter__(self) -> Iterator[BatchPlan]:
        while True:
            yield self.next_plan()


# --------------------------------------------------------------------------
# loading


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

    def cache_key(self) -> str:
        """Hash of the file's content and every setting that changes the
        latent: bucket, source frame indices (so num_frames, sampling mode
        and window), flips."""
        payload = {"v": CACHE_KEY_VERSION, "file": file_hash(self.path), "kind": self.kind, "bucket": list(self.bucket),
                   "frames": list(self.indices), "flip": [self.flip_x, self.flip_y]}
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
                      indices=frame_plan(item, ds.config, draw.window, ds.cached), flip_x=draw.flip_x, flip_y=draw.flip_y)


def resize_crop(frame: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Cover-resize then centre crop one RGB frame to ``bucket`` (w, h)."""
    height, width = frame.shape[:2]
    if (width, height) == tuple(bucket):
        return frame
    box = crop_box(width, height, bucket)
    return np.asarray(Image.fromarray(frame).resize(tuple(bucket), Image.Resampling.BICUBIC, box=box))


def load_pixels(spec: SampleSpec) -> torch.Tensor:
    """Decode, resize, crop and flip one sample: float32 ``[3, F, H, W]`` in [-1, 1]."""
    if spec.kind == "image":
        frames = media.read_image(spec.path, min_size=spec.bucket)[None]
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
    specs: tuple[SampleSpec, ...] = ()  # what each sample is, to load it again (latent cache misses)

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
        batch = Batch(
            pixels=pixels,
            captions=[final_caption(s[2], self.trigger_word) if s[2] is not None else "" for s in samples],
            templates=[s[2] for s in samples],
            paths=[s[1].path for s in samples],
            cache_keys=[s[1].cache_key() for s in samples],
            is_regularization=[ds.config.is_regularization] * len(samples),
            dataset_index=[ds.index] * len(samples),
            specs=tuple(s[1] for s in samples),
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
                 num_workers: int = 0, prefetch: int = 2):
        self.datasets, self.report, self.seed = tuple(datasets), report, seed
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
        if self._position["batch_size"] != batch_size:
            self._position = _rebatch(self._position, batch_size)
        planner = Planner(self.datasets, self.seed, self._position)
        loader = BatchLoader(self.datasets, self.trigger_word, frozenset(self._skip_pixels), self._excluded)
        if self.num_workers <= 0:
            self._iter = (loader[plan] for plan in planner)
        else:
            self._iter = iter(torch.utils.data.DataLoader(
                loader, batch_size=None, sampler=planner, num_workers=self.num_workers, collate_fn=_identity,
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
        return {**json.loads(json.dumps(self._position)), "seed": self.seed, "fingerprint": self.fingerprint()}

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

    def skip_pixels(self, datasets: Sequence[int]) -> None:
        """Stop decoding pixels for these datasets (their latents come from a
        cache); their batches then have ``pixels = None``."""
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


def build_train_data(profile: Profile, *, seed: int, num_workers: int = 0) -> TrainData:
    """Scan every dataset of ``profile`` (no model needed) and return the
    batch source. Raises DataError with every problem at once: a missing
    folder, a dataset with no usable item, ``[trigger]`` without a trigger word."""
    datasets, report, problems = scan_profile(profile)
    if problems:
        raise DataError(problems)
    return TrainData(datasets, report, seed=seed, trigger_word=profile.job.trigger_word, num_workers=num_workers)


# --------------------------------------------------------------------------
# `wantrain dataset PROFILE [--json]`

DARK = 24  # a row/column whose brightest pixel (over the sampled frames) is below this is black


def black_bars(frames: np.ndarray) -> str | None:
    """"letterboxed ..." / "pillarboxed ..." when every sampled frame has
    black bars on both opposite edges (at least 2% of the side each)."""
    luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    for axis, name, where, side in ((1, "letterboxed", "top and bottom", "height"), (2, "pillarboxed", "left and right", "width")):
        other = 2 if axis == 1 else 1
        dark = luma.max(axis=(0, other)) < DARK
        size = dark.size
        first = int(np.argmin(dark)) if not dark.all() else size
        last = int(np.argmin(dark[::-1])) if not dark.all() else size
        if first < size and min(first, last) >= max(2, 0.02 * size):
            return f"{name}: black bars {where} ({first}+{last} px of {size} {side}); crop them out or they will be learned"
    return None


def inspect_media(datasets: Sequence[ScannedDataset], report: DatasetReport) -> None:
    """The deeper checks of `wantrain dataset`: decode three frames of every
    clip (or the image) to find black bars and files that fail to decode."""
    for ds in datasets:
        summary = report.datasets[ds.index]
        for item in ds.items:
            try:
                if item.kind == "video":
                    frames = media.read_frames(item.path, uniform_indices(item.num_frames, min(3, item.num_frames)))
                else:
                    frames = media.read_image(item.path, min_size=(256, 256))[None]
            except (MediaError, OSError) as exc:
                report.record_skip(ds.index, item.path, str(exc))
                continue
            if (bars := black_bars(frames)) is not None:
                _warn(summary, item.path, bars)


def dataset_command(profile_path: str, overrides: list[str], as_json: bool) -> int:
    """Print what training would see of every dataset; exit 2 on problems."""
    from .profile import load_profile

    level = log.level
    log.setLevel(logging.ERROR)  # the report lists every warning itself
    try:
        profile = load_profile(profile_path, list(overrides))
        datasets, report, problems = scan_profile(profile)
        inspect_media(datasets, report)
    except WantrainError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return exc.exit_code
    finally:
        log.setLevel(level)
    if as_json:
        print(json.dumps({**report.as_dict(), "problems": [p.line() for p in problems]}, indent=2, ensure_ascii=False))
    else:
        print("\n".join(report.lines()))
    for problem in problems:
        print(problem.line(), file=sys.stderr)
    return DataError.exit_code if problems else 0
