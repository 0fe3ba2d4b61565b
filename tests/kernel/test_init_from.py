"""``[target] init_from``: which file each expert starts from is logged
truthfully, a file naming no expert is loaded into both with a warning, and
a table ``{high_noise = ..., low_noise = ...}`` picks a file per expert."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from wantrain import lora
from wantrain.errors import ProfileError
from wantrain.formats.safetensors import read as read_st
from wantrain.loop import load, setup, train
from wantrain.profile import load_profile


@pytest.fixture(scope="module")
def pair(tiny_model, demo_data, tmp_path_factory):
    """A trained LoRA pair (2 steps, lr high enough that the experts differ)."""
    from conftest import BASE_PROFILE
    import copy

    data = copy.deepcopy(BASE_PROFILE)
    data["job"]["output_dir"] = str(tmp_path_factory.mktemp("init_from") / "out")
    data["model"]["name_or_path"] = str(tiny_model)
    data["datasets"][0]["folder"] = str(demo_data)
    data["training"].update(steps=2, lr=1e-2)
    run = train(load_profile(data=data))
    return {e: run.output_dir / f"t_{e}.safetensors" for e in ("high_noise", "low_noise")}


def _loaded(profile_data, init_from):
    profile_data["target"]["init_from"] = init_from
    run = setup(load_profile(data=profile_data))
    load(run)
    return run


def _b_weights(run, expert):
    return {k: v for k, v in lora.lora_state(run.experts[expert]).items() if "lora_B" in k}


def _file_b(path):
    tensors, _ = read_st(path)
    return [v.float() for k, v in tensors.items() if k.endswith("lora_B.weight")]


def _same(run, expert, path):
    mine = sorted(_b_weights(run, expert).values(), key=lambda t: (tuple(t.shape), float(t.abs().sum())))
    theirs = sorted(_file_b(path), key=lambda t: (tuple(t.shape), float(t.abs().sum())))
    return len(mine) == len(theirs) and all(torch.allclose(a, b) for a, b in zip(mine, theirs))


def test_the_partner_file_is_the_one_logged(pair, profile_data, caplog):
    caplog.set_level(logging.INFO, logger="wantrain")
    run = _loaded(profile_data, str(pair["high_noise"]))
    lines = [r.getMessage() for r in caplog.records if "init_from:" in r.getMessage()]
    assert any(f"low_noise starts from {pair['low_noise']}" in l for l in lines), lines
    assert any(f"high_noise starts from {pair['high_noise']}" in l for l in lines), lines
    assert _same(run, "low_noise", pair["low_noise"]) and _same(run, "high_noise", pair["high_noise"])


def test_a_file_naming_no_expert_warns_that_both_get_it(pair, profile_data, tmp_path, caplog):
    tensors, _ = read_st(pair["high_noise"])
    path = tmp_path / "adapter_model.safetensors"  # diffusion-pipe's name: no expert in it, no metadata
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    caplog.set_level(logging.INFO, logger="wantrain")
    run = _loaded(profile_data, str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "init_from" in r.getMessage()]
    assert any("names no expert" in w and "high_noise and low_noise" in w and "{high_noise" in w for w in warnings), warnings
    assert _same(run, "high_noise", path) and _same(run, "low_noise", path)


def test_a_table_gives_each_expert_its_file(pair, profile_data):
    # crossed on purpose: each expert starts from the other's file
    run = _loaded(profile_data, {"high_noise": str(pair["low_noise"]), "low_noise": str(pair["high_noise"])})
    assert _same(run, "high_noise", pair["low_noise"])
    assert _same(run, "low_noise", pair["high_noise"])
    assert not _same(run, "high_noise", pair["high_noise"])


@pytest.mark.parametrize("value, message", [
    ({"high_noise": "a.safetensors", "mid_noise": "b.safetensors"}, "error: target.init_from: a table takes only high_noise and low_noise"),
    ({"high_noise": 3}, "error: target.init_from.high_noise: expected a string"),
    ({}, "error: target.init_from: a table takes only high_noise and low_noise"),
    (3, "error: target.init_from: expected a path or a table {high_noise = ..., low_noise = ...}"),
])
def test_init_from_table_errors_are_one_line(profile_data, value, message):
    profile_data["target"]["init_from"] = value
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    lines = err.value.lines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
