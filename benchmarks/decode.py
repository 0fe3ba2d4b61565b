"""Decode benchmark: 33 frames from a 20 s 1280x720 H.264 clip.

    python benchmarks/decode.py [--repeats 3] [--fps 30] [--gop 250]

wantrain's reader (``wantrain.media.read_frames``: plan, keyframe seeks,
non-reference frames dropped, RGB conversion of kept frames only, overlapping
the decoding) against the plain way: decode every frame with PyAV's default
settings and keep 33. Two sample plans are timed:

- ``uniform``: 33 frames spread over the whole clip (``frame_sampling = "uniform"``);
- ``fps``: 33 frames at 16 fps from a 2 s window in the middle (``"fps"``).

Prints each time (best of ``--repeats``) and the ratio, and checks that the
frames are bit-identical to the reference's. The clip (textured background
panning 2 px a frame, moving shapes; libx264 defaults, crf 23) is generated
once and kept in the system temp folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

from wantrain.data import MODEL_FPS, uniform_indices
from wantrain.data.media import read_frames, write_video

WIDTH, HEIGHT, SECONDS, FRAMES = 1280, 720, 20, 33


def make_clip(fps: int, gop: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"wantrain_bench_{WIDTH}x{HEIGHT}_{SECONDS}s_{fps}fps_g{gop}.mp4"
    if path.is_file():
        return path
    count = SECONDS * fps
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(HEIGHT // 8, (WIDTH + 2 * count) // 8, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(small).resize((WIDTH + 2 * count, HEIGHT), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.empty((count, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(count):
        frame = texture[:, 2 * t : 2 * t + WIDTH].copy()
        cy, cx = HEIGHT / 2 + 200 * np.sin(t / 20), (t * 7) % WIDTH
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 < 90**2] = (240, 60, 40)
        frames[t] = frame
    tmp = path.with_suffix(".tmp.mp4")
    write_video(tmp, frames, fps=fps, crf=23, options={"g": str(gop)})
    tmp.replace(path)
    return path


def reference(path: Path, indices: list[int]) -> np.ndarray:
    """Decode every frame with PyAV's defaults; keep (and convert to RGB) the wanted ones."""
    wanted, kept = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    return np.stack([kept[i] for i in indices])


def reference_threaded(path: Path, indices: list[int]) -> np.ndarray:
    """The same with frame threads on: shows what seeking and skipping add."""
    wanted, kept = set(indices), {}
    with av.open(str(path)) as container:
        container.streams.video[0].thread_type = "AUTO"
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    return np.stack([kept[i] for i in indices])


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def plans(count: int, fps: int) -> dict[str, list[int]]:
    start = count // 2 / fps
    window = [min(count - 1, round((start + k / MODEL_FPS) * fps)) for k in range(FRAMES)]
    return {"uniform": list(uniform_indices(count, FRAMES)), "fps": window}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=250, help="max frames between keyframes (libx264 default 250)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    path = make_clip(args.fps, args.gop)
    print(f"clip: {path} ({WIDTH}x{HEIGHT}, {SECONDS} s at {args.fps} fps, keyint {args.gop}; ready in {time.perf_counter() - t0:.1f} s)")
    ok = True
    for name, indices in plans(SECONDS * args.fps, args.fps).items():
        t_ref, ref = best_time(lambda: reference(path, indices), args.repeats)
        t_thr, thr = best_time(lambda: reference_threaded(path, indices), args.repeats)
        t_ours, ours = best_time(lambda: read_frames(path, indices), args.repeats)
        same = np.array_equal(ours, ref) and np.array_equal(thr, ref)
        ok &= same
        print(f"{name:8s} {FRAMES} frames  reference (decode all, PyAV defaults) {t_ref:7.3f} s | "
              f"reference with threads {t_thr:7.3f} s | wantrain {t_ours:7.3f} s | "
              f"ratio {t_ref / t_ours:5.1f}x (vs threaded reference {t_thr / t_ours:4.1f}x) | frames identical: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
