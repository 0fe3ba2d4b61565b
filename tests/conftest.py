"""Shared fixtures: the tiny model and demo media are built once per session
(real Diffusers folders, real H.264 clips), and a profile factory."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

try:  # the data pipeline's own fixtures, when present
    from conftest_data import *  # noqa: F401,F403
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def one_thread():
    """torch on one thread for the test: quanto's CPU kernels and LAPACK slow
    down by ~10x with 2 threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from wantrain.commands.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from wantrain.data.demo import write_demo_data

    folder = tmp_path_factory.mktemp("demo_data")
    write_demo_data(folder, seed=0)
    return folder


BASE_PROFILE = {
    "job": {"name": "t", "device": "cpu", "trigger_word": "sks", "seed": 7},
    "model": {"dtype": "fp32", "gradient_checkpointing": False, "max_sequence_length": 32},
    "target": {"rank": 4, "alpha": 8, "save_dtype": "fp32"},
    "training": {"steps": 4, "lr": 1e-3, "optimizer": "adamw", "lr_scheduler": "constant", "num_workers": 0},
    "datasets": [{"resolutions": [32], "num_frames": 5, "default_caption": "a [trigger] clip"}],
    "plugins": {"enabled": []},
}


@pytest.fixture
def profile_data(tiny_model, demo_data, tmp_path):
    """A small, valid profile as a dict; tests change what they need and call
    ``wantrain.profile.load_profile(data=...)``."""
    data = copy.deepcopy(BASE_PROFILE)
    data["job"]["output_dir"] = str(tmp_path / "out")
    data["model"]["name_or_path"] = str(tiny_model)
    data["datasets"][0]["folder"] = str(demo_data)
    return data


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
