"""Real media: write H.264 clips, read only the frames a sample needs, load images.

Three groups of helpers live here:

* writing — :func:`write_video` (H.264, yuv420p, through PyAV; the demo
  dataset built with it is in :mod:`wantrain.data.demo`);
* videos — :func:`probe_video` reads a clip's metadata (no decoding) and
  :func:`read_frames` decodes only the frames asked for: it seeks to the
  keyframe before a far-away frame, asks the decoder to drop non-reference
  frames nobody wants, converts to RGB only the frames it keeps, and decodes
  with frame threads;
* images — :func:`read_image` honours the EXIF rotation, converts grayscale,
  palette, alpha and 16-bit images to 8-bit RGB, and decodes huge JPEGs at a
  reduced scale.

Anything wrong with a file raises :class:`MediaError` whose message is the
reason shown to the user (``skip <path>: <reason>``).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import attrs
import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger("wantrain.data")

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS

#: images with more pixels than this are skipped (Pillow's own hard limit, ~179 MP)
MAX_IMAGE_PIXELS = 2 * 89_478_485
#: a gap (in frames) below which decoding on is always cheaper than seeking
MIN_SEEK_GAP = 16
#: FFmpeg frame threads pay off only for large frames with cores to spare:
#: on 2 cores at 720p they made reads 1.2-2x slower (benchmarks/decode.py);
#: DataLoader workers already decode several clips at once.
THREADS_MIN_PIXELS = 1920 * 1080
THREADS_MIN_CORES = 4


def use_frame_threads(width: int, height: int) -> bool:
    return width * height >= THREADS_MIN_PIXELS and (os.cpu_count() or 1) >= THREADS_MIN_CORES


class MediaError(Exception):
    """A file cannot be used; the message is the reason shown to the user."""


# --------------------------------------------------------------------------
# writing


def write_video(path: str | Path, frames: np.ndarray, fps: float = 16, *, crf: int = 18, options: dict | None = None) -> Path:
    """Write ``frames`` (uint8 ``[F, H, W, 3]``, RGB) as an H.264 yuv420p clip.

    Width and height must be even (yuv420p). ``options`` go to libx264
    (e.g. ``{"g": "48"}`` for a keyframe every 48 frames). x264's
    macroblock-tree rate control is off by default because with it the same
    frames do not always give the same bytes; with it off they do.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0", **(options or {})}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --------------------------------------------------------------------------
# sniffing what a file really is


def sniff(path: str | Path) -> str | None:
    """``"image"``, ``"video"`` or None, from the file's first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # Matroska / WebM
        return "video"
    return None


def kind_of(path: str | Path) -> str | None:
    """``"image"``/``"video"`` from the extension, None for other files."""
    ext = Path(path).suffix.lower()
    return "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else None


# --------------------------------------------------------------------------
# videos


@attrs.frozen(kw_only=True)
class VideoInfo:
    """What the container says about a clip (plus its first frame decoded)."""

    width: int  # as displayed (after the rotation below)
    height: int
    num_frames: int
    fps: float
    rotation: int  # degrees counter-clockwise applied to decoded frames

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def _open(path: str | Path):
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"not a readable video ({_short(exc)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError("no video stream in the file")
    return container


def _short(exc: BaseException) -> str:
    """The gist of a decoder's complaint, without errno codes or paths."""
    text = getattr(exc, "strerror", None) if isinstance(exc, av.error.FFmpegError) else None
    text = text or str(exc).split(": '")[0].strip()
    return re.sub(r"^\[Errno -?\d+\]\s*", "", text) or type(exc).__name__


def _rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise MediaError("the video stream has no frame rate")
    return Fraction(rate)


def _frame_count(container, stream, fps: Fraction) -> int:
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return max(1, round(float(stream.duration * stream.time_base * fps)))
    if container.duration:
        return max(1, round(container.duration / 1_000_000 * float(fps)))
    raise MediaError("the container gives no duration or frame count")


