"""Issue 11, items 1-4: a diverged run keeps its finite checkpoints; resuming
an older checkpoint forks a lineage that neither loses nor is lost to the
other; one run per output folder; nothing is written outside the run or over
the wrong thing."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from wantrain import resume
from wantrain.commands.cli import main as cli
from wantrain.errors import WantrainError
from wantrain.formats import outdir
from wantrain.formats import safetensors as st
from wantrain.profile import load_profile

INJECT_INF = """
'''Test plugin: an inf loss term at the steps listed in INF_AT (1-based), as often as INF_TIMES says.'''
import os
import torch
from wantrain import hookimpl

AT = {int(s) for s in os.environ.get("INF_AT", "").split(",") if s}
TIMES = int(os.environ.get("INF_TIMES", "1000000"))

class Plugin:
    def __init__(self):
        self.done = 0

    @hookimpl
    def compute_extra_losses(self, run, ctx):
        if run.step + 1 in AT and self.done < TIMES:
            self.done += 1
            return {"boom": ctx.loss * float("inf")}
        return None
"""

POISON = """
'''Test plugin: nan in every LoRA weight at step POISON_AT, before the checkpoint of that step.'''
import os
import torch
from wantrain import hookimpl

class Plugin:
    @hookimpl
    def on_step(self, run, step):
        if step == int(os.environ["POISON_AT"]):
            with torch.no_grad():
                for params in run.lora_parameters.values():
                    for p in params:
                        p.fill_(float("nan"))
