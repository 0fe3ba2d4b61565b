"""Resume: the state tree, finding checkpoints, profile checks, and exact
continuation after SIGKILL (real subprocesses), a kill between two files of
a save, and a graceful SIGTERM stop."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from wantrain.formats import safetensors as st
from wantrain.formats import state as state_files
from wantrain import resume
from wantrain.commands.cli import main as cli
from wantrain.errors import WantrainError
from wantrain.loop import setup
from wantrain.profile import load_profile

STEPS, EVERY = 6, 2

KILLER = textwrap.dedent(
    """
    '''Test plugin: SIGKILL this process at a step, or between the two LoRA files of a save.'''
    import os, signal
    from wantrain import hookimpl
    from wantrain.formats import safetensors as st

    AT = int(os.environ.get("WANTRAIN_TEST_KILL_AT", "0"))
    MODE = os.environ.get("WANTRAIN_TEST_KILL_MODE", "step")

    class Plugin:
        @hookimpl
        def on_run_start(self, run):
            if AT and MODE == "between_files":
                original = st.write_atomic
                def write_then_die(tensors, path, meta):
                    out = original(tensors, path, meta)
                    if f"_{AT:09d}_high_noise" in str(path):  # first file on disk, second not yet
                        os.kill(os.getpid(), signal.SIGKILL)
                    return out
                st.write_atomic = write_then_die

        @hookimpl
        def on_step(self, run, step):
            if AT and MODE == "step" and step == AT:
                os.kill(os.getpid(), signal.SIGKILL)
            if AT and MODE == "sigterm" and step == AT:
                os.kill(os.getpid(), signal.SIGTERM)
    """
)

# runs `wantrain run` in a fresh interpreter with the test process's thread count
# (same threads -> same CPU kernels -> same bits as the in-process reference)
RUNNER = "import sys, torch; torch.set_num_threads(int(sys.argv[1])); from wantrain.commands.cli import main; sys.exit(main(sys.argv[2:]))"


@pytest.fixture(scope="module")
def setup_files(tiny_model, demo_data, tmp_path_factory):
    """A profile file (checkpoints every 2 of 6 steps, EMA, multistage, the killer plugin) and
    the final files of an uninterrupted run of it (made in the same output
    folder, then moved aside, so even the metadata bytes compare)."""
    root = tmp_path_factory.mktemp("resume")
    (root / "killer.py").write_text(KILLER)
    data = {
        "job": {"name": "t", "device": "cpu", "trigger_word": "sks", "seed": 7, "output_dir": str(root / "out")},
        "model": {"name_or_path": str(tiny_model), "dtype": "fp32", "gradient_checkpointing": False, "max_sequence_length": 32},
        "target": {"rank": 4, "alpha": 8, "save_dtype": "fp32"},
        "training": {"steps": STEPS, "lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 1},
        "datasets": [{"folder": str(demo_data), "resolutions": [32], "num_frames": 5, "default_caption": "a [trigger] clip"}],
        # EMA (the final files hold its shadow) and multistage (turns of 3 steps) make the
        # bytes depend on restored plugin state too
        "plugins": {"enabled": ["multistage", "ema", "checkpoints", str(root / "killer.py")],
                    "multistage": {"switch_every": 3}, "ema": {"decay": 0.9},
                    "checkpoints": {"every": EVERY, "keep": 2}},
    }
    profile = root / "profile.toml"
    profile.write_text(tomli_w.dumps(data))
    assert cli(["run", str(profile)]) == 0
    reference = root / "reference"
    (root / "out").rename(reference)
    return profile, root / "out", reference


def _final_bytes(folder: Path) -> dict[str, bytes]:
    return {e: (folder / f"t_{e}.safetensors").read_bytes() for e in ("high_noise", "low_noise")}


def _killed_run(profile: Path, at: int, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANTRAIN_TEST_KILL_AT": str(at), "WANTRAIN_TEST_KILL_MODE": mode}
    return subprocess.run([sys.executable, "-c", RUNNER, str(torch.get_num_threads()), "run", str(profile)],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def fresh_out(setup_files):
    profile, out, reference = setup_files
    shutil.rmtree(out, ignore_errors=True)
    yield profile, out, reference
    shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------- exact resume


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_identical_bytes(fresh_out):
    profile, out, reference = fresh_out
    at = random.Random().randint(1, STEPS - 1)
    killed = _killed_run(profile, at, "step")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "t_high_noise.safetensors").exists()
    newest = resume.newest_checkpoint(out)
    assert (newest.step if newest else 0) == (at - 1) // EVERY * EVERY, f"killed at step {at}"
    assert cli(["run", str(profile)]) == 0
    assert _final_bytes(out) == _final_bytes(reference), f"killed at step {at}"


@pytest.mark.slow
def test_kill_between_the_two_files_of_a_save_resumes_from_the_previous_checkpoint(fresh_out, caplog):
    profile, out, reference = fresh_out
    killed = _killed_run(profile, 4, "between_files")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "t_000000004_high_noise.safetensors").exists()  # the half of the save that got written
    assert not (out / "t_000000004_low_noise.safetensors").exists()
    assert [s for s, _ in resume.list_checkpoints(out)] == [2]
    caplog.set_level("INFO", logger="wantrain")
    assert cli(["run", str(profile)]) == 0
    assert "continuing from" in caplog.text and "step_000000002 (step 2 of 6)" in caplog.text
    assert "removing t_000000004_high_noise.safetensors (its save did not complete)" in caplog.text
    assert _final_bytes(out) == _final_bytes(reference)


def test_sigterm_finishes_the_step_saves_and_exits_0_with_the_resume_command(fresh_out, caplog, monkeypatch):
    profile, out, reference = fresh_out
    monkeypatch.setenv("WANTRAIN_TEST_KILL_AT", "3")
    monkeypatch.setenv("WANTRAIN_TEST_KILL_MODE", "sigterm")
    caplog.set_level("INFO", logger="wantrain")
    handler_before = signal.getsignal(signal.SIGTERM)
    assert cli(["run", str(profile), "--set", "training.lr=0.001"]) == 0
    assert signal.getsignal(signal.SIGTERM) is handler_before, "the run restores the signal handlers"
    assert f"resume with: wantrain run {profile} --set training.lr=0.001" in caplog.text
    assert "SIGTERM: stopping after the current step (3 done so far)" in caplog.text
    assert [s for s, _ in resume.list_checkpoints(out)] == [2, 3]
    assert (out / "t_000000003_low_noise.safetensors").exists()
    assert not (out / "t_high_noise.safetensors").exists(), "a stopped run writes no final files"
    monkeypatch.delenv("WANTRAIN_TEST_KILL_AT")
    assert cli(["run", str(profile), "--set", "training.lr=0.001"]) == 0
    assert _final_bytes(out) == _final_bytes(reference)


# ---------------------------------------------------------------- profile checks


def _profile_with(profile_file: Path, **sets) -> object:
    return load_profile(profile_file, [f"{k}={v}" for k, v in sets.items()])


def _one_checkpoint(setup_files) -> Path:
    """The reference run's folder state copied (its checkpoints 4 and 6)."""
    profile, out, reference = setup_files
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(reference, out)
    return out


