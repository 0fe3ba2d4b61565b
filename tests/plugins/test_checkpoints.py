"""checkpoints plugin: what a run leaves on disk, dtype, rotation, EMA in the
pair, a full disk (earlier checkpoints intact), config errors."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

from wantrain import resume
from wantrain.formats import lora as lora_format
from wantrain.formats import safetensors as st
from wantrain.commands.cli import main as cli
from wantrain.errors import ProfileError
from wantrain.loop import train
from wantrain.plugins.checkpoints import is_due, rotate
from wantrain.profile import load_profile


def _enable(profile_data, plugins=("checkpoints",), **settings):
    profile_data["plugins"] = {"enabled": list(plugins), "checkpoints": {"every": 2, "keep": 2, **settings}}
    return profile_data


def test_config_errors_say_what_is_allowed(profile_data):
    _enable(profile_data, every=0, keep=-1, dtype="fp8")
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    assert err.value.lines() == [
        "error: plugins.checkpoints.every: must be greater than 0 (got 0); use a positive number",
        "error: plugins.checkpoints.keep: must be 0 or more (got -1); use 0 or a positive number",
        "error: plugins.checkpoints.dtype: must be one of 'bf16', 'fp16', 'fp32' (got 'fp8'); use one of 'bf16', 'fp16', 'fp32'",
    ]


def test_is_due_every_n_at_the_end_and_on_stop():
    assert [s for s in range(1, 8) if is_due(s, 7, 3, False)] == [3, 6, 7]
    assert is_due(1, 7, 3, True)


WRITE_LORA_SPY = """
from wantrain import hookimpl

class Plugin:
    def __init__(self):
        self.calls = []

    @hookimpl(wrapper=True)
    def write_lora(self, step, dtype):
        self.calls.append((step, dtype))
        return (yield)
"""


def test_a_run_keeps_the_newest_saves_with_ema_weights_in_the_pair(profile_data, tmp_path):
    spy = tmp_path / "spy.py"
    spy.write_text(WRITE_LORA_SPY)
    _enable(profile_data, plugins=("ema", "checkpoints", str(spy)), dtype="bf16")
    profile_data["plugins"]["ema"] = {"decay": 0.5}
    profile_data["training"]["steps"] = 6
    run = train(load_profile(data=profile_data))
    out = run.output_dir
    # write_lora gets the checkpoint dtype for saves, None (= save_dtype) for the final pair
    assert run.pm.get_plugin(str(spy)).calls == [(2, "bf16"), (4, "bf16"), (6, "bf16"), (None, None)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "t_000000004_high_noise.safetensors", "t_000000004_low_noise.safetensors",
        "t_000000006_high_noise.safetensors", "t_000000006_low_noise.safetensors",
        "t_high_noise.safetensors", "t_low_noise.safetensors"]
    assert [s for s, _ in resume.list_checkpoints(out)] == [4, 6]
    assert not list((out / "checkpoints").glob(".*")), "no temporary folder left"
    pair, meta = st.read(out / "t_000000006_low_noise.safetensors")
    assert {t.dtype for t in pair.values()} == {torch.bfloat16}
    assert meta["wantrain.step"] == "6"
    final, _ = st.read(out / "t_low_noise.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}  # [target] save_dtype
    # the pair holds the EMA weights; the state holds raw fp32 weights and the EMA shadow
    state = load_file(str(out / "checkpoints" / "step_000000006" / "lora.safetensors"))
    raw_b = state["low_noise.blocks.0.attn1.to_q.lora_B.weight"]
    assert torch.equal(raw_b, run.experts["low_noise"].blocks[0].attn1.to_q.lora_B["default"].weight.detach())
    ema_b = run.pm.get_plugin("ema").shadow.tensors["low_noise"]["blocks.0.attn1.to_q.lora_B.default.weight"]
    assert torch.equal(pair["diffusion_model.blocks.0.self_attn.q.lora_B.weight"], ema_b.to(torch.bfloat16))
    assert not torch.equal(ema_b, raw_b)
    assert torch.equal(final["diffusion_model.blocks.0.self_attn.q.lora_B.weight"], ema_b)


def _fake_save(root, name, step):
    folder = root / "checkpoints" / f"step_{step:09d}"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{}")
    for expert in ("high_noise", "low_noise"):
        (root / lora_format.lora_filename(name, expert, step)).write_text("x")


def test_rotation_removes_pair_and_state_together_never_final_files(tmp_path):
    for step in (250, 500, 750, 1000):
        _fake_save(tmp_path, "job", step)
    (tmp_path / "job_high_noise.safetensors").write_text("final")
    (tmp_path / "job_000000250_high_noise_raw.safetensors").write_text("ema save = both")
    (tmp_path / "job_x_000000250_high_noise.safetensors").write_text("another job name")
    (tmp_path / "checkpoints" / "step_000001250").mkdir()  # incomplete: not counted, not touched
    assert rotate(tmp_path, "job", 2) == [250, 500]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "job_000000750_high_noise.safetensors", "job_000000750_low_noise.safetensors",
        "job_000001000_high_noise.safetensors", "job_000001000_low_noise.safetensors", "job_high_noise.safetensors",
        "job_x_000000250_high_noise.safetensors"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000750", "step_000001000", "step_000001250"]
    assert rotate(tmp_path, "job", 0) == []


class _FullDisk:
    """A file that takes half of what is written, then fails like a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")


def _lora_disk_full_at(marker, monkeypatch):
    def fake_open(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        return _FullDisk(fh) if marker in str(path) else fh

    monkeypatch.setattr(st, "open", fake_open, raising=False)


def _state_disk_full_at(marker, monkeypatch):
    _lora_disk_full_at(marker, monkeypatch)  # the state files go through the same writer


@pytest.mark.parametrize("where", ["lora_pair", "resume_state"])
def test_a_full_disk_is_one_error_line_and_keeps_earlier_checkpoints(profile_data, tmp_path, monkeypatch, capsys, where):
    _enable(profile_data)
    profile_data["training"]["steps"] = 4
    if where == "lora_pair":  # the second file of the pair fails half-way
        _lora_disk_full_at("_000000004_low_noise", monkeypatch)
    else:
        _state_disk_full_at("step_000000004.tmp", monkeypatch)
    import tomli_w

    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(profile_data))
    assert cli(["run", str(path)]) == 2
    out = tmp_path / "out"
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert errors == [
        f"error: job.output_dir: disk full while writing the checkpoint of step 4; nothing of it was kept, "
        f"earlier checkpoints are intact (got '{out}'); free space (rotation runs only after a save succeeds, "
        f"so a lower keep frees nothing now: delete checkpoints older than the newest, or other files) "
        f"and run the same command again to resume"]
    assert sorted(p.name for p in out.iterdir() if p.name != "profile.toml") == [
        "checkpoints", "t_000000002_high_noise.safetensors", "t_000000002_low_noise.safetensors"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000000002"]
    ckpt = resume.read_checkpoint(out / "checkpoints" / "step_000000002")
    assert ckpt.step == 2 and json.loads((ckpt.path / "state.json").read_text())["experts"] == ["high_noise", "low_noise"]
    assert len(load_file(str(ckpt.path / "tensors.safetensors"))) > 0
