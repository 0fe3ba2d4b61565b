"""quantize: every qtype trains (loss with the LoRA below the base's on a
fixed batch), gradient checkpointing gives the same gradients on quantized
layers, ARA lowers the output error and loads from both file layouts, is
never trained or saved and stays on with the LoRA off; the text-encoder
setting is honoured alone; profile mistakes are reported."""

from __future__ import annotations

import pytest
import torch

from wantrain.plugins.quantize import ara, loader
from wantrain.errors import ProfileError
from wantrain.formats import ara as ara_format
from wantrain.formats.safetensors import read as read_lora_file
from wantrain.loop import train
from wantrain.model import ModelSource, load_expert
from wantrain.profile import load_profile


pytestmark = pytest.mark.usefixtures("one_thread")


def _profile(profile_data, tmp_path, **quantize):
    profile_data["plugins"] = {"enabled": ["quantize"], "quantize": {"ara_cache": str(tmp_path / "ara"), **quantize}}
    return profile_data


def _probe(seed=0, frames=2, side=8, text=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, frames, side, side, generator=g), torch.tensor([500.0]),
            torch.randn(1, text, 32, generator=g))


def _out(module, probe):
    x, t, txt = probe
    with torch.no_grad():
        return module(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0].float()


def _fixed_loss(run, expert, batch, n=4):
    """Flow-matching loss of ``expert`` on a fixed batch, fixed noise and timesteps."""
    from wantrain import flow

    g = torch.Generator().manual_seed(123)
    latents = run.encode_videos(batch).float()
    states = run.encode_prompts(batch.captions)
    lo, hi = run.expert_range(expert)
    total = 0.0
    with torch.no_grad():
        for _ in range(n):
            noise = torch.randn(latents.shape, generator=g)
            t = lo + (hi - lo) * torch.rand(latents.shape[0], generator=g)
            pred = run.predict(expert, flow.add_noise(latents, noise, t), t, states)
            total += float(flow.flow_loss(pred, flow.velocity_target(latents, noise), "mse"))
    return total / n


@pytest.mark.parametrize("qtype", ["qfloat8", "qint8", "qint4", "qint4+ara"])
def test_each_qtype_trains_with_falling_loss(profile_data, tmp_path, qtype):
    data = _profile(profile_data, tmp_path, transformer=qtype)
    data["training"].update(steps=8, lr=3e-3)
    data["model"]["gradient_checkpointing"] = True
    run = train(load_profile(data=data))
    batch = run.data.next_batch(2)
    for expert in run.trained:
        module = run.experts[expert]
        assert len(loader.quantized_linears(module)) == 40  # every block linear, nothing else
        assert not any(n.startswith(("proj_out", "patch", "condition")) for n, _ in loader.quantized_linears(module))
        trained = _fixed_loss(run, expert, batch)
        with run.lora_disabled(expert):
            base = _fixed_loss(run, expert, batch)
        assert trained < base, (expert, trained, base)
    assert (len(ara.ara_layers(run.experts["high_noise"])) == 40) == qtype.endswith("+ara")