def test_resume_refuses_a_rank_change_naming_the_key(setup_files):
    profile, out, _ = setup_files
    _one_checkpoint(setup_files)
    with pytest.raises(WantrainError) as err:
        resume.find_checkpoint(setup(_profile_with(profile, **{"target.rank": 8})), "auto")
    assert err.value.lines() == [
        "error: target.rank: differs from the checkpoint being resumed (checkpoints/step_000000006 has 4) (got 8); "
        "set it back to resume, or start a new run in another job.output_dir"]


def test_resume_refuses_dataset_and_model_changes_all_at_once(setup_files):
    profile, out, _ = setup_files
    _one_checkpoint(setup_files)
    p = _profile_with(profile, **{"datasets[0].repeats": 2, "target.modules": '["attn1.to_q"]'})
    with pytest.raises(WantrainError) as err:
        resume.find_checkpoint(setup(p), "auto")
    wheres = [p.where for p in err.value.problems]
    assert wheres == ["datasets[0].repeats", "target.modules"]


def test_safe_changes_only_warn(setup_files, caplog):
    profile, out, _ = setup_files
    _one_checkpoint(setup_files)
    p = _profile_with(profile, **{"training.steps": 10, "training.lr": 0.0005, "plugins.checkpoints.keep": 3})
    ckpt = resume.find_checkpoint(setup(p), "auto")
    assert ckpt.step == 6
    assert "resume: training.steps changed since checkpoints/step_000000006 (was 6, now 10)" in caplog.text
    assert "training.lr changed" in caplog.text and "plugins.checkpoints.keep changed" in caplog.text


