"""quantize, ``ara = "calibrated"``: the activation-aware ARA is the exact
minimiser of the layer's output error on the calibration inputs (plain SVD
when they are isotropic), recovers more of the uint4 output error of the
tiny model on held-out inputs than the SVD ARA, and is computed once:
cached next to the model, read back bit for bit."""

from __future__ import annotations

import pytest
import torch

from wantrain.model import ModelSource, load_expert
from wantrain.plugins import quantize
from wantrain.plugins.quantize import ara, calibrate, loader
from wantrain.profile import load_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def test_whitened_ara_is_svd_for_isotropic_inputs_and_better_for_skewed_ones():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 48, 96, 6
    residual = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    # isotropic inputs (covariance I): the output-optimal correction is the residual's own SVD
    down, up = calibrate.whitened_ara(residual, 1000 * torch.eye(in_f, dtype=torch.float64), 1000, r, torch.float64)
    s_down, s_up = ara.svd_ara(residual, torch.zeros_like(residual), r, torch.float64)
    assert float((up @ down - s_up @ s_down).norm() / (s_up @ s_down).norm()) < 1e-4  # (svd_ara runs in fp32)
    # skewed inputs (a few loud channels, low-rank structure): clearly lower output error than the SVD
    scales = torch.ones(in_f, dtype=torch.float64)
    scales[:4] = 20.0
    x = (torch.randn(4000, 8, generator=g, dtype=torch.float64) @ torch.randn(8, in_f, generator=g, dtype=torch.float64)
         + 0.3 * torch.randn(4000, in_f, generator=g, dtype=torch.float64)) * scales
    held_out = x[2000:]
    down, up = calibrate.whitened_ara(residual, x[:2000].T @ x[:2000], 2000, r, torch.float64)

    def err(correction):
        return float((held_out @ (residual - correction).T).norm() / (held_out @ residual.T).norm())

    assert err(up @ down) < 0.6 * err(s_up @ s_down) < 0.6


def _run(profile_data, tmp_path):
    from wantrain.run import load_frozen, open_run

    profile_data["plugins"] = {"enabled": ["quantize"], "quantize": {
        "transformer": "uint4+ara", "ara": "calibrated", "ara_samples": 2, "ara_tokens": 192, "ara_cache": str(tmp_path / "ara")}}
    run = open_run(load_profile(data=profile_data), purpose="train")
    load_frozen(run)  # the text encoder: calibration uses real text states
    return run


def test_calibrated_ara_recovers_more_than_svd_and_is_cached(profile_data, tmp_path):
    run = _run(profile_data, tmp_path)
    plugin = run.pm.get_plugin("quantize")
    calibrated, plan = quantize.load_expert(plugin.config, run, "high_noise", "transformer")
    assert plan.attached == 40 and len(plan.computed) == 40 and plan.pending == []
    src = ModelSource(profile_data["model"]["name_or_path"])
    plain = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="uint4")
    svd = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="uint4+ara", ara=ara.AraPlan("uint4+ara", 16))
    ref = load_expert(src, "high_noise", torch.float32)
    held_out = calibrate.calibration_inputs(run, "high_noise", ref, 2, 192, seed=99, device=torch.device("cpu"))

    def err(module):
        num = den = 0.0
        with torch.no_grad():
            for batch in held_out:
                want = ref(**batch, return_dict=False)[0]
                num += float((module(**batch, return_dict=False)[0] - want).square().sum())
                den += float(want.square().sum())
        return (num / den) ** 0.5

    e_plain, e_svd, e_cal = err(plain), err(svd), err(calibrated)
    assert e_cal < 0.8 * e_svd and e_svd < e_plain, (e_plain, e_svd, e_cal)
    # computed once: the second load reads the cache next to the model, runs no calibration, same adapters
    cache = tmp_path / "ara" / "transformer" / "wantrain_ara_calibrated_uint4_r16.safetensors"
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as fh:
        meta = fh.metadata()
    assert meta["wantrain.ara"] == "calibrated" and meta["wantrain.ara.grid"] == "torchao-uint4-g64"
    assert "samples=2 tokens=192" in meta["wantrain.ara.calibration"]
    again, plan2 = quantize.load_expert(plugin.config, run, "high_noise", "transformer")
    assert plan2.computed == {} and len(plan2.cached) == 40
    for name, adapter in ara.ara_layers(again).items():
        first = ara.ara_layers(calibrated)[name]
        assert torch.equal(adapter.down, first.down) and torch.equal(adapter.up, first.up)
