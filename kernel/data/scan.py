"""Scanning: folders -> items, each probed, bucketed and captioned, once per run.

Every ``[[datasets]]`` folder is walked (recursively, dot-folders skipped);
each image or clip is probed cheaply (header, first frame, last packet) and
either kept as an :class:`~wantrain.data.buckets.Item` or skipped with one
warning ``skip <path>: <reason>`` counted in the report. Each item then gets
one bucket per resolution and a frame count; items of the same
(bucket, frames) form a group, the unit a batch is drawn from. Problems that
stop a run (missing folder, no usable item, ``[trigger]`` without a trigger
word) are collected, not raised: :func:`scan_profile` returns them all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs

from .. import archs
from ..errors import ProfileProblem
from ..profile import DatasetConfig, Profile
from . import media
from .buckets import Item, Unit, bucket_for, needs_upscaling
from .captions import TRIGGER, caption_template, final_caption, read_caption
from .frames import frames_for, timing_warning, too_short
from .media import MediaError
from .report import DatasetReport, DatasetSummary, _bucket_name, _skip, _warn

log = logging.getLogger("wantrain.data")


@attrs.frozen(kw_only=True)
class ScannedDataset:
    """A dataset ready to sample: its items, units and (bucket, frames) groups."""

    index: int
    config: DatasetConfig
    folder: str
    items: tuple[Item, ...]
    units: tuple[Unit, ...]
    groups: tuple[tuple[int, ...], ...]  # unit ids per (w, h, frames), keys sorted
    cached: bool  # cache_latents: "fps" windows come from window_starts (a fixed set)
    #: the arch takes a start frame: batches carry ``start`` (and with ``last_frame``, ``last``)
    start_frames: bool = False
    last_frame: bool = False


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
    folder = profile.resolve_path(cfg.folder)
    summary = DatasetSummary(index=index, folder=str(folder), num_frames=cfg.num_frames, frame_sampling=cfg.frame_sampling)
    if not folder.is_dir():
        fix = "check the path (relative paths start from the current directory)"
        what = "is not a folder" if folder.exists() else "folder not found"
        return None, summary, [ProfileProblem(f"{where}.folder", what, cfg.folder, fix)]
    files, summary.ignored = list_files(folder, cfg.caption_ext)
    arch = archs.get(profile.model.arch)
    overrides = start_images(files) if arch.takes_start_frame else {}
    files = [f for f in files if f not in {p for pair in overrides.values() for p in pair if p}]
    items = [item for path in files if (item := _scan_file(path, cfg, profile, summary, arch, overrides.get(path))) is not None]
    problems = _dataset_problems(where, cfg, profile, items, summary)
    if problems:
        return None, summary, problems
    scanned = _build_units(index, cfg, profile, str(folder), items, summary)
    return scanned, summary, []


def start_images(files: list[Path]) -> dict[Path, tuple[Path | None, Path | None]]:
    """Image-to-video archs: ``{clip: (start image, last image)}`` for clips
    with a same-stem image beside them (``clip.png`` replaces the start frame,
    ``clip.last.png`` the last one); such images are not items of their own."""
    images = {(p.parent, p.stem.lower()): p for p in files if p.suffix.lower() in media.IMAGE_EXTS}
    out = {}
    for clip in files:
        if clip.suffix.lower() in media.VIDEO_EXTS:
            pair = (images.get((clip.parent, clip.stem.lower())), images.get((clip.parent, clip.stem.lower() + ".last")))
            if any(pair):
                out[clip] = pair
    return out


def _scan_file(path: Path, cfg: DatasetConfig, profile: Profile, summary: DatasetSummary, arch: archs.Arch | None = None,
               override: tuple[Path | None, Path | None] | None = None) -> Item | None:
    arch = arch or archs.get(profile.model.arch)
    try:
        kind, width, height, count, fps, notes = probe_file(path)
        text = read_caption(path, cfg)
    except MediaError as exc:
        return _skip(summary, path, str(exc))
    except OSError as exc:
        return _skip(summary, path, f"cannot read the file ({exc.strerror or exc})")
    template = caption_template(text if text is not None else (cfg.default_caption or ""), profile.job.trigger_word, cfg.is_regularization)
    start, last = (str(p) if p else None for p in override or (None, None))
    item = Item(path=str(path), kind=kind, width=width, height=height, num_frames=count, fps=fps, template=template,
                start=start, last=last)
    reason = too_short(item, cfg)
    if reason is None and min(width, height) < arch.size_multiple:
        reason = f"too small: {width}x{height} has a side below {arch.size_multiple} px"
    if reason is None and kind == "image" and arch.default_i2v_probability >= 1.0:
        reason = f"a still cannot train {arch.title}, an image-to-video model (an image named like a clip is its start frame)"
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
            step = archs.get(profile.model.arch).size_multiple
            width, height = bucket_for(item.width, item.height, resolution, step)
            if needs_upscaling(item.width, item.height, resolution, step):
                _warn(summary, item.path, f"too small for resolution {resolution}: {item.width}x{item.height} trains at {width}x{height} (never upscaled)")
            unit = Unit(item=i, resolution=resolution, width=width, height=height, frames=frames_for(item, cfg))
            groups.setdefault(unit.key, []).append(len(units))
            units.append(unit)
            name = _bucket_name(resolution, unit)
            summary.buckets[name] = summary.buckets.get(name, 0) + 1
    return ScannedDataset(index=index, config=cfg, folder=folder, items=tuple(items), units=tuple(units),
                          groups=tuple(tuple(groups[k]) for k in sorted(groups)), cached=cfg.cache_latents,
                          start_frames=archs.get(profile.model.arch).takes_start_frame, last_frame=profile.model.last_frame)


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
