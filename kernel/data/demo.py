"""The demo dataset: short generated clips and stills with captions.

:func:`write_demo_data` writes what the CPU demo (``wantrain demo-data``) and
the tests train on; :func:`moving_shapes` draws its frames (a disc and a
square drifting over a gradient), deterministic from a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .media import write_video


def moving_shapes(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frames of a coloured disc and square moving over a tinted gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = rng.integers(0, 120, size=3).astype(np.float32)
    base = background + (xx / max(width - 1, 1))[..., None] * rng.integers(20, 100, size=3)
    colours = rng.integers(120, 256, size=(2, 3)).astype(np.float32)
    start = rng.uniform(0.2, 0.8, size=(2, 2)) * (height, width)
    velocity = rng.uniform(-1.0, 1.0, size=(2, 2)) * (height, width) / max(num_frames, 1)
    radius = min(height, width) * rng.uniform(0.12, 0.22, size=2)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = base.copy()
        cy, cx = (start[0] + velocity[0] * t) % (height, width)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius[0] ** 2
        sy, sx = (start[1] + velocity[1] * t) % (height, width)
        square = (np.abs(yy - sy) <= radius[1]) & (np.abs(xx - sx) <= radius[1])
        frame[disc] = colours[0]
        frame[square] = colours[1]
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


_DEMO_CLIPS = (  # (stem, width, height, caption)
    ("clip_00", 96, 64, "[trigger] style, a bright disc and a square drifting over a gradient"),
    ("clip_01", 64, 64, "a glowing disc crossing a square, [trigger] style"),
    ("clip_02", 64, 96, "tall shot of two shapes moving, in the [trigger] style"),
    ("clip_03", 96, 64, "two coloured shapes sliding over a soft background"),
)
_DEMO_IMAGES = (
    ("still_00", 64, 64, "[trigger] style, a disc and a square on a gradient"),
    ("still_01", 96, 64, "a still frame of coloured shapes"),
    ("still_02", 128, 96, "[trigger] style poster of two shapes"),
)


def write_demo_data(folder: str | Path, seed: int = 0, *, num_frames: int = 33, fps: int = 16) -> list[Path]:
    """Write the demo dataset: 4 short H.264 clips and 3 PNGs, each with a
    same-stem ``.txt`` caption (some use ``[trigger]``). Returns the media
    paths (captions sit next to them). Same seed -> same pixels."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (stem, width, height, caption) in enumerate(_DEMO_CLIPS):
        frames = moving_shapes(num_frames, height, width, seed=seed * 1000 + i)
        paths.append(write_video(folder / f"{stem}.mp4", frames, fps=fps, options={"threads": "1"}))
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    for i, (stem, width, height, caption) in enumerate(_DEMO_IMAGES):
        frame = moving_shapes(1, height, width, seed=seed * 1000 + 100 + i)[0]
        Image.fromarray(frame).save(folder / f"{stem}.png")
        paths.append(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return paths
