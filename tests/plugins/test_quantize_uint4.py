"""quantize, ``uint4``: torchao's asymmetric group-64 grid bit for bit (against
torchao's own primitives and against torchao 0.10's ``UIntXWeightOnlyConfig``,
the one ai-toolkit quantizes with), streamed in layer by layer, trains a LoRA
through the quantized layers (with and without checkpointing), and
``wantrain estimate`` knows its size."""

from __future__ import annotations

import hashlib

import pytest
import torch

from wantrain.loop import train
from wantrain.model import ModelSource, load_expert
from wantrain.plugins.quantize import WEIGHT_BYTES, Config, loader, memory_settings, uint4
from wantrain.profile import load_profile

pytestmark = pytest.mark.usefixtures("one_thread")

#: sha256 of the dequantized golden weight as torchao 0.10.0's
#: ``quantize_(linear, UIntXWeightOnlyConfig(torch.uint4))`` leaves it
#: (``linear.weight.dequantize()``), measured once with torchao 0.10.0
TORCHAO_010 = {
    torch.bfloat16: "52b22c322aefd525ef2499e54f521cee288dcee387dbb05d764bcaa798289859",
    torch.float32: "b55acabc09a599517f6da9beff1ea455876258ce81b0fd76a4cc4397a31ee30f",
}


def golden_weight(dtype: torch.dtype) -> torch.Tensor:
    """A [96, 256] weight from integer arithmetic only (identical on every
    platform): mixed signs, all-positive and all-negative groups, column
    scales from 2^-6 to 2^2."""
    i, j = torch.arange(96).view(-1, 1), torch.arange(256).view(1, -1)
    codes = ((i * 37 + j * 11 + (i * j) % 7) % 101 - 43).float()
    return (codes / 64 * 2.0 ** ((j % 9) - 6).float()).to(dtype)