def test_checkpointing_gives_the_same_gradients_on_quantized_layers(tiny_model):
    from wantrain.lora import attach_lora
    from wantrain.profile import LORA_MODULES

    grads = []
    probe = _probe()
    for ckpt in (False, True):
        m = loader.load_quantized_expert(ModelSource(str(tiny_model)), "transformer", dtype=torch.float32, qtype="qint4")
        params = attach_lora(m, 4, 4.0, LORA_MODULES, seed=0)
        g = torch.Generator().manual_seed(1)
        for p in params:  # make B non-zero so A gets a gradient too
            with torch.no_grad():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        if ckpt:
            m.enable_gradient_checkpointing()
        m.train()
        x, t, txt = probe
        m(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_ara_lowers_output_error_against_plain_qint4(tiny_model, tmp_path):
    src = ModelSource(str(tiny_model))
    ref = load_expert(src, "high_noise", torch.float32)
    plain = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="qint4")
    plan = ara.AraPlan("qint4+ara", 16, cache=tmp_path / "ara.safetensors")
    recovered = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="qint4+ara", ara=plan)
    assert plan.attached == 40
    probe = _probe()
    want = _out(ref, probe)
    err_plain = float((_out(plain, probe) - want).norm() / want.norm())
    err_ara = float((_out(recovered, probe) - want).norm() / want.norm())
    assert err_ara < 0.9 * err_plain, (err_ara, err_plain)
    # and per layer: the ARA'd weight is closer to the original than Q(W)
    ref_w = dict(ref.named_parameters())
    for name, layer in loader.quantized_linears(recovered)[:8]:
        w = ref_w[f"{name}.weight"].float()
        deq = ara.dequantized_weight(layer).float()
        ad = layer.ara
        assert (w - deq - ad.scale * ad.up.float() @ ad.down.float()).norm() < (w - deq).norm()
    # computed once: the second load reads the cache and computes nothing
    again = ara.AraPlan("qint4+ara", 16, cache=tmp_path / "ara.safetensors")
    second = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="qint4+ara", ara=again)
    assert again.computed == {} and len(again.cached) == 40
    torch.testing.assert_close(_out(second, probe), _out(recovered, probe))


@pytest.mark.parametrize("layout", ["comfy", "diffusers"])
def test_ara_files_load_in_both_key_layouts(profile_data, tmp_path, layout):
    src = ModelSource(profile_data["model"]["name_or_path"])
    probe = _probe()
    wanted = {}
    for expert, sub in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        plan = ara.AraPlan("qint4+ara", 8, cache=None)
        m = loader.load_quantized_expert(src, sub, dtype=torch.float32, qtype="qint4+ara", ara=plan)
        wanted[expert] = _out(m, probe)
        # store with alpha = rank / 2 and B doubled: the loader must apply alpha / rank
        layers = {k: (d, 2 * u, 0.5) for k, (d, u, _) in plan.computed.items()}
        state = ara_format.ara_to_state(layers, layout)
        prefix = "diffusion_model.blocks.0.self_attn.q" if layout == "comfy" else "blocks.0.attn1.to_q"
        assert f"{prefix}.lora_A.weight" in state
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / f"ara_{expert}.safetensors"))
    data = _profile(profile_data, tmp_path, transformer="qint4+ara", ara=str(tmp_path / "ara_{expert}.safetensors"))
    data["training"]["steps"] = 2
    run = train(load_profile(data=data))
    for expert in ("high_noise", "low_noise"):
        assert run.pm.get_plugin("quantize").ara_plans[expert].attached == 40
        with run.lora_disabled(expert):
            torch.testing.assert_close(_out(run.experts[expert], probe), wanted[expert], rtol=1e-5, atol=1e-5)


def test_ara_is_frozen_unsaved_and_stays_on_with_lora_off(profile_data, tmp_path):
    data = _profile(profile_data, tmp_path, transformer="qint4+ara", ara_rank=8)
    data["training"].update(steps=4, lr=1e-2)
    run = train(load_profile(data=data))
    src = ModelSource(data["model"]["name_or_path"])
    plain = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="qint4")
    cached = tmp_path / "ara" / "transformer" / "wantrain_ara_svd_qint4_r8.safetensors"
    assert cached.is_file()
    again = ara.AraPlan("qint4+ara", 8, cache=cached)
    fresh = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="qint4+ara", ara=again)
    module = run.experts["high_noise"]
    probe = _probe()
    # trained for 4 steps at a high lr, yet the ARA is bit-identical to the cached one
    for name, ad in ara.ara_layers(module).items():
        ref = ara.ara_layers(fresh)[name]
        assert torch.equal(ad.down, ref.down) and torch.equal(ad.up, ref.up)
    ara_tensors = {id(t) for ad in ara.ara_layers(module).values() for t in (ad.down, ad.up)}
    assert not any(id(p) in ara_tensors for p in run.lora_parameters["high_noise"])
    assert not any("ara" in n for n, p in module.named_parameters())
    # LoRA off: base + ARA exactly (not plain Q(W)); LoRA on: something else
    with run.lora_disabled("high_noise"):
        off = _out(module, probe)
    torch.testing.assert_close(off, _out(fresh, probe))
    assert (off - _out(plain, probe)).abs().max() > 1e-4
    assert (_out(module, probe) - off).abs().max() > 1e-4
    tensors, _ = read_lora_file(run.output_dir / "t_high_noise.safetensors")
    assert len(tensors) == 4 * 10 * 3 and not any("ara" in k for k in tensors)