def probe_video(path: str | Path) -> VideoInfo:
    """Metadata of a clip, checked cheaply: the first frame is decoded and the
    last packet is read (a clip cut short fails here, not mid-run)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _rate(stream)
        count = _frame_count(container, stream, fps)
        try:
            first = next(container.decode(stream), None)
        except av.error.FFmpegError as exc:
            raise MediaError(f"corrupt video: first frame does not decode ({_short(exc)})") from None
        if first is None:
            raise MediaError("corrupt video: no frame decodes")
        rotation = _rotation(first)
        _check_tail(container, stream, count, fps)
    width, height = (first.height, first.width) if rotation % 180 else (first.width, first.height)
    return VideoInfo(width=width, height=height, num_frames=count, fps=float(fps), rotation=rotation)


def _rotation(frame) -> int:
    try:
        angle = int(round(frame.rotation or 0))
    except Exception:  # noqa: BLE001 - no display matrix, odd side data
        return 0
    return (round(angle / 90) * 90) % 360


def _check_tail(container, stream, count: int, fps: Fraction) -> None:
    """Seek to the last frame and read its packet: a truncated file whose
    index still promises every frame fails here."""
    if count < 2:
        return
    last_pts = _pts_of(stream, count - 1, fps)
    try:
        container.seek(last_pts, stream=stream, backward=True)
        packets = [p for p in container.demux(stream) if p.size]
    except av.error.FFmpegError as exc:
        raise MediaError(f"truncated or corrupt video ({_short(exc)})") from None
    if not packets:
        raise MediaError("truncated video: the last frames are missing")
    last = max((p.pts for p in packets if p.pts is not None), default=None)
    if last is None or _index_of(stream, last, fps) < count - 1 - max(2, count // 100):
        raise MediaError(f"truncated video: the index promises {count} frames but the data stops early")


def _start(stream) -> int:
    return stream.start_time if stream.start_time is not None else 0


def _pts_of(stream, index: int, fps: Fraction) -> int:
    return _start(stream) + int(round(Fraction(index) / fps / stream.time_base))


def _index_of(stream, pts: int, fps: Fraction) -> int:
    return int(round((pts - _start(stream)) * stream.time_base * fps))


def read_frames(path: str | Path, indices: Sequence[int], *, threads: bool | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` (presentation order, 0-based) as RGB
    uint8 ``[N, H, W, 3]``, in the order asked (repeats allowed).

    Only what is needed is decoded: the wanted frames are grouped into
    segments; each segment starts at the keyframe before its first frame
    (found by a seek and one packet read, no decoding) unless decoding on
    from where the previous segment stopped is shorter. Frames nobody wants that
    no other frame references are dropped by the decoder, and only wanted
    frames are converted to RGB (overlapping the decoding). ``threads``:
    FFmpeg frame threads on/off; None decides by frame size and core count
    (:func:`use_frame_threads`).
    """
    wanted = sorted({int(i) for i in indices})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"indices must be non-negative and non-empty, got {list(indices)[:8]}")
    with _open(path) as container:
        stream = container.streams.video[0]
        if threads is None:
            threads = use_frame_threads(stream.codec_context.width, stream.codec_context.height)
        if threads:
            stream.thread_type = "AUTO"
        fps = _rate(stream)
        segments = _plan_segments(container, stream, wanted, fps)
        # RGB conversion (swscale, GIL released) overlaps the decoding of the next frames
        with ThreadPoolExecutor(max_workers=1) as pool:
            try:
                got = _decode_segments(container, stream, segments, fps, pool)
            except av.error.FFmpegError as exc:
                raise MediaError(f"corrupt video: decoding failed ({_short(exc)})") from None
            images = {i: future.result() for i, future in got.items()}
    return np.stack([images[i] for i in indices])


@attrs.define
class _Segment:
    start: int  # index of the keyframe decoding starts from
    indices: list[int]


def _plan_segments(container, stream, wanted: list[int], fps: Fraction) -> list[_Segment]:
    """Group the wanted frames: a new segment (a seek) only where the
    keyframe before a frame lies after the previous wanted frame."""
    first = _keyframe_before(container, wanted[0], fps) if wanted[0] > MIN_SEEK_GAP else 0
    segments = [_Segment(start=first or 0, indices=[wanted[0]])]
    for index in wanted[1:]:
        last = segments[-1].indices[-1]
        key = _keyframe_before(container, index, fps) if index - last > MIN_SEEK_GAP else None
        if key is None or key <= last + 1:
            segments[-1].indices.append(index)
        else:
            segments.append(_Segment(start=key, indices=[index]))
    return segments


def _keyframe_before(container, index: int, fps: Fraction) -> int | None:
    """Index of the keyframe a backward seek to ``index`` lands on, or None."""
    stream = container.streams.video[0]
    try:
        container.seek(_pts_of(stream, index, fps), stream=stream, backward=True)
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size:
                found = _index_of(stream, packet.pts, fps)
                return found if packet.is_keyframe and found <= index else None
    except av.error.FFmpegError:
        return None
    return None


def _decode_segments(container, stream, segments: list[_Segment], fps: Fraction, pool) -> dict[int, Future]:
    wanted = {i for seg in segments for i in seg.indices}
    got: dict[int, Future] = {}
    codec = stream.codec_context
    for seg in segments:
        container.seek(_pts_of(stream, seg.start, fps), stream=stream, backward=True)
        todo = sorted(seg.indices)
        previous = None  # (index, frame) last seen, to stand in for a missing index
        for packet in _packets_then_flush(container, stream):
            if packet is not None:
                needed = packet.is_keyframe or packet.pts is None or _index_of(stream, packet.pts, fps) in wanted
                codec.skip_frame = "DEFAULT" if needed else "NONREF"
            for frame in codec.decode(packet):
                previous = _take(frame, _index_of(stream, frame.pts, fps), todo, got, previous, pool)
            if not todo:
                break
        codec.skip_frame = "DEFAULT"
        if todo:
            _end_of_stream(todo, got, previous, pool)
    return got


