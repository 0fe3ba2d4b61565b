"""CUDA paths, run on a machine with an NVIDIA GPU (skipped elsewhere):
expert offload moves real tensors between pinned host memory and the GPU,
4-bit experts train on the GPU, and peak memory is CUDA's."""

from __future__ import annotations

import pytest
import torch

from wantrain.loop import train
from wantrain.profile import load_profile

pytestmark = pytest.mark.gpu


def _gpu_profile(profile_data, **plugins):
    profile_data["job"]["device"] = "cuda"
    profile_data["model"].update(dtype="bf16", gradient_checkpointing=True)
    profile_data["training"]["steps"] = 6
    profile_data["plugins"] = {"enabled": list(plugins), **{k: v for k, v in plugins.items() if v}}
    return load_profile(data=profile_data)


def test_expert_offload_parks_the_idle_expert_on_the_host(profile_data):
    run = train(_gpu_profile(profile_data, offload={"experts": True}))
    active = run.active_expert
    idle = "high_noise" if active == "low_noise" else "low_noise"
    assert next(run.experts[active].parameters()).device.type == "cuda"
    assert next(run.experts[idle].parameters()).device.type == "cpu"
    assert run.last_metrics["peak_memory_gb"] > 0


def test_qint4_ara_trains_on_the_gpu(profile_data, tmp_path):
    run = train(_gpu_profile(profile_data, quantize={"transformer": "qint4+ara", "ara_cache": str(tmp_path / "ara")}))
    b = run.experts["high_noise"].blocks[0].attn1.to_q.lora_B["default"].weight
    assert b.device.type == "cuda" and float(b.detach().abs().sum()) > 0
