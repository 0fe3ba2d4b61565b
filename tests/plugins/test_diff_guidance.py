"""diff_guidance: gradient = scale x plain gradient (MSE), on a toy model and
on a real training step; what AdamW makes of it."""

from __future__ import annotations

import textwrap

import pytest
import torch

from wantrain.errors import ProfileError
from wantrain.loop import train
from wantrain.plugins.diff_guidance import guided_target
from wantrain.profile import load_profile


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0, 7.5])
def test_gradient_is_scale_times_the_plain_gradient(scale):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    x, target = torch.randn(5, 6), torch.randn(5, 4)

    def grads(make_target):
        layer.zero_grad()
        pred = layer(x)
        torch.nn.functional.mse_loss(pred, make_target(pred)).backward()
        return [p.grad.clone() for p in layer.parameters()]

    plain = grads(lambda pred: target)
    guided = grads(lambda pred: guided_target(pred, target, scale))
    for g, p in zip(guided, plain):
        torch.testing.assert_close(g, scale * p, rtol=1e-5, atol=1e-7)
    # and it is not a no-op: the guided target differs from the plain one unless scale == 1
    pred = layer(x).detach()
    assert torch.equal(guided_target(pred, target, 1.0), pred + (target - pred))
    if scale != 1.0:
        assert not torch.allclose(guided_target(pred, target, scale), target)


def test_the_target_is_what_the_docs_say():
    pred, target = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(guided_target(pred, target, 3.0), torch.tensor([7.0, -4.0]))  # pred + 3 (target - pred)


def test_scale_must_be_positive(profile_data):
    profile_data["plugins"] = {"enabled": ["diff_guidance"], "diff_guidance": {"scale": 0}}
    with pytest.raises(ProfileError, match=r"plugins\.diff_guidance\.scale: must be greater than 0 \(got 0\.0\); use a positive number"):
        load_profile(data=profile_data)


GRADS = textwrap.dedent("""
    from wantrain import hookimpl
    class Plugin:
        def __init__(self):
            self.grads, self.weights, self.before = [], [], []
        @hookimpl
        def before_optimizer_step(self, run):
            self.grads.append([p.grad.clone() for p in run.lora_parameters[run.active_expert]])
            self.before.append([p.detach().clone() for p in run.lora_parameters[run.active_expert]])
        @hookimpl
        def after_optimizer_step(self, run):
            self.weights.append([p.detach().clone() for p in run.lora_parameters[run.active_expert]])
""")


def _one_step(profile_data, tmp_path, scale):
    rec = tmp_path / "grads.py"
    rec.write_text(GRADS)
    data = {**profile_data, "job": {**profile_data["job"], "output_dir": str(tmp_path / f"out_{scale}")}}
    data["training"] = {**data["training"], "steps": 1, "max_grad_norm": 0.0, "optimizer": "adamw"}
    enabled = ["diff_guidance", str(rec)] if scale else [str(rec)]
    data["plugins"] = {"enabled": enabled, **({"diff_guidance": {"scale": scale}} if scale else {})}
    run = train(load_profile(data=data))
    return run, run.pm.get_plugin(str(rec))


def test_a_training_step_gets_scale_times_the_gradient_and_adamw_barely_notices(profile_data, tmp_path):
    plain_run, plain = _one_step(profile_data, tmp_path, None)
    guided_run, guided = _one_step(profile_data, tmp_path, 3.0)
    nonzero = 0
    for g, p in zip(guided.grads[0], plain.grads[0]):
        # equal up to fp32 rounding of the two backward passes (relative to the layer's largest gradient)
        torch.testing.assert_close(g, 3.0 * p, rtol=1e-4, atol=1e-5 * float(p.abs().max()) + 1e-12)
        nonzero += int(p.abs().sum() > 0)
    assert nonzero > 0
    # the compute_target event answers with the guided target
    pred, target = torch.randn(2, 3), torch.randn(2, 3)
    answer = guided_run.pm.hook.compute_target(run=guided_run, batch=None, pred=pred, target=target)
    torch.testing.assert_close(answer, pred + 3.0 * (target - pred))
    assert plain_run.pm.hook.compute_target(run=plain_run, batch=None, pred=pred, target=target) is None
    # the logged main loss is scale^2 times the plain one (same prediction at step 1)
    assert guided_run.last_metrics["loss/main"] == pytest.approx(9.0 * plain_run.last_metrics["loss/main"], rel=1e-5)
    # AdamW divides by the gradient's RMS: the first update (about lr per weight)
    # is the same except where |grad| is near Adam's epsilon (1e-8)
    lr = profile_data["training"]["lr"]
    moved = max(float((w - w0).abs().max()) for w, w0 in zip(plain.weights[0], plain.before[0]))
    grads = torch.cat([g.flatten() for g in plain.grads[0]])
    diff = torch.cat([(a - b).flatten() for a, b in zip(guided.weights[0], plain.weights[0])]).abs()[grads != 0]
    assert moved == pytest.approx(lr, rel=0.05)
    assert float(diff.median()) < 1e-3 * lr and float(torch.quantile(diff, 0.99)) < 1e-2 * lr