def test_text_encoder_setting_is_honoured_alone(profile_data, tmp_path):
    from optimum.quanto.nn import QLinear

    data = _profile(profile_data, tmp_path, transformer="none", text_encoder="qint8")
    data["training"]["steps"] = 1
    run = train(load_profile(data=data))
    te_q = [n for n, m in run.text_encoder.named_modules() if isinstance(m, QLinear)]
    assert len(te_q) == sum(1 for m in run.text_encoder.modules() if isinstance(m, torch.nn.Linear))
    assert te_q and loader.quantized_linears(run.experts["high_noise"]) == []


def test_profile_mistakes_are_reported(profile_data, tmp_path):
    data = _profile(profile_data, tmp_path, transformer="qint3", text_encoder="qint4")
    with pytest.raises(ProfileError) as err:
        load_profile(data=data)
    text = str(err.value)
    assert "plugins.quantize.transformer: must be one of" in text and "plugins.quantize.text_encoder" in text

    from wantrain.commands.check import check

    data = _profile(profile_data, tmp_path, transformer="qint4+ara", ara=str(tmp_path / "one.safetensors"))
    lines = [p.line() for p in check(load_profile(data=data))]
    assert any("ARA file not found" in line for line in lines), lines  # one file may serve both (tests/plugins/test_ara_published.py)
    data["plugins"]["quantize"]["ara"] = str(tmp_path / "missing_{expert}.safetensors")
    lines = [p.line() for p in check(load_profile(data=data))]
    assert sum("ARA file for" in line and "not found" in line for line in lines) == 2, lines


def test_ara_file_with_wrong_keys_is_an_error():
    with pytest.raises(ValueError, match="unexpected key"):
        ara_format.parse_ara_state({"blocks.0.attn1.to_q.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="lacks its up"):
        ara_format.parse_ara_state({"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 2)})


def test_a_bf16_qint4_weight_frozen_on_the_host_stays_kernel_agnostic():
    """quanto packs a bf16 qint4 weight frozen on the CPU for its CPU int4
    matmul, which unpacks only through a matmul with the identity (seconds per
    layer: the ARA's SVD, every backward pass and the move to a GPU pay it).
    The loader keeps quanto's agnostic form: the same dequantized weight,
    gradients flow, and moving it to another device still works."""
    from optimum.quanto import freeze, qint4, quantize
    from optimum.quanto.tensor.weights.qbits import WeightQBitsTensor

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(512, 384, dtype=torch.bfloat16))
    theirs = torch.nn.Sequential(torch.nn.Linear(512, 384, dtype=torch.bfloat16))
    theirs.load_state_dict(ours.state_dict())
    loader.quantize_linears(ours, "qint4", exclude=())
    quantize(theirs, weights=qint4)
    freeze(theirs)
    assert type(ours[0].weight) is WeightQBitsTensor and type(theirs[0].weight) is not WeightQBitsTensor
    assert torch.equal(ours[0].weight.dequantize(), theirs[0].weight.dequantize())
    x = torch.randn(4, 512, dtype=torch.bfloat16, requires_grad=True)
    ours(x).float().square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert type(ours.to("meta")[0].weight).__name__.endswith("WeightQBitsTensor")