def _end_of_stream(todo: list[int], got: dict, previous, pool) -> None:
    """Frames asked for past the last decoded one: a frame or two is index
    rounding (the last frame stands in); more means the clip is cut short."""
    if previous is None:
        raise MediaError("corrupt video: no frame decodes")
    last, frame = previous
    if todo[-1] - last > max(2, last // 100):
        raise MediaError(f"truncated or corrupt video: frames stop at {last}, frame {todo[-1]} is needed")
    image = pool.submit(_to_rgb, frame)
    for index in todo:
        got[index] = image
    todo.clear()


def _packets_then_flush(container, stream):
    for packet in container.demux(stream):
        if packet.size:
            yield packet
    yield None  # drain the decoder at the end of the stream


def _take(frame, index: int, todo: list[int], got: dict, previous, pool):
    """File ``frame`` under every wanted index it stands for (its RGB
    conversion runs in ``pool``)."""
    while todo and todo[0] <= index:
        wanted = todo.pop(0)
        source = frame if wanted == index or previous is None else previous[1]
        got[wanted] = pool.submit(_to_rgb, source)
    return (index, frame)


def _to_rgb(frame) -> np.ndarray:
    image = frame.to_ndarray(format="rgb24")
    rotation = _rotation(frame)
    return np.ascontiguousarray(np.rot90(image, k=rotation // 90)) if rotation else image


def read_all_frames(path: str | Path) -> np.ndarray:
    """Reference reader: decode every frame with PyAV's defaults, keep all."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# --------------------------------------------------------------------------
# images

_EXIF_ORIENTATION = 0x0112
_ROTATION_TEXT = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "transposed", 6: "rotated 90° clockwise", 7: "transversed", 8: "rotated 90° counter-clockwise"}


@attrs.frozen(kw_only=True)
class ImageInfo:
    width: int  # as displayed (after the EXIF rotation)
    height: int
    notes: tuple[str, ...]  # conversions applied on load, shown once in the report


def _open_image(path: str | Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            raise MediaError(f"image too large (more than {MAX_IMAGE_PIXELS / 1e6:.0f} MP)") from None
        except UnidentifiedImageError:
            raise MediaError("not a readable image (unknown or damaged format)") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise MediaError(f"not a readable image ({_short(exc)})") from None


def probe_image(path: str | Path) -> ImageInfo:
    """Size and the conversions a load will apply, from the header only."""
    with _open_image(path) as img:
        width, height = img.size
        depth = _png_bit_depth(img)  # before getexif(), which may load and close the file
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except (OSError, ValueError, SyntaxError, struct.error) as exc:
            raise MediaError(f"truncated or corrupt image ({_short(exc)})") from None
        notes = _conversion_notes(img, orientation, depth)
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(f"image too large ({width}x{height}, more than {MAX_IMAGE_PIXELS / 1e6:.0f} MP)")
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageInfo(width=width, height=height, notes=tuple(notes))


def _conversion_notes(img: Image.Image, orientation: int, depth: int) -> list[str]:
    notes = []
    if orientation in _ROTATION_TEXT:
        notes.append(f"{_ROTATION_TEXT[orientation]} per its EXIF orientation ({orientation})")
    mode = img.mode
    if mode.startswith("I;16") or mode == "I" or depth == 16:
        notes.append(f"16-bit image ({mode}) converted to 8-bit")
    if _has_alpha(img):
        notes.append(f"alpha channel ({mode}) flattened onto white")
    if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16"):
        notes.append(f"grayscale image ({mode}) converted to RGB")
    if img.width * img.height > Image.MAX_IMAGE_PIXELS:
        notes.append(f"very large image ({img.width}x{img.height}); " + ("decoded at reduced scale" if img.format == "JPEG" else "slow to decode, consider storing it smaller"))
    return notes


def _png_bit_depth(img: Image.Image) -> int:
    """Bits per sample from a PNG's IHDR (Pillow reads 48-bit RGB as 8-bit
    RGB without saying so)."""
    if img.format != "PNG" or img.fp is None:
        return 8
    at = img.fp.tell()
    try:
        img.fp.seek(24)
        return img.fp.read(1)[0]
    except (OSError, IndexError):
        return 8
    finally:
        img.fp.seek(at)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)


def read_image(path: str | Path, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Load an image as RGB uint8 ``[H, W, 3]``: EXIF rotation applied,
    16-bit scaled to 8-bit, alpha flattened onto white, grayscale and palette
    expanded. ``min_size=(w, h)`` lets a JPEG decode at a reduced scale that
    still covers that size."""
    with _open_image(path) as img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise MediaError(f"image too large ({img.width}x{img.height})")
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            if min_size and img.format == "JPEG":
                w, h = min_size if orientation not in (5, 6, 7, 8) else min_size[::-1]
                img.draft("RGB", (w, h))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb8(img)
        except (OSError, ValueError, SyntaxError, struct.error) as exc:
            raise MediaError(f"truncated or corrupt image ({_short(exc)})") from None


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        top = 65535 if values.max(initial=0) > 255 or img.mode.startswith("I;16") else 255
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.asarray(img) * (255.0 if np.asarray(img).max(initial=0) <= 1.0 else 1.0), 0, 255)
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