def _linear(weight: torch.Tensor, bias: bool = False) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def _torchao_reference(weight: torch.Tensor) -> torch.Tensor:
    """torchao's own quantize -> dequantize, called as 0.10's
    ``UIntXWeightOnlyConfig(torch.uint4)`` does: asymmetric, block (1, 64),
    the value bounds of torch.uint4, float32 eps, int32 zero point."""
    from torchao.quantization.quant_primitives import (
        _DTYPE_TO_QVALUE_BOUNDS, MappingType, choose_qparams_affine, dequantize_affine, quantize_affine,
    )

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[torch.uint4]
    block = (1, 64)
    scale, zero = choose_qparams_affine(weight, MappingType.ASYMMETRIC, block, torch.uint8, quant_min=qmin, quant_max=qmax,
                                        eps=torch.finfo(torch.float32).eps, zero_point_dtype=torch.int32)
    q = quantize_affine(weight, block, scale, zero, torch.uint8, quant_min=qmin, quant_max=qmax)
    return dequantize_affine(q, block, scale, zero, torch.uint8, quant_min=qmin, quant_max=qmax, output_dtype=weight.dtype)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_uint4_is_torchaos_grid_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    for weight in (golden_weight(dtype), (torch.randn(192, 512, generator=g) * torch.rand(1, 512, generator=g) * 3).to(dtype)):
        layer = uint4.UInt4Linear.from_linear(_linear(weight))
        ours = layer.dequantize()
        assert ours.dtype == dtype and torch.equal(ours, _torchao_reference(weight))
        assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (weight.shape[0], weight.shape[1] // 2)
        assert layer.scale.shape == layer.zero_point.shape == (weight.shape[0], weight.shape[1] // 64)
        assert int(layer.zero_point.max()) <= 15
        assert not torch.equal(ours, weight)  # it did quantize
    # and what ai-toolkit's torchao 0.10 produced for the golden weight
    assert _sha(uint4.UInt4Linear.from_linear(_linear(golden_weight(dtype))).dequantize()) == TORCHAO_010[dtype]


def test_uint4_layer_forward_and_backward_match_the_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    lin = _linear(torch.randn(64, 128, generator=g), bias=True)
    layer = uint4.UInt4Linear.from_linear(lin)
    assert isinstance(layer, torch.nn.Linear) and not list(layer.parameters(recurse=False))[0].requires_grad
    x = torch.randn(3, 5, 128, generator=g, requires_grad=True)
    y = layer(x)
    w = layer.dequantize()
    torch.testing.assert_close(y, x @ w.T + lin.bias)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ w)


def test_attaching_an_adapter_dequantizes_each_uint4_layer_once(monkeypatch):
    """peft reads a layer's ``weight`` ~20 times while attaching (device, dtype,
    shape): one dequantize per layer, not one per read (12.6 s -> 0.3 s for an
    A14B FFN layer on 2 cores); the cached weight is the layer's own and is
    dropped on request."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    layers = [uint4.UInt4Linear.from_linear(torch.nn.Linear(128, 96)) for _ in range(3)]
    calls = []
    real = uint4.UInt4Linear.dequantize
    monkeypatch.setattr(uint4.UInt4Linear, "dequantize", lambda self, *a, **k: calls.append(id(self)) or real(self, *a, **k))
    model = torch.nn.Sequential(*layers)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "1", "2"]), model)
    assert sorted(calls) == sorted(id(layer) for layer in layers)  # once each
    for layer in layers:  # each reads its own weight
        assert torch.equal(layer.weight, real(layer))
    uint4.forget_dequantized()
    assert uint4._LAST == {}


def test_streamed_uint4_expert_equals_quantizing_the_full_expert(tiny_model):
    src = ModelSource(str(tiny_model))
    streamed = loader.load_quantized_expert(src, "transformer", dtype=torch.bfloat16, qtype="uint4")
    full = dict(load_expert(src, "high_noise", torch.bfloat16).named_modules())
    layers = loader.quantized_linears(streamed)
    assert len(layers) == 40 and all(isinstance(m, uint4.UInt4Linear) for _, m in layers)
    for name, layer in layers:
        assert torch.equal(layer.dequantize(), _torchao_reference(full[name].weight.detach()))


def test_uint4_trains_a_lora_through_the_quantized_layers(profile_data, tmp_path, monkeypatch):
    """And the offload plugin moves its buffers (packed codes, scales, zero
    points, the ARA) like any frozen tensor: streaming every block in and out
    gives the same LoRA bits."""
    from wantrain.formats.safetensors import read as read_lora_file
    from wantrain.plugins import offload

    from tests.plugins.test_quantize import _fixed_loss

    quantize = {"transformer": "uint4+ara", "ara_cache": str(tmp_path / "ara")}  # plain uint4: the same layers, no adapter
    profile_data["plugins"] = {"enabled": ["quantize"], "quantize": quantize}
    profile_data["training"].update(steps=6, lr=3e-3)
    profile_data["model"]["gradient_checkpointing"] = True
    run = train(load_profile(data=profile_data))
    batch = run.data.next_batch(2)
    expert = "high_noise"  # (both experts are trained alike)
    module = run.experts[expert]
    assert sum(isinstance(m, uint4.UInt4Linear) for m in module.modules()) == 40
    trained = _fixed_loss(run, expert, batch)
    with run.lora_disabled(expert):
        base = _fixed_loss(run, expert, batch)
    assert trained < base, (expert, trained, base)
    cache = tmp_path / "ara" / "transformer" / "wantrain_ara_svd_uint4_r16.safetensors"
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as fh:
        assert fh.metadata()["wantrain.ara.grid"] == uint4.GRID

    monkeypatch.setattr(offload.Plugin, "moves_on_cpu", True)
    profile_data["job"]["output_dir"] = str(tmp_path / "offloaded")
    profile_data["plugins"] = {"enabled": ["quantize", "offload"], "quantize": quantize, "offload": {"experts": True, "layers": 1.0}}
    moved = train(load_profile(data=profile_data))
    assert moved.pm.get_plugin("offload").streamers[expert].copies_in > 0
    ref, _ = read_lora_file(run.output_dir / "t_high_noise.safetensors")
    got, _ = read_lora_file(moved.output_dir / "t_high_noise.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_checkpointing_gives_the_same_gradients_on_uint4_layers(tiny_model):
    from wantrain.lora import attach_lora
    from wantrain.profile import LORA_MODULES

    from tests.plugins.test_quantize import _probe

    grads = []
    for ckpt in (False, True):
        m = loader.load_quantized_expert(ModelSource(str(tiny_model)), "transformer", dtype=torch.float32, qtype="uint4")
        params = attach_lora(m, 4, 4.0, LORA_MODULES, seed=0)
        g = torch.Generator().manual_seed(1)
        for p in params:
            with torch.no_grad():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        if ckpt:
            m.enable_gradient_checkpointing()
        m.train()
        x, t, txt = _probe()
        m(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_estimate_knows_the_uint4_size(profile_data):
    assert WEIGHT_BYTES["uint4"] == WEIGHT_BYTES["uint4+ara"] == 0.5 + 3 / 64
    settings = memory_settings(Config(transformer="uint4+ara"))
    assert settings["weight_bytes"] == 0.5 + 3 / 64 and settings["ara_rank"] == 16
    from wantrain.commands import estimate as est
    from wantrain.run import open_run

    rows = {}
    for qtype in ("uint4+ara", "qint4+ara"):
        profile_data["plugins"] = {"enabled": ["quantize"], "quantize": {"transformer": qtype}}
        profile = load_profile(data=profile_data)
        e, _, notes, _ = est.estimate_profile(profile, open_run(profile, purpose="inspect").pm)
        assert f"transformer {qtype}" in notes[0]
        rows[qtype] = next(r for r in e.rows if r[0].startswith("transformer weights"))
    assert "(uint4+ara)" in rows["uint4+ara"][0]
    assert rows["uint4+ara"][1] > rows["qint4+ara"][1]  # 0.547 vs 0.531 bytes per weight


@pytest.mark.gpu
def test_uint4_with_calibrated_ara_trains_on_the_gpu(profile_data, tmp_path):
    profile_data["job"]["device"] = "cuda"
    profile_data["model"].update(dtype="bf16", gradient_checkpointing=True)
    profile_data["training"]["steps"] = 6
    profile_data["plugins"] = {"enabled": ["quantize", "offload"], "offload": {"experts": True}, "quantize": {
        "transformer": "uint4+ara", "ara": "calibrated", "ara_samples": 2, "ara_tokens": 256, "ara_cache": str(tmp_path / "ara")}}
    run = train(load_profile(data=profile_data))
    layer = run.experts[run.active_expert].blocks[0].attn1.to_q
    assert layer.base_layer.packed.device.type == "cuda" and layer.base_layer.ara.down.device.type == "cuda"
    b = layer.lora_B["default"].weight
    assert b.device.type == "cuda" and float(b.detach().abs().sum()) > 0
    assert run.pm.get_plugin("quantize").ara_plans["high_noise"].attached == 40
