"""Prior preservation with ``is_regularization`` datasets: their batches
train with their own captions at ``prior_loss_weight`` and are logged as
``loss/regularization``."""

from __future__ import annotations

import pytest
import torch

from wantrain import lora
from wantrain.errors import ProfileError
from wantrain.loop import load, micro_step, setup, train
from wantrain.profile import load_profile


def _regularization_only(profile_data, weight):
    ds = profile_data["datasets"][0]
    ds.update(is_regularization=True, prior_loss_weight=weight, default_caption="a clip")
    profile_data["training"].update(weight_decay=0.0, batch_size=1)
    return profile_data


def test_weight_zero_leaves_the_lora_untouched(profile_data):
    data = _regularization_only(profile_data, 0.0)
    start = setup(load_profile(data=data))
    load(start)
    before = {e: {k: v.clone() for k, v in lora.lora_state(start.experts[e]).items()} for e in start.trained}
    start.data.close()
    run = train(load_profile(data=data))
    for expert in run.trained:
        after = lora.lora_state(run.experts[expert])
        assert all(torch.equal(before[expert][k], after[k]) for k in after)
    assert run.last_metrics["loss/regularization"] == 0.0


def _grads(profile_data, weight):
    run = setup(load_profile(data=_regularization_only(profile_data, weight)))
    load(run)
    try:
        out = micro_step(run, "high_noise", run.data.next_batch(1))
    finally:
        run.data.close()
    return [p.grad.clone() for p in run.lora_parameters["high_noise"] if p.grad is not None], out


def test_weight_scales_the_gradient_and_the_metric_appears(profile_data):
    g1, out1 = _grads(profile_data, 1.0)
    g4, out4 = _grads(profile_data, 0.25)
    assert g1 and any(g.abs().sum() > 0 for g in g1)
    for a, b in zip(g1, g4):
        torch.testing.assert_close(b, 0.25 * a, rtol=1e-5, atol=1e-12)
    assert float(out4["loss/regularization"]) == pytest.approx(0.25 * float(out1["loss/regularization"]), rel=1e-6)


def test_ordinary_batches_have_no_regularization_metric(profile_data):
    profile_data["training"]["steps"] = 1
    run = train(load_profile(data=profile_data))
    assert "loss/regularization" not in run.last_metrics


def test_prior_loss_weight_belongs_to_regularization_datasets(profile_data):
    profile_data["datasets"][0]["prior_loss_weight"] = 0.5
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    assert err.value.lines()[0].startswith("error: datasets[0].prior_loss_weight: only used by is_regularization = true datasets")
