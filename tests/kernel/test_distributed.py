"""Several processes through torchrun on the CPU (gloo), real processes
(docs/distributed.md): the same LoRA as one process with the global batch,
one set of files, resume after SIGKILL and under another world size,
SIGTERM saves once, FSDP2 equals unsharded, a failing rank ends the job.

Every run is the conftest's tiny model for 4 steps; the two-process run
every other test compares with is made once (module fixture)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from wantrain import distributed
from wantrain.distributed.data import share_of
from wantrain.errors import WantrainError
from wantrain.loop import train
from wantrain.profile import load_profile

pytestmark = pytest.mark.slow

#: fp32 tiny model, 4 AdamW steps: two processes average two per-rank means where one process takes the mean
#: of the whole batch, so sums are added in another order; measured difference ~3e-6 on weights of ~1e-2
ATOL = 2e-5

TEST_PLUGIN = """
'''Test plugin: misbehave on one rank at one step (environment variables say which).'''
import os
import signal
from wantrain import hookimpl

def at(name):
    return int(os.environ.get(name, "0"))

class Plugin:
    @hookimpl
    def on_step(self, run, step):
        if step == at("RAISE_AT") and run.rank == 1:
            raise RuntimeError(f"rank 1 fails on purpose at step {step}")
        if step == at("KILL_AT") and run.rank == 0:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole job: torchrun and every rank
        if step == at("TERM_AT") and run.rank == 0:
            os.kill(os.getppid(), signal.SIGTERM)  # torchrun, which passes it to every rank
