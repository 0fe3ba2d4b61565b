"""wantrain.data: buckets, frame plans, captions, mixing, order and resume,
on real clips and images."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from conftest_data import caption, make_profile, write_clip
from PIL import Image

from wantrain import data
from wantrain.data import Item, build_train_data, bucket_for, fps_indices, uniform_indices
from wantrain.data.demo import moving_shapes
from wantrain.data.media import read_frames, write_video
from wantrain.errors import DataError
from wantrain.profile import DatasetConfig


def ds(folder, **kw) -> DatasetConfig:
    kw.setdefault("resolutions", (64,))
    kw.setdefault("num_frames", 9)
    return DatasetConfig(folder=str(folder), **kw)


def batches(td, n, batch_size=2):
    return [td.next_batch(batch_size) for _ in range(n)]


def same(a, b) -> bool:
    return all(torch.equal(x.pixels, y.pixels) and x.captions == y.captions and x.templates == y.templates
               and x.paths == y.paths and x.cache_keys == y.cache_keys for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- buckets


@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (1000, 1000), (3000, 300), (640, 480), (500, 1250)])
@pytest.mark.parametrize("resolution", [256, 512, 768])
def test_bucket_rules(size, resolution):
    w, h = size
    bw, bh = bucket_for(w, h, resolution)
    assert bw % 16 == 0 and bh % 16 == 0
    assert bw * bh <= resolution * resolution
    assert bw <= w and bh <= h  # never upscaled
    # no other 16-multiple bucket of the same constraints is closer in aspect ratio
    error = abs(np.log(bw / bh / (w / h)))
    for cw in range(16, w + 1, 16):
        ch = min(resolution * resolution // cw, h) // 16 * 16
        if ch >= 16:
            assert abs(np.log(cw / ch / (w / h))) >= error - 1e-12


def test_bucket_examples_and_small_items():
    assert bucket_for(1920, 1080, 512) == (672, 384)
    assert bucket_for(1000, 1000, 512) == (512, 512)
    assert bucket_for(100, 75, 512) == (80, 64)  # small: kept at native scale, not upscaled
    assert data.needs_upscaling(100, 75, 512) and not data.needs_upscaling(1920, 1080, 512)


def test_crop_box_covers_then_centres():
    left, top, right, bottom = data.crop_box(200, 100, (64, 64))
    assert (left, top, right, bottom) == (50.0, 0.0, 150.0, 100.0)


def test_resize_crop_keeps_the_centre(tmp_path):
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 50:150] = 200  # the centre square is bright, the sides dark
    out = data.resize_crop(frame, (32, 32))
    assert out.shape == (32, 32, 3) and out[:, 1:-1].min() >= 195 and out.mean() > 195


def test_assignment_is_per_resolution_and_batches_hold_one_bucket(demo_data):
    td = build_train_data(make_profile(ds(demo_data, resolutions=(32, 64), num_frames=9)), seed=1)
    assert len(td.datasets[0].units) == 14  # 7 items x 2 resolutions
    for batch in batches(td, 30, batch_size=3):
        assert batch.pixels.ndim == 5 and batch.pixels.shape[1] == 3
        assert batch.pixels.dtype == torch.float32
        assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
        frames = batch.pixels.shape[2]
        assert frames == (1 if batch.paths[0].endswith(".png") else 9)
        assert all(p.endswith(".png") == (frames == 1) for p in batch.paths)  # one frame count per batch


# ---------------------------------------------------------------- frames


def test_uniform_indices_spread_over_the_clip():
    assert uniform_indices(33, 9) == (0, 4, 8, 12, 16, 20, 24, 28, 32)
    assert uniform_indices(320, 33)[0] == 0 and uniform_indices(320, 33)[-1] == 319
    assert uniform_indices(9, 9) == tuple(range(9))
    assert uniform_indices(33, 1) == (16,)


def test_fps_indices_keep_real_speed():
    clip30 = Item(path="x", kind="video", width=64, height=64, num_frames=300, fps=30.0, template="")
    got = fps_indices(clip30, 17, start=2.0)
    assert got[0] == 60 and got[-1] == 90  # 1 s at 16 fps = 1 s of the 30 fps source
    clip16 = Item(path="x", kind="video", width=64, height=64, num_frames=100, fps=16.0, template="")
    assert fps_indices(clip16, 9, start=1.0) == tuple(range(16, 25))  # consecutive frames at 16 fps


def test_fps_windows_are_seeded_and_differ_between_epochs(tmp_path):
    write_clip(tmp_path / "long.mp4", num_frames=96, seed=1)
    profile = make_profile(ds(tmp_path, frame_sampling="fps", num_frames=9, repeats=1))
    td = build_train_data(profile, seed=5)
    firsts = [b.specs[0].indices[0] for b in batches(td, 8, batch_size=1)]
    assert len(set(firsts)) > 3  # a new window each epoch
    indices = td.next_batch(1).specs[0].indices
    assert all(b - a == 1 for a, b in zip(indices, indices[1:]))  # 16 fps source: consecutive frames
    again = build_train_data(profile, seed=5)
    assert [b.specs[0].indices[0] for b in batches(again, 8, batch_size=1)] == firsts


def test_fps_frames_are_the_decoded_source_frames(tmp_path):
    frames = moving_shapes(40, 48, 64, seed=3)
    write_video(tmp_path / "c.mp4", frames, fps=16)
    td = build_train_data(make_profile(ds(tmp_path, frame_sampling="fps", num_frames=5, resolutions=(64,))), seed=0)
    batch = td.next_batch(1)
    indices = list(batch.specs[0].indices)
    expected = read_frames(tmp_path / "c.mp4", indices)  # 64x48 item at 64 -> bucket 64x48: no resize
    got = ((batch.pixels[0].permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(got, expected)


def test_uniform_speed_warning(tmp_path, caplog):
    write_clip(tmp_path / "long.mp4", num_frames=160, seed=1)  # 10 s
    write_clip(tmp_path / "ok.mp4", num_frames=33, seed=2)  # 2 s
    with caplog.at_level(logging.WARNING, logger="wantrain.data"):
        td = build_train_data(make_profile(ds(tmp_path, num_frames=17)), seed=0)
    speed = {w[0].split("/")[-1]: w[1] for w in td.report.datasets[0].warnings if "speeds" in w[1]}
    assert "speeds this clip up 9.9x" in speed["long.mp4"] and "ok.mp4" not in speed  # 2x is allowed
    assert any("long.mp4" in r.getMessage() and "speeds" in r.getMessage() for r in caplog.records)


def test_images_in_a_video_dataset_are_one_frame_samples(demo_data):
    td = build_train_data(make_profile(ds(demo_data, num_frames=17)), seed=0)
    keys = {data.frames_for(i, td.datasets[0].config) for i in td.datasets[0].items if i.kind == "image"}
    assert keys == {1}


# ---------------------------------------------------------------- captions


def test_caption_template_rules():
    t = data.caption_template
    assert t("a [trigger] dog", "sks", False) == "a [trigger] dog"
    assert t("a [Trigger] dog", "sks", False) == "a [trigger] dog"
    assert t("a sks dog", "sks", False) == "a [trigger] dog"  # literal word counts
    assert t("a sksx dog", "sks", False) == "[trigger], a sksx dog"  # only whole words
    assert t("a dog", "sks", False) == "[trigger], a dog"  # prepended when absent
    assert t("a dog", "sks", True) == "a dog"  # never added to regularization captions
    assert t("", "sks", False) == "[trigger]"
    assert t("a dog", None, False) == "a dog"
    assert data.final_caption("[trigger], a dog", "sks") == "sks, a dog"


def test_captions_files_default_and_trigger(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(moving_shapes(1, 32, 32, seed=1)[0]).save(tmp_path / f"{name}.png")
    caption(tmp_path / "a.png", "  photo of\n[trigger]  person \n")
    td = build_train_data(make_profile(ds(tmp_path, resolutions=(32,), default_caption="a picture")), seed=0)
    got = {}
    for _ in range(4):
        b = td.next_batch(1)
        got[b.paths[0].split("/")[-1]] = (b.captions[0], b.templates[0])
    assert got["a.png"] == ("photo of sks person", "photo of [trigger] person")
    assert got["b.png"] == ("sks, a picture", "[trigger], a picture")


def test_trigger_placeholder_without_trigger_word_is_an_error(tmp_path):
    Image.fromarray(moving_shapes(1, 32, 32, seed=1)[0]).save(tmp_path / "a.png")
    caption(tmp_path / "a.png", "a [trigger] dog")
    with pytest.raises(DataError) as err:
        build_train_data(make_profile(ds(tmp_path, resolutions=(32,)), trigger_word=None), seed=0)
    assert "job.trigger_word" in str(err.value) and "a.png" in str(err.value)


def test_caption_dropout_rate_and_what_is_dropped(demo_data):
    td = build_train_data(make_profile(ds(demo_data, resolutions=(32,), caption_dropout=0.3)), seed=0)
    td.skip_pixels([0])  # captions only: no decoding needed
    captions, templates = [], []
    for b in batches(td, 200, batch_size=2):
        captions += b.captions
        templates += b.templates
    dropped = sum(c == "" for c in captions) / len(captions)
    assert 0.22 < dropped < 0.38
    assert all((c == "") == (t is None) for c, t in zip(captions, templates))  # the whole caption, trigger included
    assert all("sks" in c for c in captions if c)


# ---------------------------------------------------------------- mixing, order, resume


def test_datasets_are_mixed_by_weight_and_regularization_is_flagged(demo_data, tmp_path):
    reg = tmp_path / "reg"
    reg.mkdir()
    for i in range(3):
        Image.fromarray(moving_shapes(1, 32, 32, seed=20 + i)[0]).save(reg / f"r{i}.png")
        caption(reg / f"r{i}.png", "a person")
    profile = make_profile(ds(demo_data, resolutions=(32,), weight=3.0), ds(reg, resolutions=(32,), weight=1.0, is_regularization=True))
    td = build_train_data(profile, seed=0)
    td.skip_pixels([0, 1])
    got = batches(td, 400, batch_size=1)
    counts = Counter(b.dataset_index[0] for b in got)
    assert 0.68 < counts[0] / 400 < 0.82
    assert all(b.is_regularization == [b.dataset_index[0] == 1] for b in got)
    assert all(b.captions == ["a person"] for b in got if b.dataset_index[0] == 1)  # no trigger added


def test_repeats_and_every_item_once_per_epoch(demo_data):
    td = build_train_data(make_profile(ds(demo_data, resolutions=(32,), repeats=2)), seed=3)
    got = batches(td, 7, batch_size=2)  # 4 clips x2 -> 4 batches, 3 images x2 -> 3 batches
    seen = Counter(p for b in got for p in b.paths)
    assert set(seen.values()) == {2} and len(seen) == 7
    assert td.state_dict()["datasets"][0] == {"epoch": 0, "cursor": 7}


def test_same_seed_same_bits_other_seed_other_order(demo_data):
    profile = make_profile(ds(demo_data, resolutions=(32,), flip_x=True, flip_y=True, caption_dropout=0.2))
    a = batches(build_train_data(profile, seed=1), 12)
    b = batches(build_train_data(profile, seed=1), 12)
    c = batches(build_train_data(profile, seed=2), 12)
    assert same(a, b)
    assert [x.paths for x in a] != [x.paths for x in c]


def test_flips_mirror_the_pixels(demo_data):
    plain = build_train_data(make_profile(ds(demo_data, resolutions=(32,))), seed=4)
    flipped = build_train_data(make_profile(ds(demo_data, resolutions=(32,), flip_x=True)), seed=4)
    seen = 0
    for a, b in zip(batches(plain, 20, 1), batches(flipped, 20, 1)):
        assert a.paths == b.paths
        if b.specs[0].flip_x:
            assert torch.equal(a.pixels.flip(-1), b.pixels) and a.cache_keys != b.cache_keys
            seen += 1
        else:
            assert torch.equal(a.pixels, b.pixels)
    assert 3 <= seen <= 17


def test_resume_continues_exactly(demo_data):
    profile = make_profile(ds(demo_data, resolutions=(32, 48), frame_sampling="fps", flip_x=True, caption_dropout=0.3))
    full = batches(build_train_data(profile, seed=9), 25)
    first = build_train_data(profile, seed=9)
    batches(first, 11)
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON
    resumed = build_train_data(profile, seed=9)
    resumed.load_state_dict(state)
    assert same(batches(resumed, 14), full[11:])


def test_workers_give_the_same_batches_and_resume(demo_data):
    profile = make_profile(ds(demo_data, resolutions=(32,), num_frames=9, frame_sampling="fps", flip_x=True))
    serial = build_train_data(profile, seed=2, num_workers=0)
    reference = batches(serial, 10)
    parallel = build_train_data(profile, seed=2, num_workers=2)
    try:
        got = batches(parallel, 6)
        state = parallel.state_dict()
        assert same(got, reference[:6])
        assert state == {**serial.state_dict(), "datasets": state["datasets"], "step": 6}
    finally:
        parallel.close()
    resumed = build_train_data(profile, seed=2, num_workers=2)
    try:
        resumed.load_state_dict(state)
        assert same(batches(resumed, 4), reference[6:])
    finally:
        resumed.close()


def test_changing_batch_size_starts_a_new_epoch(demo_data):
    td = build_train_data(make_profile(ds(demo_data, resolutions=(32,))), seed=0)
    batches(td, 2, batch_size=2)
    td.next_batch(3)
    assert td.state_dict()["datasets"][0] == {"epoch": 1, "cursor": 1}


def test_state_dict_of_other_datasets_is_refused(demo_data, tmp_path):
    one = build_train_data(make_profile(ds(demo_data, resolutions=(32,))), seed=0)
    two = build_train_data(make_profile(ds(demo_data, resolutions=(32,)), ds(demo_data, resolutions=(48,))), seed=0)
    with pytest.raises(DataError, match="does not match"):
        two.load_state_dict(one.state_dict())


# ---------------------------------------------------------------- errors, cache keys


def test_missing_folder_and_empty_dataset_are_errors_before_any_model(tmp_path, demo_data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("hi")
    profile = make_profile(ds(tmp_path / "nope"), ds(tmp_path / "empty"), ds(demo_data))
    with pytest.raises(DataError) as err:
        build_train_data(profile, seed=0)
    lines = err.value.lines()
    assert len(lines) == 2
    assert lines[0].startswith("error: datasets[0].folder: folder not found")
    assert lines[1].startswith("error: datasets[1].folder: no usable image or video")
    with pytest.raises(DataError, match="no \\[\\[datasets\\]\\]"):
        build_train_data(make_profile(), seed=0)


def test_cache_keys_follow_content_and_latent_settings(tmp_path):
    write_clip(tmp_path / "c.mp4", num_frames=33, seed=1)
    key = lambda **kw: build_train_data(make_profile(ds(tmp_path, **kw)), seed=0).next_batch(1).cache_keys[0]  # noqa: E731
    base = key()
    assert key() == base
    assert key(num_frames=17) != base
    assert key(resolutions=(32,)) != base
    assert key(frame_sampling="fps") != base
    assert key(caption_dropout=0.5) == base  # captions do not change the latent
    write_clip(tmp_path / "c.mp4", num_frames=33, seed=2)  # new content, same name
    assert key() != base


def test_iter_items_lists_every_cached_variant(tmp_path):
    write_clip(tmp_path / "c.mp4", num_frames=96, seed=1)  # 6 s
    Image.fromarray(moving_shapes(1, 48, 64, seed=2)[0]).save(tmp_path / "s.png")
    profile = make_profile(ds(tmp_path, frame_sampling="fps", num_frames=17, flip_x=True, cache_latents=True))
    td = build_train_data(profile, seed=0)
    specs = list(td.iter_items())
    video = [s for s in specs if s.kind == "video"]
    windows = {s.indices for s in video}
    assert len(windows) == len(data.window_starts(td.datasets[0].items[0], 17)) == 8
    assert len(video) == 16 and len([s for s in specs if s.kind == "image"]) == 2  # x2 flips
    assert len({s.cache_key() for s in specs}) == len(specs)
    seen = {k for b in batches(td, 40, batch_size=1) for k in b.cache_keys}
    assert seen <= {s.cache_key() for s in specs}  # training only ever asks for cached variants
    assert not list(build_train_data(make_profile(ds(tmp_path)), seed=0).iter_items())


def test_skip_pixels_gives_batches_without_decoding(demo_data):
    td = build_train_data(make_profile(ds(demo_data, resolutions=(32,))), seed=0)
    reference = td.next_batch(2)
    td2 = build_train_data(make_profile(ds(demo_data, resolutions=(32,))), seed=0)
    td2.skip_pixels([0])
    batch = td2.next_batch(2)
    assert batch.pixels is None and batch.cache_keys == reference.cache_keys
    assert torch.equal(torch.stack([td2.load(s) for s in batch.specs]), reference.pixels)
