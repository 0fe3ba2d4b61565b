"""The dataset report: what a scan found, what loading skipped, and why.

One :class:`DatasetSummary` per ``[[datasets]]`` entry counts videos, images,
buckets, skipped files (with the reason), warnings and conversions, and keeps
three caption previews. :class:`DatasetReport` holds them all: the run logs
its :meth:`~DatasetReport.lines`, ``wantrain dataset`` prints them or the JSON
form. Every skip or warning is also logged once, naming the file
(logger ``wantrain.data``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import attrs

from .buckets import Unit

log = logging.getLogger("wantrain.data")


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
# recording a skipped file or a warning while scanning


def _skip(summary: DatasetSummary, path: Path, reason: str) -> None:
    summary.skipped.append((str(path), reason))
    log.warning("skip %s: %s", path, reason)
    return None


def _warn(summary: DatasetSummary, path: Path | str, warning: str) -> None:
    summary.warnings.append((str(path), warning))
    log.warning("warning %s: %s", path, warning)
