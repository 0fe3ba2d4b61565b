"""The plugins in examples/ work as docs/plugins.md says: the loss-spike
alarm as a ``.py`` path, the stratified sampler installed with pip and found
through its entry point -- both through real tiny profiles."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wantrain import registry
from wantrain.loop import train
from wantrain.profile import load_profile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"
ALARM = str(EXAMPLES / "loss_spike_alarm.py")
PACKAGE = EXAMPLES / "wantrain-stratified-timesteps"


def test_loss_spike_alarm_stops_and_saves(profile_data):
    profile_data["training"]["steps"] = 6
    profile_data["plugins"] = {"enabled": [ALARM], ALARM: {"factor": 1e-6, "warmup": 2}}  # any loss is a "spike"
    run = train(load_profile(data=profile_data))
    assert run.stop_requested and run.step == 3  # two steps to arm, the third trips it
    out = Path(profile_data["job"]["output_dir"])
    assert (out / "checkpoints" / "step_000000003").is_dir()  # saved, resumable
    assert not (out / "t_high_noise.safetensors").exists()  # no final files: the run did not finish


def test_loss_spike_alarm_stays_quiet_on_a_normal_run(profile_data):
    profile_data["plugins"] = {"enabled": [ALARM], ALARM: {"factor": 1000.0, "warmup": 1}}
    run = train(load_profile(data=profile_data))
    assert not run.stop_requested and run.step == profile_data["training"]["steps"]


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory):
    """pip-install the example package (offline, no deps) into a folder put on sys.path."""
    tmp = tmp_path_factory.mktemp("stratified")
    source, target = tmp / "src", tmp / "site"
    shutil.copytree(PACKAGE, source)  # builds leave build/ and *.egg-info beside the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(source)], check=True)
    sys.modules.pop("wantrain_stratified_timesteps", None)  # only the installed copy may answer
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("wantrain_stratified_timesteps", None)
    importlib.invalidate_caches()


def test_installed_sampler_runs_through_its_entry_point(installed_package, profile_data):
    assert "stratified_timesteps" in registry.entry_point_names()
    profile_data["training"]["steps"] = 4
    profile_data["plugins"] = {"enabled": ["stratified_timesteps"], "stratified_timesteps": {"slices": 4}}
    profile = load_profile(data=profile_data)
    module = registry.resolve("stratified_timesteps")
    assert module.__file__.startswith(str(installed_package))
    run = train(profile)
    assert run.step == 4
    plugin = run.pm.get_plugin("stratified_timesteps")
    assert plugin.config.slices == 4
    answered = run.pm.hook.sample_timesteps(run=run, expert="low_noise", batch_size=4, generator=torch.Generator().manual_seed(1))
    direct = plugin.sample_timesteps(run=run, expert="low_noise", batch_size=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(answered, direct)  # the event the kernel calls is answered by the package
    gen = torch.Generator().manual_seed(0)
    for expert in ("high_noise", "low_noise"):
        lo, hi = run.expert_range(expert)
        t = plugin.sample_timesteps(run=run, expert=expert, batch_size=8, generator=gen)
        assert t.shape == (8,) and bool(((t >= lo) & (t < max(hi, 1000.0 + 1e-3))).all())
        slices = ((t.double() - lo) / (hi - lo) * 4).floor().long().tolist()
        assert sorted(slices) == [0, 0, 1, 1, 2, 2, 3, 3]  # one draw per slice, twice round
