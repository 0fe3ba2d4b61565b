"""Fixtures of the data pipeline's tests: real media written once per session.

Imported by ``tests/conftest.py`` (``from conftest_data import *``).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from wantrain.data.demo import moving_shapes
from wantrain.data.media import write_video
from wantrain.profile import DatasetConfig, JobConfig, Profile, PluginsConfig

__all__ = ["bad_media", "letterboxed"]  # the fixtures `from conftest_data import *` brings in

#: file name in the bad-media folder -> what the user is told (a fragment)
BAD_MEDIA = {
    "corrupt.mp4": "not a readable video",
    "truncated.mp4": "not a readable video",
    "truncated_faststart.mp4": "truncated video",
    "empty.mp4": "empty file (0 bytes)",
    "empty.png": "empty file (0 bytes)",
    "text.jpg": "not a readable image (unknown or damaged format)",
    "short.mp4": "too short: 5 frames",
    "latin1.png": "not UTF-8",
    "tiny.png": "too small",
    "bomb.png": "image too large (more than 179 MP)",
}
#: file name -> conversion note (handled, counted as converted)
CONVERTED = {
    "image_named.mp4": "wrong extension",
    "video_named.png": "wrong extension",
    "exif_rotated.jpg": "rotated 90° clockwise per its EXIF orientation (6)",
    "gray.png": "grayscale image (L) converted to RGB",
    "gray16.png": "16-bit image",
    "rgb16.png": "16-bit image (RGB) converted to 8-bit",
    "rgba.png": "alpha channel (RGBA) flattened onto white",
    "palette_alpha.png": "alpha channel (P) flattened onto white",
    "huge.jpg": "very large image (12000x9000)",
    "rotated_video.mp4": "rotated 90° per its display matrix",
}


def make_profile(*datasets: DatasetConfig, trigger_word: str | None = "sks", seed: int = 0, plugins: tuple[str, ...] = ()) -> Profile:
    """A profile built in code (no TOML, no registry)."""
    return Profile(job=JobConfig(name="t", trigger_word=trigger_word, seed=seed), datasets=tuple(datasets),
                   plugins=PluginsConfig(enabled=plugins))


def write_clip(path: Path, num_frames: int = 33, width: int = 64, height: int = 48, seed: int = 0, fps: float = 16, **kw) -> Path:
    return write_video(path, moving_shapes(num_frames, height, width, seed=seed), fps=fps, **kw)


def caption(path: Path, text: str) -> None:
    path.with_suffix(".txt").write_text(text, encoding="utf-8")


def _write_png16_rgb(path: Path, seed: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 65536, size=(48, 64, 3)).astype(np.uint16)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = 64, 48, "rgb48be"
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb48le").reformat(format="rgb48be")
    path.write_bytes(b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None)))


def _write_rotated_clip(path: Path) -> None:
    frames = moving_shapes(9, 48, 64, seed=5)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(16))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width x height`` (header only): a size bomb, cheaply."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _write_images(folder: Path) -> None:
    shapes = moving_shapes(1, 48, 64, seed=9)[0]
    Image.fromarray(shapes).convert("L").save(folder / "gray.png")
    gray16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    _write_png16_rgb(folder / "rgb16.png", seed=1)
    rgba = np.dstack([shapes, np.full((48, 64), 255, np.uint8)])
    rgba[:, :32, 3] = 0
    Image.fromarray(rgba).save(folder / "rgba.png")
    palette = Image.fromarray(shapes).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(moving_shapes(1, 32, 64, seed=3)[0]).save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (12000, 9000), (120, 40, 200)).save(folder / "huge.jpg", quality=80)
    Image.fromarray(shapes[:8, :8]).save(folder / "tiny.png")
    _write_png_header_only(folder / "bomb.png", 20000, 10000)
    Image.fromarray(shapes).save(folder / "latin1.png")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    Image.fromarray(shapes).save(folder / "nocaption.png")


def _write_bad_videos(folder: Path) -> None:
    good = write_clip(folder / "_source.mp4", seed=1).read_bytes()
    (folder / "_source.mp4").unlink()
    (folder / "corrupt.mp4").write_bytes(b"\x00" * 64 + good[64:])
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 2])
    fast = write_clip(folder / "_fast.mp4", seed=2).read_bytes()
    (folder / "_fast.mp4").unlink()
    write_clip(folder / "_faststart.mp4", seed=2)
    with av.open(str(folder / "_faststart.mp4")) as src, av.open(str(folder / "_fs.mp4"), "w", options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    data = (folder / "_fs.mp4").read_bytes()
    (folder / "truncated_faststart.mp4").write_bytes(data[: len(data) * 2 // 3])
    for tmp in ("_faststart.mp4", "_fs.mp4"):
        (folder / tmp).unlink()
    del fast
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    write_clip(folder / "short.mp4", num_frames=5, seed=3)
    Image.fromarray(moving_shapes(1, 48, 64, seed=4)[0]).save(folder / "image_named.mp4", format="PNG")
    write_clip(folder / "_v.mp4", seed=6).rename(folder / "video_named.png")
    _write_rotated_clip(folder / "rotated_video.mp4")


@pytest.fixture(scope="session")
def bad_media(tmp_path_factory) -> Path:
    """A folder with one good clip, one good image and every bad-media case
    (:data:`BAD_MEDIA` skipped, :data:`CONVERTED` handled)."""
    folder = tmp_path_factory.mktemp("bad_media")
    write_clip(folder / "good.mp4", seed=0)
    caption(folder / "good.mp4", "a good [trigger] clip")
    Image.fromarray(moving_shapes(1, 48, 64, seed=8)[0]).save(folder / "good.png")
    caption(folder / "good.png", "a good still")
    _write_images(folder)
    _write_bad_videos(folder)
    (folder / "notes.json").write_text("{}")
    return folder


@pytest.fixture(scope="session")
def letterboxed(tmp_path_factory) -> Path:
    """A clip with black bars top and bottom, and a normal one."""
    folder = tmp_path_factory.mktemp("letterbox")
    frames = moving_shapes(17, 64, 64, seed=2)
    frames[:, :8] = 0
    frames[:, -8:] = 0
    write_video(folder / "bars.mp4", frames, fps=16)
    write_clip(folder / "plain.mp4", num_frames=17, seed=3)
    return folder
