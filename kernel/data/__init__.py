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

The modules, in pipeline order:

* ``media``    -- PyAV / Pillow: probe, read frames, read images, write clips;
* ``scan``     -- folders -> items, each probed, bucketed and captioned;
* ``buckets``  -- :class:`Item`, :class:`Unit` and the bucket rule;
* ``frames``   -- which source frames a sample takes ("uniform" / "fps");
* ``captions`` -- caption files and ``[trigger]`` templates;
* ``report``   -- :class:`DatasetSummary` / :class:`DatasetReport`;
* ``plan``     -- epochs, dataset mixing and per-sample draws, deterministic;
* ``loader``   -- :class:`SampleSpec`, :class:`BatchLoader`, :class:`TrainData`;
* ``demo``     -- the generated demo clips and stills.

Every public name is importable from ``wantrain.data`` itself; the
``wantrain dataset`` command is :mod:`wantrain.commands.dataset`.
``docs/data.md`` explains every rule and decision for users.
"""

from __future__ import annotations

from .buckets import Item, Unit, bucket_for, crop_box, needs_upscaling
from .captions import TRIGGER, caption_template, final_caption, read_caption
from .frames import (MAX_CACHED_WINDOWS, MODEL_FPS, SPEED_LIMIT, fps_indices, fps_span, frame_plan, frames_for,
                     timing_warning, too_short, uniform_indices, window_starts)
from .loader import (CACHE_KEY_VERSION, Batch, BatchLoader, SampleSpec, TrainData, build_train_data, file_hash,
                     load_pixels, make_spec, resize_crop)
from .media import MediaError
from .plan import STATE_VERSION, BatchPlan, Draw, Planner, draw_sample, pick_dataset, plan_epoch
from .report import DatasetReport, DatasetSummary
from .scan import ScannedDataset, list_files, probe_file, scan_dataset, scan_profile

__all__ = [
    "CACHE_KEY_VERSION", "MAX_CACHED_WINDOWS", "MODEL_FPS", "SPEED_LIMIT", "STATE_VERSION", "TRIGGER",
    "Batch", "BatchLoader", "BatchPlan", "DatasetReport", "DatasetSummary", "Draw", "Item", "MediaError", "Planner",
    "SampleSpec", "ScannedDataset", "TrainData", "Unit",
    "bucket_for", "build_train_data", "caption_template", "crop_box", "draw_sample",
    "file_hash", "final_caption", "fps_indices", "fps_span", "frame_plan", "frames_for", "list_files",
    "load_pixels", "make_spec", "needs_upscaling", "pick_dataset", "plan_epoch", "probe_file", "read_caption",
    "resize_crop", "scan_dataset", "scan_profile", "timing_warning", "too_short", "uniform_indices",
    "window_starts",
]