"""


def _write_profile(tmp_path: Path, data: dict, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(tomli_w.dumps(data))
    return path


def _with_checkpoints(profile_data, every, keep, steps, *extra):
    profile_data["training"]["steps"] = steps
    profile_data["plugins"] = {"enabled": ["checkpoints", *extra], "checkpoints": {"every": every, "keep": keep, "dtype": "fp32"}}
    return profile_data


def _all_finite(folder: Path) -> bool:
    tensors = {}
    for path in [*folder.glob("*.safetensors"), *folder.glob("checkpoints/*/lora.safetensors")]:
        tensors.update({f"{path}:{k}": v for k, v in st.read(path)[0].items()})
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- 1. non-finite steps


def test_check_rejects_nan_and_inf_anywhere_one_line_per_key(profile_data, tmp_path, capsys):
    profile_data["plugins"] = {"enabled": ["ema"], "ema": {"decay": 0.9}}
    path = _write_profile(tmp_path, profile_data)
    assert cli(["check", str(path), "--set", "training.lr=inf", "--set", "target.alpha=nan",
                "--set", "training.weight_decay=-inf", "--set", "plugins.ema.decay=nan"]) == 2
    assert _errors(capsys) == [
        f"error: {key}: must be a finite number (got {got}); nan and inf are not allowed; write a number such as 0.5"
        for key, got in (("target.alpha", "nan"), ("training.lr", "inf"), ("training.weight_decay", "-inf"),
                         ("plugins.ema.decay", "nan"))]


def test_an_inf_loss_stops_with_exit_2_naming_the_step_and_keeps_every_finite_checkpoint(profile_data, tmp_path,
                                                                                        capsys, monkeypatch):
    (tmp_path / "inf.py").write_text(INJECT_INF)
    _with_checkpoints(profile_data, 2, 2, 8, str(tmp_path / "inf.py"))
    monkeypatch.setenv("INF_AT", "7")
    assert cli(["run", str(_write_profile(tmp_path, profile_data))]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: step 7: non-finite loss (inf)"), errors
    assert "earlier checkpoints are intact" in errors[0]
    out = tmp_path / "out"
    assert [s for s, _ in resume.list_checkpoints(out)] == [4, 6]
    assert not (out / "t_high_noise.safetensors").exists()
    assert _all_finite(out)
    assert not (out / ".wantrain.lock").exists(), "the lock goes with the run, whatever way it ends"


def test_a_huge_learning_rate_stops_the_run_before_a_nonfinite_save(profile_data, tmp_path, capsys):
    _with_checkpoints(profile_data, 1, 0, 6)
    profile_data["training"]["lr"] = 1e30
    assert cli(["run", str(_write_profile(tmp_path, profile_data))]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: step "), errors
    step = int(errors[0].split()[2].rstrip(":"))
    assert step > 1, "the first update (lr 1e30) is finite; the step after it diverges"
    out = tmp_path / "out"
    assert [s for s, _ in resume.list_checkpoints(out)] == list(range(1, step)), errors
    assert not (out / "t_high_noise.safetensors").exists()
    assert _all_finite(out)


def test_skip_mode_skips_the_step_and_continues(profile_data, tmp_path, monkeypatch, caplog):
    (tmp_path / "inf.py").write_text(INJECT_INF)
    _with_checkpoints(profile_data, 2, 0, 4, str(tmp_path / "inf.py"))
    profile_data["training"]["on_nonfinite"] = "skip"
    monkeypatch.setenv("INF_AT", "3")
    monkeypatch.setenv("INF_TIMES", "2")
    caplog.set_level("WARNING", logger="wantrain")
    assert cli(["run", str(_write_profile(tmp_path, profile_data))]) == 0
    assert "step 3: non-finite loss (inf) or gradient norm (nan); skipped (1 of at most 10)" in caplog.text
    assert "skipped (2 of at most 10)" in caplog.text
    out = tmp_path / "out"
    assert [s for s, _ in resume.list_checkpoints(out)] == [2, 4]
    assert (out / "t_high_noise.safetensors").exists() and _all_finite(out)


def test_skip_mode_stops_after_max_nonfinite_steps(profile_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "inf.py").write_text(INJECT_INF)
    _with_checkpoints(profile_data, 2, 0, 4, str(tmp_path / "inf.py"))
    profile_data["training"].update(on_nonfinite="skip", max_nonfinite_steps=2)
    monkeypatch.setenv("INF_AT", "3")
    assert cli(["run", str(_write_profile(tmp_path, profile_data))]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: step 3: non-finite loss (inf)"), errors
    assert "more than training.max_nonfinite_steps = 2 skipped" in errors[0]
    assert [s for s, _ in resume.list_checkpoints(tmp_path / "out")] == [2]


def test_the_kernel_refuses_to_save_nonfinite_weights(profile_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "poison.py").write_text(POISON)
    _with_checkpoints(profile_data, 2, 1, 4, str(tmp_path / "poison.py"))
    monkeypatch.setenv("POISON_AT", "4")
    assert cli(["run", str(_write_profile(tmp_path, profile_data))]) == 2
    assert _errors(capsys) == [
        "error: step 4: the LoRA weights are not finite (nan or inf): the run diverged; nothing was written, "
        "earlier checkpoints are intact; lower training.lr and resume from the last checkpoint"]
    out = tmp_path / "out"
    assert [s for s, _ in resume.list_checkpoints(out)] == [2], "the last finite checkpoint is not rotated away"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "t_000000002_high_noise.safetensors", "t_000000002_low_noise.safetensors"]
    with pytest.raises(WantrainError, match="not finite"):
        st.require_finite({"a": torch.tensor([1.0, float("inf")])}, "x")
    st.require_finite({"a": torch.ones(2), "i": torch.zeros(2, dtype=torch.int64)}, "x")


# ---------------------------------------------------------------- 2. lineages


def test_resuming_an_older_checkpoint_forks_a_lineage_that_keeps_both(profile_data, tmp_path, caplog):
    """The issue's scenario: a run to 30 (saves every 10), then --resume step_10
    to 20, then --resume auto to 30: nothing of either lineage is lost and auto
    continues the new one."""
    _with_checkpoints(profile_data, 10, 3, 30)
    path = _write_profile(tmp_path, profile_data)
    out = tmp_path / "out"
    assert cli(["run", str(path)]) == 0
    old_final = (out / "t_high_noise.safetensors").read_bytes()
    step_10 = out / "checkpoints" / "step_000000010"
    caplog.set_level("INFO", logger="wantrain")
    assert cli(["run", str(path), "--resume", str(step_10), "--set", "training.steps=20"]) == 0
    forked = [p.name for _, p in resume.list_checkpoints(out) if resume.read_checkpoint(p).tag]
    assert len(forked) == 1 and forked[0].startswith("step_000000020_"), forked
    tag = forked[0].split("_")[-1]
    assert "a new lineage" in caplog.text
    # the old lineage's 10/20/30 and their LoRA pairs are all there
    assert [s for s, _ in resume.list_checkpoints(out, "")] == [10, 20, 30]
    for step in (10, 20, 30):
        assert len(resume.step_files(out, "t", step)) == 2
    assert len(resume.step_files(out, "t", 20, tag)) == 2
    # the old final files were set aside, the new ones are the fork's
    assert (out / f"t_high_noise.before-{tag}.safetensors").read_bytes() == old_final
    assert (out / "t_high_noise.safetensors").read_bytes() != old_final
    state = resume.read_checkpoint(out / "checkpoints" / forked[0]).state
    assert state["lineage"] == {"id": tag, "resumed_from": str(step_10)}
    assert isinstance(state["written_at"], float)
    # auto follows the newest lineage (written last), not the highest step (the old 30)
    assert resume.newest_checkpoint(out).path.name == forked[0]
    caplog.clear()
    assert cli(["run", str(path)]) == 0
    assert f"continuing from {out / 'checkpoints' / forked[0]} (step 20 of 30)" in caplog.text
    assert [s for s, _ in resume.list_checkpoints(out, tag)] == [20, 30]
    assert [s for s, _ in resume.list_checkpoints(out, "")] == [10, 20, 30]
    assert (out / f"t_high_noise.before-{tag}.safetensors").read_bytes() == old_final


def test_rotation_counts_only_its_own_lineage(tmp_path):
    from wantrain.plugins.checkpoints import rotate

    for step, tag in ((10, ""), (20, ""), (30, ""), (20, "abc123"), (30, "abc123"), (40, "abc123")):
        folder = resume.checkpoint_dir(tmp_path, step, tag)
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
        for expert in ("high_noise", "low_noise"):
            (tmp_path / (f"j_{step:09d}_{tag}_{expert}.safetensors" if tag else f"j_{step:09d}_{expert}.safetensors")).write_text("x")
    assert rotate(tmp_path, "j", 2, "abc123") == [20]
    assert [s for s, _ in resume.list_checkpoints(tmp_path, "")] == [10, 20, 30]
    assert len(list(tmp_path.glob("j_*.safetensors"))) == 10
    assert rotate(tmp_path, "j", 2) == [10]


def test_a_stopped_fork_prints_a_resume_command_that_continues_it(profile_data, tmp_path, caplog, monkeypatch):
    (tmp_path / "stop.py").write_text(
        "import os\nfrom wantrain import hookimpl\n\nclass Plugin:\n    @hookimpl\n    def on_step(self, run, step):\n"
        "        if step == int(os.environ.get('STOP_AT', '0')):\n            run.stop_requested = True\n")
    _with_checkpoints(profile_data, 2, 1, 6, str(tmp_path / "stop.py"))
    path = _write_profile(tmp_path, profile_data)
    out = tmp_path / "out"
    assert cli(["run", str(path), "--set", "plugins.checkpoints.keep=0"]) == 0
    monkeypatch.setenv("STOP_AT", "3")
    caplog.set_level("INFO", logger="wantrain")
    assert cli(["run", str(path), "--resume", str(out / "checkpoints" / "step_000000002")]) == 0
    stop = resume.newest_checkpoint(out).path
    assert stop.name.startswith("step_000000003_") and stop.is_dir()
    assert f"resume state in {stop}" in caplog.text
    assert f"resume with: wantrain run {path} --resume {stop}" in caplog.text
    assert [s for s, _ in resume.list_checkpoints(out, "")] == [2, 4, 6], "keep = 1 of the fork removed none of these"


# ---------------------------------------------------------------- 3. one run per folder


def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(profile_data, tmp_path):
    path = _write_profile(tmp_path, profile_data)
    out = Path(profile_data["job"]["output_dir"])
    out.mkdir()
    (out / "profile.toml").write_text("# the running run's\n")
    code = ("import sys; from wantrain.commands.cli import main; sys.exit(main(sys.argv[1:]))")
    with outdir.hold_output_dir(out):
        assert (out / ".wantrain.lock").read_text() == f"{os.getpid()}\n"
        second = subprocess.run([sys.executable, "-c", code, "run", str(path)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: job.output_dir: another wantrain run (pid {os.getpid()}) is training in this folder "
                      f"(got '{out}'); wait for it to end (or stop it), or use another job.output_dir"]
    assert (out / "profile.toml").read_text() == "# the running run's\n", "a refused run writes nothing"
    assert not (out / ".wantrain.lock").exists()
    with outdir.hold_output_dir(out):  # free again: taken at once
        pass


def test_tools_work_while_a_run_holds_the_folder(trained, tmp_path, capsys):
    out, _ = trained
    with outdir.hold_output_dir(out):
        assert cli(["lora-info", str(out / "t_high_noise.safetensors")]) == 0
        assert cli(["export", str(out / "checkpoints" / "step_000000002"), "--format", "diffusers",
                    "-o", str(tmp_path / "x")]) == 0


# ---------------------------------------------------------------- 4. writing only where asked


@pytest.fixture(scope="module")
def trained(tiny_model, demo_data, tmp_path_factory):
    """A finished 2-step run with a checkpoint of each step: (output folder, profile file)."""
    from conftest import BASE_PROFILE

    root = tmp_path_factory.mktemp("trained")
    data = copy.deepcopy(BASE_PROFILE)
    data["job"]["output_dir"] = str(root / "out")
    data["model"]["name_or_path"] = str(tiny_model)
    data["datasets"][0]["folder"] = str(demo_data)
    _with_checkpoints(data, 1, 0, 2)
    path = _write_profile(root, data)
    assert cli(["run", str(path)]) == 0
    return root / "out", path


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "a\x00b", "a\nb", ".hidden", "x" * 101])
def test_check_refuses_job_names_that_are_not_a_file_name_part(profile_data, name):
    profile_data["job"]["name"] = name
    with pytest.raises(WantrainError) as err:
        load_profile(data=profile_data)
    assert [p.where for p in err.value.problems] == ["job.name"]
    assert "must be a plain file name part" in err.value.lines()[0]


def test_export_never_replaces_a_special_file(trained, tmp_path, capsys):
    """`-o /dev/null` as root replaced the device node; a fifo is the same case
    without risking the machine's /dev/null when the fix is missing."""
    out, _ = trained
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert cli(["export", str(out / "t_high_noise.safetensors"), "--format", "comfyui", "-o", str(fifo)]) == 2
    assert _errors(capsys) == [f"error: {fifo}: is not a regular file (a folder, device or other special file); "
                               "refusing to replace it; write to a new file path"]
    assert fifo.is_fifo()
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(WantrainError, match="is not a regular file"):
        st.write_atomic({"a": torch.ones(1)}, tmp_path / "d.safetensors", {})
    assert (tmp_path / "d.safetensors").is_dir()


