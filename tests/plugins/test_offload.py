"""offload: the choreography of a real two-expert run (which expert and which
streamed block is where after each event), the tensor swaps leave the math
untouched (same LoRA bits as a run without offload), host copies of quantized
weights round-trip, and profile rules."""

from __future__ import annotations

import pytest
import torch

from wantrain.plugins.quantize import loader
from wantrain.errors import ProfileError
from wantrain.formats.safetensors import read as read_lora_file
from wantrain.loop import train
from wantrain.model import ModelSource
from wantrain.plugins import offload
from wantrain.plugins.offload import moves
from wantrain.profile import load_profile


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def moves_on_cpu(monkeypatch):
    """Perform the tensor swaps on this CPU run too (there is nowhere else to
    put a tensor, so only the copies and their bookkeeping are exercised)."""
    monkeypatch.setattr(offload.Plugin, "moves_on_cpu", True)


def _data(profile_data, steps=4, **cfg):
    profile_data["model"]["gradient_checkpointing"] = True
    profile_data["training"]["steps"] = steps
    profile_data["plugins"] = {"enabled": ["offload"], "offload": cfg}
    return profile_data


def test_choreography_of_a_two_expert_run(profile_data, moves_on_cpu):
    run = train(load_profile(data=_data(profile_data, experts=True, layers=0.5)))
    plugin = run.pm.get_plugin("offload")
    events = [(e, x) for e, x, _ in plugin.history]
    assert events[:3] == [("after_expert_load", "high_noise"), ("after_expert_load", "low_noise"), ("after_adapters_attached", None)]
    # the kernel alternates high, low, high, low: one park + one bring per step
    expected = []
    old = None
    for new in ["high_noise", "low_noise", "high_noise", "low_noise"]:
        expected += [("before_expert_switch", old), ("after_expert_switch", new)]
        old = new
    assert events[3:] == expected
    streamed = [f"{e}.blocks.{i}" for e in ("high_noise", "low_noise") for i in (1, 3)]
    for event, expert, place in plugin.history:
        if event in ("after_expert_load", "after_adapters_attached"):
            assert place[expert or "high_noise"] == "host"  # parked as soon as loaded: the GPU never holds two
        if event == "before_expert_switch":
            assert all(v == "host" for k, v in place.items() if k in ("high_noise", "low_noise"))
        if event == "after_expert_switch":
            other = "low_noise" if expert == "high_noise" else "high_noise"
            assert place[expert] == "device" and place[other] == "host"
        if event != "after_expert_load":
            assert all(place[k] == "host" for k in streamed)  # streamed blocks only on the device while they run
    # each streamed block came in once for forward and once for the checkpointed recompute, per step it trained
    assert {e: s.copies_in for e, s in plugin.streamers.items()} == {"high_noise": 2 * 2 * 2, "low_noise": 2 * 2 * 2}
    # the parked expert's LoRA and optimizer state went with it (all on the host = CPU here)
    assert all(p.device.type == "cpu" for p in run.lora_parameters["low_noise"])


def test_offload_does_not_change_the_math(profile_data, tmp_path, moves_on_cpu):
    base = train(load_profile(data=_data(profile_data)))
    ref, _ = read_lora_file(base.output_dir / "t_high_noise.safetensors")
    profile_data["job"]["output_dir"] = str(tmp_path / "offloaded")
    run = train(load_profile(data=_data(profile_data, experts=True, layers=1.0)))
    got, _ = read_lora_file(run.output_dir / "t_high_noise.safetensors")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert run.pm.get_plugin("offload").streamers["high_noise"].copies_in == 2 * 4 * 2  # all 4 blocks, fwd + recompute, 2 steps


def test_cpu_moves_are_bookkeeping_only(profile_data):
    run = train(load_profile(data=_data(profile_data, steps=2, experts=True)))
    plugin = run.pm.get_plugin("offload")
    assert plugin.placement == {"high_noise": "host", "low_noise": "device"}
    assert all(not home._host for home in plugin.homes.values())  # no copies made on a CPU run
    assert run.experts_placed_by_plugin
    run.activate_expert("high_noise")  # the activate_expert event: what the preview sampler asks
    assert plugin.placement == {"high_noise": "device", "low_noise": "host"}


@pytest.mark.parametrize("qtype,dtype", [("qint4", torch.bfloat16), ("qint8", torch.float32), ("qfloat8", torch.bfloat16)])
def test_host_copies_of_quantized_weights_round_trip(tiny_model, qtype, dtype):
    m = loader.load_quantized_expert(ModelSource(str(tiny_model)), "transformer", dtype=dtype, qtype=qtype)
    layer = m.blocks[0].attn1.to_q
    x = torch.randn(3, layer.in_features, dtype=dtype)
    with torch.no_grad():
        want = layer(x)
        host = moves.to_host(layer.weight, pin=False)
        assert type(host).__name__ in ("WeightQBitsTensor", "WeightQBytesTensor")  # portable layout on the host
        moves.put(layer, "weight", "param", moves.to_device(host, torch.device("cpu")))
        got = layer(x)
    assert torch.equal(got, want)


def test_streamed_blocks_are_evenly_spaced():
    assert offload.streamed_blocks(40, 0.0) == []
    assert offload.streamed_blocks(40, 1.0) == list(range(40))
    assert offload.streamed_blocks(40, 0.25) == [2, 6, 10, 14, 18, 22, 26, 30, 34, 38]
    assert offload.streamed_blocks(4, 0.5) == [1, 3]


def test_layers_need_gradient_checkpointing_and_a_fraction(profile_data):
    from wantrain.commands.check import check

    data = _data(profile_data, layers=0.5)
    data["model"]["gradient_checkpointing"] = False
    lines = [p.line() for p in check(load_profile(data=data))]
    assert any(line.startswith("error: plugins.offload.layers: layer offloading needs model.gradient_checkpointing") for line in lines)
    data["plugins"]["offload"]["layers"] = 1.5
    with pytest.raises(ProfileError, match=r"plugins.offload.layers: must be in \[0, 1\]"):
        load_profile(data=data)
