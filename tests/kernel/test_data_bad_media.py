"""Bad media never stops a run: every case is handled or skipped with one
warning naming the file and the reason, and counted in the report."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest_data import BAD_MEDIA, CONVERTED, caption, make_profile, write_clip
from PIL import Image

from wantrain.commands.dataset import dataset_command
from wantrain.data import build_train_data
from wantrain.data.demo import moving_shapes
from wantrain.errors import DataError
from wantrain.profile import DatasetConfig


def ds(folder, **kw) -> DatasetConfig:
    kw.setdefault("resolutions", (48,))
    kw.setdefault("num_frames", 9)
    return DatasetConfig(folder=str(folder), **kw)


@pytest.fixture(scope="module")
def scanned(bad_media):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("wantrain.data")
    logger.addHandler(handler)
    try:
        td = build_train_data(make_profile(ds(bad_media)), seed=0)
    finally:
        logger.removeHandler(handler)
    return td, [r.getMessage() for r in records]


def test_every_bad_file_is_skipped_with_its_reason(scanned, bad_media):
    td, _ = scanned
    summary = td.report.datasets[0]
    skipped = {path.split("/")[-1]: reason for path, reason in summary.skipped}
    assert set(skipped) == set(BAD_MEDIA)
    for name, fragment in BAD_MEDIA.items():
        assert fragment in skipped[name], (name, skipped[name])


def test_every_fixable_file_is_converted_and_kept(scanned):
    td, _ = scanned
    summary = td.report.datasets[0]
    converted = {path.split("/")[-1]: note for path, note in summary.converted}
    assert set(converted) == set(CONVERTED)
    for name, fragment in CONVERTED.items():
        assert fragment in converted[name], (name, converted[name])
    kept = {item.path.split("/")[-1] for item in td.datasets[0].items}
    assert kept == set(CONVERTED) | {"good.mp4", "good.png", "nocaption.png"}
    assert summary.items == len(kept) and summary.ignored == 1  # notes.json


def test_one_log_line_per_file_naming_it(scanned, bad_media):
    _, messages = scanned
    for name in BAD_MEDIA:
        lines = [m for m in messages if m.startswith(f"skip {bad_media / name}:")]
        assert len(lines) == 1, (name, lines)
    for name in CONVERTED:
        lines = [m for m in messages if m.startswith(f"convert {bad_media / name}:")]
        assert len(lines) == 1, (name, lines)


def test_no_caption_and_no_default_is_a_warning(scanned, bad_media):
    td, _ = scanned
    warned = [w for f, w in td.report.datasets[0].warnings if f.endswith("nocaption.png")]
    assert any("no caption" in w for w in warned)
    with_default = build_train_data(make_profile(ds(bad_media, default_caption="a thing")), seed=0)
    assert not any("no caption" in w for _, w in with_default.report.datasets[0].warnings)


def test_every_kept_item_loads(scanned):
    td, _ = scanned
    for spec in (s for s in _all_specs(td)):
        pixels = td.load(spec)
        assert pixels.shape == (3, len(spec.indices), spec.bucket[1], spec.bucket[0])
        assert torch.isfinite(pixels).all()


def _all_specs(td):
    from wantrain.data import Draw, make_spec

    ds = td.datasets[0]
    return [make_spec(ds, u, Draw(0.5, False, False, False)) for u in range(len(ds.units))]


def test_a_file_that_fails_while_training_is_replaced_and_reported(tmp_path, caplog):
    for i in range(3):
        Image.fromarray(moving_shapes(1, 48, 64, seed=i)[0]).save(tmp_path / f"ok{i}.jpg", quality=90)
        caption(tmp_path / f"ok{i}.jpg", f"image {i}")
    good = (tmp_path / "ok0.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])  # header fine, data cut
    profile = make_profile(ds(tmp_path))
    with caplog.at_level(logging.WARNING, logger="wantrain.data"):
        td = build_train_data(profile, seed=0)
        assert td.report.datasets[0].items == 4  # the scan cannot tell
        got = [td.next_batch(2) for _ in range(10)]
    assert all(len(b.paths) == 2 and b.pixels.shape == (2, 3, 1, 48, 48) for b in got)
    assert not any(p.endswith("cut.jpg") for b in got for p in b.paths)
    assert [f.split("/")[-1] for f, _ in td.report.datasets[0].skipped] == ["cut.jpg"]
    assert sum("skip" in r.getMessage() and "cut.jpg" in r.getMessage() for r in caplog.records) == 1
    with_workers = build_train_data(profile, seed=0, num_workers=2)
    try:
        again = [with_workers.next_batch(2) for _ in range(10)]
    finally:
        with_workers.close()
    assert [b.paths for b in again] == [b.paths for b in got]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(again, got))
    assert [f.split("/")[-1] for f, _ in with_workers.report.datasets[0].skipped] == ["cut.jpg"]


def test_a_dataset_of_only_bad_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(DataError) as err:
        build_train_data(make_profile(ds(tmp_path)), seed=0)
    assert err.value.lines() == [
        f"error: datasets[0].folder: no usable image or video: 2 files skipped (run `wantrain dataset` to see why) "
        f"(got '{tmp_path}'); add media or point folder at the right place"
    ]


# ---------------------------------------------------------------- wantrain dataset


def _toml(tmp_path, folder, **extra) -> str:
    lines = ["[job]", 'name = "d"', 'trigger_word = "sks"', "[[datasets]]", f'folder = "{folder}"', "resolutions = [48]", "num_frames = 9"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "p.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_dataset_command_text(bad_media, tmp_path, capsys):
    assert dataset_command(_toml(tmp_path, bad_media), [], as_json=False) == 0
    out = capsys.readouterr().out
    assert "dataset 0:" in out and "13 items" in out and "10 skipped" in out
    assert "bucket 48: 48x48 x9: 3 items" in out and "caption exif_rotated.jpg: 'sks'" in out
    assert f"skip {bad_media / 'empty.mp4'}: empty file (0 bytes)" in out
    assert f"convert {bad_media / 'gray.png'}: grayscale" in out


def test_dataset_command_json_and_letterbox(letterboxed, tmp_path, capsys):
    code = dataset_command(_toml(tmp_path, letterboxed), ["datasets[0].num_frames=5"], as_json=True)
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["problems"] == []
    (entry,) = report["datasets"]
    assert entry["items"] == 2 and entry["num_frames"] == 5
    bars = [w for w in entry["warnings"] if "letterboxed" in w["warning"]]
    assert [w["file"].split("/")[-1] for w in bars] == ["bars.mp4"]
    assert "8+8 px of 64 height" in bars[0]["warning"]
    assert {b["frames"] for b in entry["buckets"]} == {5}


def test_dataset_command_reports_problems_with_exit_2(tmp_path, capsys):
    assert dataset_command(_toml(tmp_path, tmp_path / "missing"), [], as_json=False) == 2
    err = capsys.readouterr().err
    assert "error: datasets[0].folder: folder not found" in err


def test_short_clip_in_fps_mode_names_the_durations(tmp_path):
    write_clip(tmp_path / "short.mp4", num_frames=12, seed=1)
    write_clip(tmp_path / "long.mp4", num_frames=40, seed=2)
    td = build_train_data(make_profile(ds(tmp_path, frame_sampling="fps", num_frames=17)), seed=0)
    (skip,) = td.report.datasets[0].skipped
    assert skip[0].endswith("short.mp4") and "0.69 s" in skip[1] and "1.00 s" in skip[1]