def test_resume_never_refuses_a_folder_with_checkpoints_and_path_picks_one(setup_files):
    profile, out, _ = setup_files
    _one_checkpoint(setup_files)
    run = setup(load_profile(profile))
    with pytest.raises(WantrainError, match="--resume never: the output folder holds checkpoints"):
        resume.find_checkpoint(run, "never")
    assert resume.find_checkpoint(run, str(out / "checkpoints" / "step_000000004")).step == 4
    with pytest.raises(WantrainError, match="is not a checkpoint folder"):
        resume.find_checkpoint(run, str(out))


# ---------------------------------------------------------------- the state tree and the folder


def test_state_tree_round_trips_optimizer_rng_and_odd_keys():
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    params[0].grad = torch.ones(3, 2)
    opt.step()
    np.random.seed(3)
    random.seed(5)
    tree = {"opt": opt.state_dict(), "np": np.random.get_state(), "py": random.getstate(),
            "odd": {1: (2, "x"), "__tensor__": None}, "t": torch.arange(4, dtype=torch.bfloat16), "dt": torch.float16}
    tensors: dict = {}
    doc = json.loads(json.dumps(resume.encode_tree(tree, tensors)))
    back = state_files.decode_tree(doc, tensors)
    assert back["odd"] == {1: (2, "x"), "__tensor__": None}
    assert back["dt"] is torch.float16 and torch.equal(back["t"], tree["t"])
    expected = (np.random.rand(), random.random())
    np.random.set_state(back["np"])
    random.setstate(back["py"])
    assert (np.random.rand(), random.random()) == expected
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=1e-3)
    fresh.load_state_dict(back["opt"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])
    with pytest.raises(TypeError, match="cannot store a object in the resume state"):
        resume.encode_tree({"x": object()}, {})


def test_only_committed_folders_are_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_000000002", "step_000000004", ".step_000000006.tmp-123", "step_000000008", "step_12"):
        (root / name).mkdir(parents=True)
    for name in ("step_000000002", "step_000000004", ".step_000000006.tmp-123", "step_12"):
        (root / name / "state.json").write_text(json.dumps({"format": resume.FORMAT, "version": 1, "step": int(name[-1]),
                                                            "experts": ["high_noise"], "profile": {}, "tree": {}}))
        st.write_atomic({"high_noise.x": torch.zeros(1)}, root / name / "lora.safetensors", {})  # resume checks the files
        st.write_atomic({}, root / name / "tensors.safetensors", {})
    assert [s for s, _ in resume.list_checkpoints(tmp_path)] == [2, 4]  # step 8 has no state.json
    (root / "step_000000004" / "state.json").write_text("{half")
    assert resume.newest_checkpoint(tmp_path).step == 2  # damaged newest one skipped


def test_leftovers_of_interrupted_saves_are_removed(tmp_path):
    (tmp_path / "checkpoints" / ".step_000000004.tmp-9").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000000002").mkdir()
    (tmp_path / "checkpoints" / "step_000000002" / "state.json").write_text("{}")
    for name in (".t_000000004_high_noise.safetensors.tmp-9", "t_000000004_high_noise.safetensors",
                 "t_000000004_low_noise_raw.safetensors",
                 "t_000000002_high_noise.safetensors", "t_high_noise.safetensors", "u_000000004_low_noise.safetensors"):
        (tmp_path / name).write_text("x")
    resume.remove_partial_saves(tmp_path, 2, "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints", "t_000000002_high_noise.safetensors", "t_high_noise.safetensors", "u_000000004_low_noise.safetensors"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000002"]


def test_a_checkpoint_written_before_a_key_existed_resumes_at_its_default(profile_data):
    """A snapshot from an older wantrain lacks the keys added since
    (``target.lokr_factor``, ``datasets[0].role``, ...): they count as their
    defaults, so the checkpoint resumes; a non-default value is still refused."""
    from wantrain.profile import load_profile

    profile = load_profile(data=profile_data)
    new = resume.profile_snapshot(profile)
    old = {k: v for k, v in new.items() if k not in ("target.lokr_factor", "target.lokr_full_rank", "datasets[0].role",
                                                        "model.attention", "training.compile")}
    assert len(old) == len(new) - 5
    assert resume.compare_profiles(old, new, "checkpoints/step_1", profile) == ([], [])
    profile_data["target"].update(type="lokr", lokr_factor=4)
    changed = load_profile(data=profile_data)
    problems, _ = resume.compare_profiles(old, resume.profile_snapshot(changed), "checkpoints/step_1", changed)
    assert [p.where for p in problems] == ["target.lokr_factor", "target.type"]
