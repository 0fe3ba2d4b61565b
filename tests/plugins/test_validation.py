"""validation: held-out items (a role = "held_out" dataset, or a fraction of
the training files, never trained on), fixed timesteps and noise, the
metrics in TensorBoard and validation.jsonl, the best pair -- and measuring
never changes the run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from wantrain.errors import ProfileError
from wantrain.loop import load, setup, train
from wantrain.plugins import validation as val
from wantrain.profile import load_profile


def _held_out_folder(demo_data, tmp_path):
    folder = tmp_path / "held_out"
    folder.mkdir()
    for clip in sorted(demo_data.glob("*.mp4"))[:2]:
        shutil.copy(clip, folder / f"val_{clip.name}")
    return folder


def test_a_validation_run_logs_comparable_losses_and_never_changes_training(profile_data, demo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = train(load_profile(data=profile_data))
    reference = {e: load_file(str(plain.output_dir / f"t_{e}.safetensors")) for e in ("high_noise", "low_noise")}
    profile_data["job"]["output_dir"] = str(tmp_path / "val_out")
    profile_data["datasets"].append({**profile_data["datasets"][0], "folder": str(_held_out_folder(demo_data, tmp_path)),
                                     "role": "held_out"})
    profile_data["plugins"] = {"enabled": ["validation", "tensorboard"],
                               "validation": {"every": 2, "timesteps": 2, "best": True}}
    run = train(load_profile(data=profile_data))
    for e, tensors in reference.items():  # the same training: validation took no training RNG, no data
        ours = load_file(str(run.output_dir / f"t_{e}.safetensors"))
        assert all(torch.equal(ours[k], tensors[k]) for k in tensors)
    lines = [json.loads(ln) for ln in (run.output_dir / "validation.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [0, 2, 4]
    assert {k for k in lines[0] if k.startswith("val/t")} == {f"val/t{round(t):04d}" for e in ("high_noise", "low_noise")
                                                              for t in val.fixed_timesteps(*run.expert_range(e), 2)}
    assert lines[0]["val/loss"] == pytest.approx((lines[0]["val/high_noise"] + lines[0]["val/low_noise"]) / 2)
    plugin = run.pm.get_plugin("validation")
    assert plugin.evaluate(run) == {k: v for k, v in lines[-1].items() if k != "step"}  # fixed noise and timesteps
    events = EventAccumulator(str(run.output_dir / "tensorboard")).Reload()
    assert {"val/loss", "val/high_noise", "val/low_noise"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]
    best = json.loads((run.output_dir / "best" / "best.json").read_text())
    assert best["val_loss"] == min(ln["val/loss"] for ln in lines)
    assert len(list((run.output_dir / "best").glob("*.safetensors"))) == 2


def test_a_fraction_is_held_out_of_training(profile_data):
    profile_data["plugins"] = {"enabled": ["validation"], "validation": {"fraction": 0.3}}
    run = setup(load_profile(data=profile_data))
    load(run)
    picked = run.pm.get_plugin("validation").pick(run)
    held = {spec.path for spec, _ in picked}
    files = {i.path for ds in run.data.datasets for i in ds.items}
    assert held and held < files
    want = {p for p in files if val.held_out(p, 0.3)}
    assert want, "the demo data should hash some files under 0.3"
    assert held == want
    seen = {p for _ in range(12) for p in run.data.next_batch(1).paths}
    assert seen and not seen & held
    run.data.close()


@pytest.mark.parametrize("max_items", [1, 100])
def test_only_measured_files_leave_training_and_never_a_whole_dataset(profile_data, monkeypatch, max_items):
    """Every file held out by the hash: one file of each bucket (clips, stills)
    still trains; with max_items = 1 only that one file leaves."""
    monkeypatch.setattr(val, "held_out", lambda path, fraction: True)
    profile_data["plugins"] = {"enabled": ["validation"], "validation": {"fraction": 0.5, "max_items": max_items}}
    run = setup(load_profile(data=profile_data))
    load(run)
    held = {spec.path for spec, _ in run.pm.get_plugin("validation").pick(run)}
    files = {i.path for ds in run.data.datasets for i in ds.items}
    buckets = {ds.units[u].key for ds in run.data.datasets for u in range(len(ds.units))}
    assert len(held) == min(max_items, len(files) - len(buckets))
    seen = {p for _ in range(40) for p in run.data.next_batch(1).paths}
    assert seen == files - held
    run.data.close()


def test_fixed_timesteps_are_midpoints_and_the_profile_needs_held_out_items(profile_data):
    assert val.fixed_timesteps(875.0, 1000.0, 4) == [890.625, 921.875, 953.125, 984.375]
    profile_data["plugins"] = {"enabled": ["validation"]}
    from wantrain.run import open_run

    with pytest.raises(ProfileError, match="plugins.validation: has no held-out items"):
        open_run(load_profile(data=profile_data), purpose="inspect")


def test_every_dataset_held_out_is_one_line_from_check(profile_data):
    from wantrain.commands.check import check

    profile_data["datasets"][0]["role"] = "held_out"
    profile_data["plugins"] = {"enabled": ["validation"]}
    lines = [p.line() for p in check(load_profile(data=profile_data))]
    assert any(line.startswith('error: datasets: has no dataset to train on: every one is role = "held_out"') for line in lines), lines
