"""The loop on the tiny model with real media: event order, determinism,
LoRA files (keys, alpha, metadata), diffusers round trip, optimizers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from wantrain import lora
from wantrain.formats import lora as lora_format
from wantrain.formats import safetensors as st
from wantrain.loop import train
from wantrain.profile import load_profile


def _run(profile_data, **changes):
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        profile_data[section][key] = value
    return train(load_profile(data=profile_data))


def test_event_order_on_a_recorded_run(profile_data, tmp_path):
    plugin_file = tmp_path / "recorder.py"
    plugin_file.write_text(
        "from wantrain import hookimpl\nEVENTS = []\n\nclass Plugin:\n"
        + "".join(
            f"    @hookimpl\n    def {n}(self{', ' + a if a else ''}):\n        EVENTS.append(({n!r}, {v}))\n"
            for n, a, v in [
                ("check_profile", "profile", "None"),
                ("after_text_encoder_load", "run", "None"),
                ("after_expert_load", "run, expert", "expert"),
                ("after_adapters_attached", "run", "None"),
                ("on_run_start", "run", "run.step"),
                ("before_expert_switch", "run, old, new", "(old, new)"),
                ("after_expert_switch", "run, old, new", "run.active_expert"),
                ("compute_extra_losses", "run", "run.step"),
                ("before_optimizer_step", "run", "run.step"),
                ("after_optimizer_step", "run", "run.step"),
                ("on_step", "step, metrics", "(step, metrics['expert'])"),
                ("on_save", "step, paths", "sorted(paths)"),
                ("on_run_end", "run", "run.step"),
            ]
        )
    )
    profile_data["plugins"] = {"enabled": [str(plugin_file)]}
    profile_data["training"].update(steps=2, gradient_accumulation=2)
    run = _run(profile_data)
    recorded = sys.modules[run.pm.get_plugin(str(plugin_file)).__class__.__module__].EVENTS
    assert recorded == [
        ("check_profile", None),
        ("after_text_encoder_load", None),
        ("after_expert_load", "high_noise"),
        ("after_expert_load", "low_noise"),
        ("after_adapters_attached", None),
        ("on_run_start", 0),
        ("before_expert_switch", (None, "high_noise")),
        ("after_expert_switch", "high_noise"),
        ("compute_extra_losses", 0),
        ("compute_extra_losses", 0),
        ("before_optimizer_step", 0),
        ("after_optimizer_step", 0),
        ("on_step", (1, "high_noise")),
        ("before_expert_switch", ("high_noise", "low_noise")),
        ("after_expert_switch", "low_noise"),
        ("compute_extra_losses", 1),
        ("compute_extra_losses", 1),
        ("before_optimizer_step", 1),
        ("after_optimizer_step", 1),
        ("on_step", (2, "low_noise")),
        ("on_save", ["high_noise", "low_noise"]),
        ("on_run_end", 2),
    ]


def test_same_profile_same_bytes(profile_data, tmp_path):
    outs = []
    for i in range(2):
        run = _run(profile_data)
        outs.append({e: Path(run.output_dir, f"t_{e}.safetensors").read_bytes() for e in ("high_noise", "low_noise")})
    assert outs[0] == outs[1]
    profile_data["job"]["output_dir"] = str(tmp_path / "other_seed")
    profile_data["job"]["seed"] = 8
    run = _run(profile_data)
    assert Path(run.output_dir, "t_high_noise.safetensors").read_bytes() != outs[0]["high_noise"]


def test_lora_files_keys_alpha_metadata(profile_data):
    profile_data["target"].update(rank=4, alpha=2, save_dtype="bf16")
    run = _run(profile_data)
    assert (run.output_dir / "profile.toml").is_file()
    for expert in ("high_noise", "low_noise"):
        path = run.output_dir / f"t_{expert}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            meta = fh.metadata()
            alpha = fh.get_tensor("diffusion_model.blocks.0.self_attn.q.alpha")
            a = fh.get_tensor("diffusion_model.blocks.3.ffn.0.lora_A.weight")
            b = fh.get_tensor("diffusion_model.blocks.3.cross_attn.o.lora_B.weight")
        expected = {
            f"diffusion_model.blocks.{i}.{m}.{k}"
            for i in range(4)
            for m in lora_format.COMFY_TO_DIFFUSERS
            for k in ("lora_A.weight", "lora_B.weight", "alpha")
        }
        assert keys == expected
        assert alpha.dtype == torch.bfloat16 and alpha.ndim == 0 and float(alpha) == 2.0
        assert a.shape == (4, 128) and b.shape == (128, 4) and a.dtype == torch.bfloat16
        assert float(b.abs().sum()) > 0, "lora_B moved away from its zero init"
        assert meta["wantrain.expert"] == expert and meta["wantrain.rank"] == "4" and meta["wantrain.alpha"] == "2"
        assert meta["wantrain.trigger_word"] == "sks" and meta["wantrain.step"] == "final"
        assert 'name = "t"' in meta["wantrain.profile"]


def _outputs(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(1, 32, 32, generator=g)
    with torch.no_grad():
        return module(hidden_states=x, timestep=torch.tensor([930.0]), encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("alpha", [4, 12])
def test_diffusers_loads_the_pair_with_training_outputs(profile_data, tiny_model, alpha):
    from diffusers import WanPipeline

    profile_data["target"].update(rank=4, alpha=alpha, save_dtype="fp32")
    run = _run(profile_data)
    pipe = WanPipeline.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    base = _outputs(pipe.transformer)
    pipe.load_lora_weights(str(run.output_dir / "t_high_noise.safetensors"), adapter_name="hi")
    pipe.load_lora_weights(str(run.output_dir / "t_low_noise.safetensors"), adapter_name="lo", load_into_transformer_2=True)
    for expert, module in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        ours = _outputs(run.experts[expert])
        theirs = _outputs(module)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-4, "the LoRA changed the output"


def test_saved_file_loads_back_into_training(profile_data):
    run = _run(profile_data)
    saved = lora_format.read_lora(run.output_dir / "t_low_noise.safetensors")
    state, alphas = saved.state(), saved.alphas
    assert set(alphas.values()) == {8.0}
    before = _outputs(run.experts["low_noise"])
    with torch.no_grad():
        for p in run.lora_parameters["low_noise"]:
            p.zero_()
    lora.load_lora_state(run.experts["low_noise"], state)
    torch.testing.assert_close(_outputs(run.experts["low_noise"]), before, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "adamw8bit"])
def test_optimizers_train(profile_data, optimizer):
    profile_data["training"].update(optimizer=optimizer, steps=3)
    run = _run(profile_data)
    b = run.experts["high_noise"].blocks[0].attn1.to_q.lora_B["default"].weight
    assert float(b.detach().abs().sum()) > 0


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedules_with_warmup(profile_data, kind):
    from wantrain.optim import build_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(kind, opt, warmup=2, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 0.5, 1.0]
    if kind == "constant":
        assert lrs[3:] == [1.0] * 7
    else:
        assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.2


def test_gradient_accumulation_and_clipping(profile_data, tmp_path):
    """Three micro-batches per step are drawn, the logged norm is the one
    before clipping, and the gradients the optimizer sees are clipped."""
    from wantrain.data import build_train_data

    plugin = tmp_path / "grads.py"
    plugin.write_text(
        "import torch\nfrom wantrain import hookimpl\nNORMS = []\n\n"
        "@hookimpl\ndef before_optimizer_step(run):\n"
        "    grads = [p.grad for p in run.lora_parameters[run.active_expert] if p.grad is not None]\n"
        "    NORMS.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))\n"
    )
    profile_data["plugins"] = {"enabled": [str(plugin)]}
    profile_data["training"].update(steps=1, gradient_accumulation=3, max_grad_norm=1e-6)
    run = _run(profile_data)
    assert run.last_metrics["grad_norm"] > 1e-4  # norm before clipping
    (clipped,) = sys.modules["wantrain_user_plugin_grads"].NORMS
    assert clipped == pytest.approx(1e-6, rel=1e-3)
    reference = build_train_data(run.profile, seed=run.profile.job.seed)
    for _ in range(3):
        reference.next_batch(1)
    assert run.data.state_dict() == reference.state_dict(), "exactly three micro-batches were drawn"
    reference.close()


def test_loader_workers_do_not_change_the_result(profile_data, tmp_path):
    """``training.num_workers`` reaches the loader and changes nothing but speed."""
    weights = []
    for workers in (0, 2):
        profile_data["job"]["output_dir"] = str(tmp_path / f"w{workers}")
        profile_data["training"].update(num_workers=workers, steps=3)
        run = _run(profile_data)
        assert run.data.num_workers == workers
        weights.append(st.read(run.output_dir / "t_high_noise.safetensors")[0])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_loss_falls_on_one_clip(profile_data, tmp_path):
    """A rank-8 LoRA memorising the demo data: later losses below early ones
    (same timesteps on both sides by reseeding the comparison)."""
    profile_data["training"].update(steps=60, lr=3e-3)
    profile_data["target"].update(rank=8, alpha=8)
    run = _run(profile_data)
    from wantrain import flow

    batch = run.data.next_batch(1)
    latents = run.encode_videos(batch)
    text = run.encode_prompts(batch.captions)
    g = torch.Generator().manual_seed(0)
    losses = {}
    for on in (False, True):
        g.manual_seed(0)
        total = 0.0
        for expert in ("high_noise", "low_noise"):
            for _ in range(4):
                t = flow.uniform_timesteps(expert, run.boundary, 1, g)
                noise = torch.randn(latents.shape, generator=g)
                noisy = flow.add_noise(latents, noise, t)
                with torch.no_grad():
                    if on:
                        pred = run.predict(expert, noisy, t, text)
                    else:
                        with run.lora_disabled(expert):
                            pred = run.predict(expert, noisy, t, text)
                total += float(flow.flow_loss(pred, flow.velocity_target(latents, noise)))
        losses[on] = total
    assert losses[True] < 0.9 * losses[False], losses


def test_on_exception_fires_and_the_error_propagates(profile_data, tmp_path):
    plugin = tmp_path / "boom.py"
    plugin.write_text(
        "from wantrain import hookimpl\nSEEN = []\n\n"
        "@hookimpl\ndef on_step(step):\n    raise RuntimeError('boom at %d' % step)\n\n"
        "@hookimpl\ndef on_exception(run, exc):\n    SEEN.append((run.step, str(exc)))\n"
    )
    profile_data["plugins"] = {"enabled": [str(plugin)]}
    with pytest.raises(RuntimeError, match="boom at 1"):
        _run(profile_data)
    assert sys.modules["wantrain_user_plugin_boom"].SEEN == [(1, "boom at 1")]
