"""``wantrain dataset PROFILE [--json]``: what training would see of every dataset.

It scans like a run does, then looks deeper (:func:`inspect_media`): three
frames of every clip (or the image) are decoded to find files that fail to
decode and black bars (:func:`black_bars`) that would be learned. The report
goes to stdout as text or JSON, problems to stderr; exit 2 on problems.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

import numpy as np

from ..data import media
from ..data.frames import uniform_indices
from ..data.media import MediaError
from ..data.report import DatasetReport, _warn
from ..data.scan import ScannedDataset, scan_profile
from ..errors import DataError, WantrainError

log = logging.getLogger("wantrain.data")

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
    from ..profile import load_profile

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