def test_export_to_a_trailing_slash_makes_the_folder_and_writes_inside(trained, tmp_path):
    out, _ = trained
    target = tmp_path / "new" / "folder"
    assert cli(["export", str(out / "t_high_noise.safetensors"), "--format", "diffusers", "-o", f"{target}/"]) == 0
    assert target.is_dir() and (target / "t_high_noise.safetensors").is_file()
    assert cli(["export", str(out / "checkpoints" / "step_000000001"), "--format", "comfyui", "-o", f"{tmp_path / 'ck'}/"]) == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["t_000000001_high_noise.safetensors",
                                                                    "t_000000001_low_noise.safetensors"]


def test_export_onto_its_source_is_refused(trained, tmp_path, capsys):
    out, _ = trained
    source = tmp_path / "t_high_noise.safetensors"
    source.write_bytes((out / "t_high_noise.safetensors").read_bytes())
    before = source.read_bytes()
    for target in (str(source), str(tmp_path), f"{tmp_path}/"):
        assert cli(["export", str(source), "--format", "diffusers", "-o", target]) == 2, target
        assert _errors(capsys) == [f"error: -o: is the file being exported; refusing to overwrite it (got '{source}'); "
                                   "write to another file name or folder"]
    assert source.read_bytes() == before


@pytest.mark.parametrize("command", ["make-tiny-model", "make-demo-data"])
def test_make_commands_refuse_a_non_empty_folder_without_force(tmp_path, capsys, command):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model_index.json").write_text("the user's")
    assert cli([command, str(folder)]) == 2
    assert _errors(capsys) == [f"error: {folder}: is not empty; refusing to overwrite what is in it; "
                               "give a new or empty folder, or add --force"]
    assert (folder / "model_index.json").read_text() == "the user's"
    assert cli([command, str(folder / "model_index.json")]) == 2
    if command == "make-demo-data":  # the quick one
        assert cli([command, str(folder), "--force"]) == 0
        assert (folder / "clip_00.txt").is_file()


