"""wantrain.media on real H.264 clips and images written by the tests."""

from __future__ import annotations

import hashlib

import av
import numpy as np
import pytest
from conftest_data import write_clip
from PIL import Image

from wantrain.data import demo, media
from wantrain.data.demo import moving_shapes
from wantrain.data.media import MediaError, probe_image, probe_video, read_all_frames, read_frames, read_image, write_video


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """150 frames, keyframe every 24, B-frames on: seeks and skips happen."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    write_clip(path, num_frames=150, width=64, height=48, seed=11, options={"g": "24"})
    return path, read_all_frames(path)


def test_write_video_is_h264_yuv420p_and_round_trips(tmp_path):
    frames = moving_shapes(9, 48, 64, seed=1)
    path = write_video(tmp_path / "c.mp4", frames, fps=16)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16 and stream.frames == 9
    decoded = read_all_frames(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4  # lossy but close


def test_write_video_rejects_odd_sizes_and_wrong_dtype(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3), np.float32))


def test_demo_data_is_small_captioned_and_reproducible(tmp_path):
    first = demo.write_demo_data(tmp_path / "a", seed=0)
    second = demo.write_demo_data(tmp_path / "b", seed=0)
    assert [p.suffix for p in first].count(".mp4") == 4 and [p.suffix for p in first].count(".png") == 3
    for a, b in zip(first, second):
        assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
        assert a.with_suffix(".txt").read_text(encoding="utf-8").strip()
    assert sum("[trigger]" in p.with_suffix(".txt").read_text() for p in first) >= 3
    info = probe_video(first[0])
    assert (info.width, info.height, info.num_frames, info.fps) == (96, 64, 33, 16.0)
    other = demo.write_demo_data(tmp_path / "c", seed=1)
    assert not np.array_equal(read_all_frames(first[0]), read_all_frames(other[0]))


@pytest.mark.parametrize(
    "indices",
    [[0], [149], [0, 1, 2, 3], list(range(0, 150, 37)), [100, 5, 5, 140, 60], list(range(70, 103)), [10, 11, 120, 121, 149]],
)
def test_read_frames_matches_decoding_every_frame(long_clip, indices):
    path, reference = long_clip
    got = read_frames(path, indices)
    assert got.dtype == np.uint8 and got.shape == (len(indices), 48, 64, 3)
    assert np.array_equal(got, reference[indices])


def test_read_frames_random_sets_match_reference(long_clip):
    path, reference = long_clip
    rng = np.random.default_rng(0)
    for _ in range(15):
        indices = sorted(rng.choice(150, size=int(rng.integers(1, 34)), replace=False).tolist())
        assert np.array_equal(read_frames(path, indices), reference[indices]), indices
        assert np.array_equal(read_frames(path, indices, threads=False), reference[indices])


def test_far_frames_start_segments_at_keyframes(long_clip):
    path, _ = long_clip
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        segments = media._plan_segments(container, stream, [2, 100, 140], media._rate(stream))
    with av.open(str(path)) as container:
        keyframes = [i for i, f in enumerate(container.decode(video=0)) if f.key_frame]
    expected = [max(k for k in keyframes if k <= i) for i in (100, 140)]
    assert len(keyframes) >= 6 and expected[0] > 2
    assert [s.start for s in segments] == [0, *expected]  # decoding restarts at the keyframe before
    assert [s.indices for s in segments] == [[2], [100], [140]]


def test_read_frames_on_clip_without_bframes_or_with_one_gop(tmp_path):
    frames = moving_shapes(60, 32, 32, seed=4)
    for name, options in (("nob.mp4", {"bf": "0", "g": "10"}), ("onegop.mp4", {"g": "600"})):
        path = write_video(tmp_path / name, frames, options=options)
        reference = read_all_frames(path)
        for indices in ([0, 59], [7, 33, 50], list(range(20, 45, 3))):
            assert np.array_equal(read_frames(path, indices), reference[indices])


def test_read_frames_honours_display_rotation(bad_media):
    info = probe_video(bad_media / "rotated_video.mp4")
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    frames = read_frames(bad_media / "rotated_video.mp4", [0, 4])
    assert frames.shape == (2, 64, 48, 3)
    with av.open(str(bad_media / "rotated_video.mp4")) as container:
        raw = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(frames[0], np.rot90(raw, k=1))  # 90° counter-clockwise


def test_read_frames_beyond_the_end_fails_with_a_reason(tmp_path):
    path = write_clip(tmp_path / "c.mp4", num_frames=9)
    with pytest.raises(MediaError, match="frames stop at 8"):
        read_frames(path, [0, 40])


def test_probe_video_rejects_broken_files(bad_media):
    for name, fragment in (("corrupt.mp4", "not a readable video"), ("truncated.mp4", "not a readable video"),
                           ("truncated_faststart.mp4", "truncated video")):
        with pytest.raises(MediaError, match=fragment):
            probe_video(bad_media / name)


def test_mid_stream_corruption_decodes_without_crashing(tmp_path):
    path = write_clip(tmp_path / "c.mp4", num_frames=33, seed=3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 200] = bytes(200)
    path.write_bytes(bytes(data))
    try:
        frames = read_frames(path, [0, 16, 32])
        assert frames.shape == (3, 48, 64, 3)
    except MediaError as exc:  # either outcome is fine; a crash is not
        assert "corrupt" in str(exc) or "truncated" in str(exc)


# ---------------------------------------------------------------- images


def test_exif_rotation_is_applied(bad_media):
    info = probe_image(bad_media / "exif_rotated.jpg")
    assert (info.width, info.height) == (32, 64)  # stored 64x32, orientation 6
    image = read_image(bad_media / "exif_rotated.jpg")
    stored = np.asarray(Image.open(bad_media / "exif_rotated.jpg").convert("RGB"))
    assert image.shape == (64, 32, 3)
    assert np.array_equal(image, np.rot90(stored, k=-1))  # 90° clockwise


def test_grayscale_16bit_alpha_palette_become_rgb8(bad_media):
    for name in ("gray.png", "gray16.png", "rgb16.png", "rgba.png", "palette_alpha.png"):
        image = read_image(bad_media / name)
        assert image.dtype == np.uint8 and image.shape == (48, 64, 3), name
    gray16 = read_image(bad_media / "gray16.png")
    assert gray16[0, 0, 0] == 0 and gray16[-1, -1, 0] == 255  # full range kept
    assert np.array_equal(gray16[..., 0], gray16[..., 2])
    rgba = read_image(bad_media / "rgba.png")
    assert (rgba[:, :32] == 255).all()  # transparent half flattened onto white
    assert not (rgba[:, 32:] == 255).all()


def test_huge_jpeg_decodes_at_reduced_scale(bad_media):
    info = probe_image(bad_media / "huge.jpg")
    assert (info.width, info.height) == (12000, 9000)
    assert any("very large" in n for n in info.notes)
    image = read_image(bad_media / "huge.jpg", min_size=(64, 48))
    assert image.shape[0] >= 48 and image.shape[1] >= 64 and image.shape[1] <= 3000


def test_unreadable_and_truncated_images(bad_media, tmp_path):
    with pytest.raises(MediaError, match="not a readable image"):
        probe_image(bad_media / "text.jpg")
    good = (bad_media / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    for reader in (probe_image, read_image):
        with pytest.raises(MediaError, match="truncated or corrupt image"):
            reader(tmp_path / "cut.png")


def test_sniff_tells_content_from_extension(bad_media):
    assert media.sniff(bad_media / "image_named.mp4") == "image"
    assert media.sniff(bad_media / "video_named.png") == "video"
    assert media.sniff(bad_media / "text.jpg") is None
