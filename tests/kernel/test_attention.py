"""``[model] attention`` (wantrain.attention): names map to diffusers'
attention dispatcher; ``auto`` is sdpa on the CPU; a backend without a
backward pass is refused for training with the reason (and allowed for
sampling); a backend that cannot run on the device is refused before any
weight loads; a chosen backend really runs the experts (same loss and
gradients as sdpa on the tiny model)."""

from __future__ import annotations

import pytest
import torch

from wantrain import attention
from wantrain.errors import ProfileError
from wantrain.loop import load, setup
from wantrain.model import ModelSource, load_expert
from wantrain.profile import load_profile
from wantrain.run import open_run

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_auto_is_sdpa_on_the_cpu_and_prefers_flash_only_where_it_trains():
    assert attention.resolve("auto", CPU, torch.bfloat16) == "sdpa"
    assert attention.resolve("auto", CPU, torch.float32) == "sdpa"
    assert attention.AUTO_ORDER[-1] == "sdpa"  # always usable: auto never fails
    assert all(attention.BACKENDS[n].no_backward is None for n in attention.AUTO_ORDER)
    assert attention.unusable("flash", CPU, torch.bfloat16, True) == "needs a CUDA GPU (device is cpu)"
    assert attention.unusable("flash", torch.device("cuda"), torch.float32, True) == "needs [model] dtype bf16 or fp16"
    assert attention.unusable("flex", CPU, torch.float32, True).startswith("cannot train on the cpu")
    assert attention.unusable("flex", CPU, torch.float32, False) is None  # sampling on the CPU: fine


def _open(profile_data, name, purpose="train", **job):
    profile_data["model"]["attention"] = name
    profile_data["job"].update(job)
    return open_run(load_profile(data=profile_data), purpose=purpose)


@pytest.mark.parametrize("name", ["sage", "flash3"])
def test_inference_only_backends_are_refused_for_training_with_the_reason(profile_data, name):
    with pytest.raises(ProfileError) as err:
        _open(profile_data, name, purpose="inspect")  # wantrain check / estimate: refused on any machine
    (line,) = str(err.value).strip().splitlines()
    assert line.startswith(f"error: model.attention: {name!r} cannot train: ") and "no backward pass" in line
    assert 'use "auto"' in line


def test_backend_that_cannot_run_here_and_unknown_names_are_profile_errors(profile_data):
    with pytest.raises(ProfileError, match=r"model.attention: 'flash' needs a CUDA GPU \(device is cpu\)"):
        _open(profile_data, "flash", device="cpu")
    with pytest.raises(ProfileError, match=r"model.attention: must be one of .* \(got 'sdpa_maths'\); did you mean 'sdpa_math'\?"):
        _open(profile_data, "sdpa_maths", purpose="inspect")
    _open(profile_data, "flash", purpose="inspect")  # check / estimate on a CPU machine: the GPU box may have it


def _grads(tiny_model, name):
    module = load_expert(ModelSource(str(tiny_model)), "high_noise", torch.float32, subfolder="transformer")
    used = attention.apply(module, name, CPU, torch.float32)
    module.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
    loss = module(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=txt,
                  return_dict=False)[0].square().mean()
    loss.backward()
    backends = {m.processor._attention_backend for m in module.modules() if hasattr(m, "processor")}
    return used, backends, loss.detach(), torch.cat([p.grad.flatten() for p in module.parameters()])


def test_a_chosen_backend_runs_the_experts_with_the_same_loss_and_gradients(tiny_model):
    used, backends, loss, grads = _grads(tiny_model, "auto")
    assert used == "sdpa" and backends == {None}  # diffusers' default (native sdpa) left alone
    for name, backend in (("sdpa_math", "_native_math"),):
        used, got, other_loss, other = _grads(tiny_model, name)
        assert used == name and {str(getattr(b, "value", b)) for b in got} == {backend}
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other, grads, rtol=1e-4, atol=1e-6)


def test_training_run_uses_the_profile_backend(profile_data):
    profile_data["model"]["attention"] = "sdpa_math"
    run = setup(load_profile(data=profile_data))
    load(run)
    for module in run.experts.values():
        got = {getattr(m.processor, "_attention_backend", None) for m in module.modules() if hasattr(m, "processor")}
        assert {str(getattr(b, "value", b)) for b in got} == {"_native_math"}
