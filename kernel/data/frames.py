"""Frame planning: which source frames one sample of a clip is made of.

Wan 2.2 generates 16 fps video. A dataset's ``frame_sampling`` decides how a
clip's ``num_frames`` are taken:

* ``"uniform"`` -- spread over the whole clip, first and last frame included
  (:func:`uniform_indices`); the motion plays faster or slower than real;
* ``"fps"`` -- a window of consecutive frames at 16 fps (:func:`fps_indices`),
  its start drawn anywhere in the clip, or, for a dataset with
  ``cache_latents = true`` (which draws from a finite set of fixed sample
  variants so each can be stored), one of :func:`window_starts`.

A still image is always a one-frame sample. :func:`too_short` and
:func:`timing_warning` are the scan's checks of a clip against this plan.
"""

from __future__ import annotations

import math

from ..profile import DatasetConfig
from .buckets import Item

MODEL_FPS = 16  # Wan 2.2 generates 16 fps video
MAX_CACHED_WINDOWS = 8  # fixed "fps" windows per clip of a cache_latents dataset
SPEED_LIMIT = 2.0  # warn when "uniform" plays a clip faster/slower than this


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