"""


def make_profile(root: Path, base: dict, name: str, *, checkpoints: bool = True, **training) -> Path:
    data = copy.deepcopy(base)
    data["job"]["output_dir"] = str(root / name)
    data["training"].update(training)
    plugin = root / "misbehave.py"
    plugin.write_text(TEST_PLUGIN)
    data["plugins"] = {"enabled": [str(plugin)] + (["checkpoints"] if checkpoints else [])}
    if checkpoints:
        data["plugins"]["checkpoints"] = {"every": 2, "keep": 0, "dtype": "fp32"}
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def torchrun(profile: Path, *extra: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m wantrain run PROFILE`` in its own process group."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "wantrain", "run", str(profile), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, start_new_session=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def lora_pair(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{e}.{k}": v for e in ("high_noise", "low_noise") for k, v in load_file(folder / f"t_{e}.safetensors").items()}


def assert_close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= atol, f"LoRA differs by {diff}"
    moved = max(b[k].abs().max().item() for k in b if k.endswith("lora_B.weight"))
    assert moved > 10 * atol, "the LoRA must have learned something for the comparison to mean anything"
    return diff


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def base(tiny_model, demo_data):
    from conftest import BASE_PROFILE

    data = copy.deepcopy(BASE_PROFILE)
    data["model"]["name_or_path"] = str(tiny_model)
    data["datasets"][0]["folder"] = str(demo_data)
    return data


@pytest.fixture(scope="module")
def two_processes(base, tmp_path_factory):
    """The uninterrupted two-process run (batch 1 per rank), through ``wantrain run --nproc 2``."""
    root = tmp_path_factory.mktemp("ddp")
    path = make_profile(root, base, "ddp", batch_size=1)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "wantrain", "run", "--nproc", "2", str(path)], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return root, root / "ddp", done, time.monotonic() - t0


def test_share_of_a_global_batch():
    assert [share_of(4, r, 2) for r in range(2)] == [(0, 2, 1.0), (2, 2, 1.0)]
    assert [share_of(3, r, 2) for r in range(2)] == [(0, 2, 4 / 3), (2, 1, 2 / 3)]
    assert [share_of(1, r, 2) for r in range(2)] == [(0, 1, 2.0), (1, 0, 0.0)]  # rank 1 runs item 0 at weight 0


def test_two_processes_train_the_lora_one_process_trains_with_twice_the_batch(two_processes, base, tmp_path):
    root, out, done, _ = two_processes
    assert "2 processes (gloo, ddp) x batch_size 1 x gradient_accumulation 1 = effective batch 2" in done.stderr
    one = load_profile(make_profile(tmp_path, base, "one", batch_size=2))
    train(one)
    diff = assert_close(lora_pair(out), lora_pair(tmp_path / "one"), ATOL)
    print(f"2 processes x batch 1 vs 1 process x batch 2: max |LoRA difference| = {diff:.2e}")
    # exactly one set of files: what one process writes, written once, nothing else (no lock, no temporary)
    assert files(out) == files(tmp_path / "one")
    assert "t_000000002_high_noise.safetensors" in files(out) and "checkpoints/step_000000004/state.json" in files(out)


def test_sigkill_mid_run_then_resume_on_two_processes_reaches_the_same_lora(two_processes, base, tmp_path):
    _, reference, _, _ = two_processes
    path = make_profile(tmp_path, base, "killed", batch_size=1)
    killed = torchrun(path, env={"KILL_AT": "3"})
    assert killed.returncode != 0
    out = tmp_path / "killed"
    assert (out / "checkpoints" / "step_000000002").is_dir() and not (out / "t_high_noise.safetensors").exists()
    resumed = torchrun(path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stderr
    assert_close(lora_pair(out), lora_pair(reference), 1e-6)


def test_sigterm_to_torchrun_saves_one_checkpoint_then_one_process_with_the_global_batch_finishes(
        two_processes, base, tmp_path):
    _, reference, _, _ = two_processes
    path = make_profile(tmp_path, base, "stopped", checkpoints=False, batch_size=1)
    stopped = torchrun(path, env={"TERM_AT": "1"})
    out = tmp_path / "stopped"
    assert (out / "checkpoints").is_dir(), "\n".join(line for line in stopped.stderr.splitlines() if "wantrain" in line)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] in ("step_000000001", "step_000000002"), (saved, stopped.stderr[-3000:])
    assert not (out / "t_high_noise.safetensors").exists()
    # another world size continues the same global order: one process with training.batch_size 2
    with pytest.raises(WantrainError, match=r"global batch of 2 .*training.batch_size = 2"):
        train(load_profile(path))
    train(load_profile(path, ["training.batch_size=2"]))
    assert_close(lora_pair(out), lora_pair(reference), ATOL)


def test_fsdp2_sharded_base_gives_the_unsharded_lora(two_processes, base, tmp_path):
    _, reference, _, _ = two_processes
    data = copy.deepcopy(base)
    data["distributed"] = {"strategy": "fsdp"}
    path = make_profile(tmp_path, data, "fsdp", checkpoints=False, batch_size=1)
    done = torchrun(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "are sharded over 2 processes" in done.stderr
    diff = assert_close(lora_pair(tmp_path / "fsdp"), lora_pair(reference), 1e-6)
    print(f"FSDP2 vs unsharded: max |LoRA difference| = {diff:.2e}")


def test_a_rank_that_raises_ends_the_job_non_zero_with_its_error_shown(base, tmp_path):
    data = copy.deepcopy(base)
    data["distributed"] = {"timeout_minutes": 1.0}
    path = make_profile(tmp_path, data, "raises", checkpoints=False, batch_size=1)
    t0 = time.monotonic()
    done = torchrun(path, env={"RAISE_AT": "2"}, timeout=180)
    assert done.returncode != 0
    assert time.monotonic() - t0 < 150, "no hang: the other rank ended within the timeout"
    assert "RuntimeError: rank 1 fails on purpose at step 2" in done.stderr
    assert "rank 0: stopped because another process of the job failed" in done.stderr
    assert not (tmp_path / "raises" / "t_high_noise.safetensors").exists()


def test_sequence_parallel_gives_the_lora_of_one_process_with_the_whole_clip(base, tmp_path):
    """Two processes split each clip's tokens (Ulysses) and train on the same
    batch of 1: the LoRA of one process with batch 1."""
    data = copy.deepcopy(base)
    data["distributed"] = {"sequence_parallel": 2}
    path = make_profile(tmp_path, data, "sp", checkpoints=False, batch_size=1)
    done = torchrun(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 group(s) of 2 sequence-parallel processes (gloo, ddp) x batch_size 1" in done.stderr
    train(load_profile(make_profile(tmp_path, base, "one", checkpoints=False, batch_size=1)))
    # attention runs over all-to-all'd heads and the gradients are summed over the ranks: other float sums,
    # which AdamW's first steps amplify where a gradient is ~0 (measured 2.5e-5 with lr 1e-3)
    diff = assert_close(lora_pair(tmp_path / "sp"), lora_pair(tmp_path / "one"), 1e-4)
    print(f"sequence parallel (2) vs 1 process: max |LoRA difference| = {diff:.2e}")


def test_distributed_settings_that_cannot_work_are_one_line_each(base, tmp_path):
    from wantrain.distributed.hooks import profile_problems
    from wantrain.distributed.launch import check_launch

    data = copy.deepcopy(base)
    data["distributed"] = {"sequence_parallel": 2, "strategy": "fsdp"}
    data["job"]["output_dir"] = str(tmp_path / "x")
    profile = load_profile(data=data)
    assert [p.where for p in profile_problems(profile)] == ["distributed.sequence_parallel"]
    data["distributed"] = {"sequence_parallel": 2}
    data["job"]["device"] = "cuda:1"
    found = [p.where for p in check_launch(load_profile(data=data), 3)]  # (+ "--nproc-per-node" without 3 GPUs)
    assert {"job.device", "distributed.sequence_parallel"} <= set(found)
    assert distributed.world_size() == 1 and distributed.rank() == 0  # pytest is one process


def test_estimate_splits_the_frozen_weights_over_fsdp_processes(base, tmp_path):
    from wantrain.commands.estimate import estimate_profile
    from wantrain.run import open_run

    data = copy.deepcopy(base)
    data["job"]["output_dir"] = str(tmp_path / "x")
    data["model"]["name_or_path"] = "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16"  # the built-in config, no download
    data["distributed"] = {"strategy": "fsdp"}
    profile = load_profile(data=data)
    pm = open_run(profile, purpose="inspect").pm
    one, _, _, _ = estimate_profile(profile, pm, nproc=1)
    eight, s, _, _ = estimate_profile(profile, pm, nproc=8)
    weights = {e: next(r[1] for r in est.rows if r[0].startswith("transformer weights")) for e, est in (("1", one), ("8", eight))}
    assert s.shards == 8 and abs(weights["8"] - weights["1"] / 8) < 1e-6
    assert any(r[0] == "fsdp: blocks gathered whole" for r in eight.rows)
    assert eight.gpu_peak < one.gpu_peak - 0.8 * weights["1"] * 7 / 8 / 2  # most of the split shows in the peak
