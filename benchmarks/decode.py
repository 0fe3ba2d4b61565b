"""Decode benchmark: 33 frames from a 20 s 1280x720 H.264 clip.

    python benchmarks/decode.py [--repeats 3] [--fps 30] [--gop 250]

wantrain's reader (``wantrain.media.read_frames``: plan, keyframe seeks,
non-reference frames dropped, RGB conversion of kept frames only, overlapping
the decoding) against the plain way: decode every frame with PyAV's default
settings and keep 33. Two sample plans are timed:

- ``uniform``: 33 frames spread over the whole clip (``frame_sampling = "uniform"``);
- ``fps``: 33 frames at 16 fps from a 2 s window in the middle (``"fps"``).

Prints each time (best of ``--repeats``) and the ratio, and checks that the
frames are bit-identical to the reference's. Next to each ratio: its bound,
all frames / the frames that must be decoded for the plan (counted from the
stream's packets: keyframe flags and each slice's nal_ref_idc), and the ratio
as a fraction of it (decoding time taken as proportional to frames decoded). The clip (textured background
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


def _h264_is_reference(payload: bytes, length_size: int = 4) -> bool | None:
    """nal_ref_idc of the packet's first slice (length-prefixed H.264 NAL
    units, as in MP4): False for a frame no other frame references, None when
    the packet has no slice (not H.264 in MP4)."""
    at = 0
    while at + length_size < len(payload):
        size = int.from_bytes(payload[at:at + length_size], "big")
        header = payload[at + length_size]
        if header & 0x1F in (1, 5):  # coded slice (non-IDR / IDR)
            return (header >> 5) & 3 != 0
        at += length_size + size
    return None


def must_decode(path: Path, indices: list[int]) -> tuple[int, int, int, float]:
    """(all frames, frames a decoder must decode for the plan by keyframes
    alone, and by keyframes and reference flags), counted from the stream's
    packets in decode order: in each keyframe interval holding a wanted frame,
    every packet from the keyframe up to the last wanted one -- less, for the
    second figure, the packets no frame references and nobody wants (the
    frames the reader tells the decoder to drop). Last: the share of the
    stream's bytes those packets hold (a keyframe costs more than a B-frame)."""
    wanted = set(indices)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start, tb, fps = stream.start_time or 0, stream.time_base, stream.average_rate
        packets = [(p.is_keyframe, _h264_is_reference(bytes(p)), round((p.pts - start) * tb * fps), p.size)
                   for p in container.demux(stream) if p.size]
    gops: list[list[tuple[bool, bool | None, int, int]]] = []
    for packet in packets:
        if packet[0] or not gops:
            gops.append([])
        gops[-1].append(packet)
    by_keys = by_refs = needed_bytes = 0
    for gop in gops:
        last = max((k for k, (_, _, index, _) in enumerate(gop) if index in wanted), default=-1)
        by_keys += last + 1
        needed = [size for _, ref, index, size in gop[:last + 1] if ref is not False or index in wanted]
        by_refs, needed_bytes = by_refs + len(needed), needed_bytes + sum(needed)
    return len(packets), by_keys, by_refs, needed_bytes / sum(p[3] for p in packets)


def decoded_frames(path: Path, indices: list[int]) -> list:
    """The wanted frames as decoded (not converted): for timing the RGB conversion alone."""
    wanted, kept = set(indices), []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                kept.append(frame)
    return kept


def rgb_only(frames: list) -> None:
    """The RGB conversion of the kept frames alone (swscale, as both readers do)."""
    for frame in frames:
        frame.to_ndarray(format="rgb24")


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
        total, by_keys, by_refs, byte_share = must_decode(path, indices)
        bound = total / by_refs
        kept = decoded_frames(path, indices)
        t_rgb, _ = best_time(lambda: rgb_only(kept), args.repeats)  # both sides convert the 33 kept frames
        del kept
        per_frame = (t_ref - t_rgb) / total
        time_bound = t_ref / (by_refs * per_frame + t_rgb)
        print(f"{name:8s} {FRAMES} frames  reference (decode all, PyAV defaults) {t_ref:7.3f} s | "
              f"reference with threads {t_thr:7.3f} s | wantrain {t_ours:7.3f} s | "
              f"ratio {t_ref / t_ours:5.1f}x (vs threaded reference {t_thr / t_ours:4.1f}x) | frames identical: {same}")
        print(f"{'':8s} bound {bound:5.1f}x = {total} frames / {by_refs} that must be decoded (keyframe intervals up "
              f"to their last wanted frame: {by_keys}; less unreferenced frames nobody wants) -> ratio is "
              f"{t_ref / t_ours / bound:.0%} of the bound")
        print(f"{'':8s} with the {FRAMES} RGB conversions both sides pay ({t_rgb:.3f} s) counted: bound {time_bound:4.1f}x "
              f"-> ratio is {t_ref / t_ours / time_bound:.0%} of it; those frames hold {byte_share:.0%} of the bytes")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