def test_profile_toml_is_written_only_by_an_accepted_run(trained, tmp_path, capsys):
    out, path = trained
    (out / "profile.toml").write_text("# as the accepted run wrote it\n")
    assert cli(["run", str(path), "--set", "target.rank=8"]) == 2  # rank differs from the checkpoint
    assert cli(["run", str(path), "--resume", "never"]) == 2  # the folder holds checkpoints
    assert len(_errors(capsys)) == 2
    assert (out / "profile.toml").read_text() == "# as the accepted run wrote it\n"
    assert cli(["run", str(path)]) == 0  # accepted (resumes at its last step, nothing to train)
    assert load_profile(out / "profile.toml").target.rank == 4


def test_the_lock_dies_with_its_holder(tmp_path):
    """SIGKILL leaves the lock file behind but not the lock: the next run takes it."""
    code = ("import os, signal, sys; from wantrain.formats import outdir; cm = outdir.hold_output_dir(sys.argv[1]); cm.__enter__(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / ".wantrain.lock").is_file()
    with outdir.hold_output_dir(tmp_path):
        assert (tmp_path / ".wantrain.lock").read_text() == f"{os.getpid()}\n"


def test_checkpoints_without_a_lineage_resume_as_one_legacy_lineage(trained, tmp_path, caplog):
    import json
    import shutil

    out, path = trained
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    for state in legacy.glob("checkpoints/*/state.json"):  # as written before lineages existed
        doc = json.loads(state.read_text())
        del doc["lineage"], doc["written_at"]
        state.write_text(json.dumps(doc))
    caplog.set_level("INFO", logger="wantrain")
    assert cli(["run", str(path), "--set", f"job.output_dir={legacy}", "--set", "training.steps=3"]) == 0
    assert "(step 2 of 3)" in caplog.text
    assert [s for s, _ in resume.list_checkpoints(legacy, "")] == [1, 2, 3], "plain names, nothing forked"
    assert resume.read_checkpoint(legacy / "checkpoints" / "step_000000003").lineage == "legacy"
    assert not list(legacy.glob("*.before-*")), "the legacy lineage's own final files are not set aside"
