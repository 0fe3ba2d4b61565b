"""``[training] compile``: each block compiled (regional); compiled and eager
give the same loss and LoRA gradients; the count of compiled graphs stays at
its first value over steps and a switch between the two experts (one graph
serves all blocks of both); the profile key reaches the loaded experts.
The CPU test compiles with the ``aot_eager`` backend (dynamo's graph capture
and autograd, no C++ code generation: seconds, not minutes, on a busy CPU)."""

from __future__ import annotations

import pytest
import torch

from wantrain import compilation
from wantrain.lora import attach_lora
from wantrain.model import ModelSource, load_expert
from wantrain.profile import LORA_MODULES, load_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def _expert(tiny_model, subfolder, compiled):
    module = load_expert(ModelSource(str(tiny_model)), "x", torch.float32, subfolder=subfolder)
    params = attach_lora(module, 4, 4.0, LORA_MODULES, seed=0)
    g = torch.Generator().manual_seed(1)
    for p in params:  # B non-zero so A gets gradients too
        with torch.no_grad():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    module.enable_gradient_checkpointing()
    module.train()
    assert compilation.compile_blocks(module, compiled, backend="aot_eager") == (len(module.blocks) if compiled else 0)
    return module, params


def _step(module, params, seed):
    g = torch.Generator().manual_seed(seed)
    x, txt = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    loss = module(hidden_states=x, timestep=torch.tensor([300.0 + seed]), encoder_hidden_states=txt,
                  return_dict=False)[0].square().mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.detach(), grads


def test_compiled_blocks_match_eager_and_never_recompile(tiny_model):
    torch._dynamo.reset()
    eager = {s: _expert(tiny_model, s, False) for s in ("transformer", "transformer_2")}
    compiled = {s: _expert(tiny_model, s, True) for s in ("transformer", "transformer_2")}
    first = None
    for step, expert in enumerate(["transformer", "transformer", "transformer_2", "transformer"]):
        loss_e, grads_e = _step(*eager[expert], seed=step)
        loss_c, grads_c = _step(*compiled[expert], seed=step)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads_c, grads_e, rtol=1e-4, atol=1e-6)
        count = compilation.graph_count()
        first = count if first is None else first
        assert count == first, f"recompiled at step {step} ({expert}): {first} -> {count} graphs"
    assert first >= 1


def test_a_run_with_compile_on_trains_the_lora_of_an_eager_run(profile_data, tmp_path, monkeypatch):
    """``[training] compile = true`` through ``wantrain run``'s path: every
    block of both experts compiled, graphs made, and the LoRA files of two
    steps equal an eager run's (the CPU backend aot_eager stands in for
    inductor: dynamo's capture and autograd without C++ code generation)."""
    from safetensors.torch import load_file

    from wantrain.loop import train

    real = compilation.compile_blocks
    monkeypatch.setattr(compilation, "compile_blocks", lambda module, enabled: real(module, enabled, backend="aot_eager"))
    torch._dynamo.reset()
    files = {}
    for compiled in (False, True):
        profile_data["training"].update(compile=compiled, steps=2)
        profile_data["job"]["output_dir"] = str(tmp_path / str(compiled))
        run = train(load_profile(data=profile_data))
        if compiled:
            assert compilation.graph_count() >= 1
            for module in run.experts.values():
                assert all(getattr(b, "_compiled_call_impl", None) is not None for b in module.blocks)
        files[compiled] = {e: load_file(str(tmp_path / str(compiled) / f"t_{e}.safetensors")) for e in run.trained}
    for expert, eager in files[False].items():
        for key, value in eager.items():
            torch.testing.assert_close(files[True][expert][key], value, rtol=1e-4, atol=1e-6)
