"""timesteps: every type x bias drawn inside each expert's range keeps the
documented distribution's shape (KS test of 20k draws against a reference
CDF written here from the formulas in docs/plugins/timesteps.md)."""

from __future__ import annotations

import math
import textwrap
from statistics import NormalDist

import numpy as np
import pytest
import torch

from wantrain.errors import ProfileError
from wantrain.loop import setup, train
from wantrain.plugins import timesteps as ts
from wantrain.profile import load_profile

N = 20_000
KS_CRITICAL = 1.95 / math.sqrt(N)  # alpha = 0.001
RANGES = {"high_noise": (875.0, 1000.0), "low_noise": (0.0, 875.0)}


# ------------------------------------------------ reference CDFs (independent of the plugin's code)


def _logit(s):
    return math.log(s) - math.log1p(-s)


def _normal_of_logit(mean, std):
    dist = NormalDist(mean, std)
    return lambda s: 0.0 if s <= 0 else 1.0 if s >= 1 else dist.cdf(_logit(s))


def _bell_cdf():
    grid = np.linspace(0.0, 1.0, 200_001)
    density = np.exp(-2 * (grid - 0.5) ** 2) - math.exp(-0.5)
    cum = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    cum /= cum[-1]
    return lambda s: float(np.interp(s, grid, cum))


BASE_CDF = {
    "linear": lambda cfg: (lambda s: s),
    "shift": lambda cfg: (lambda s, k=cfg.get("shift"): s / (k - (k - 1) * s)),
    "sigmoid": lambda cfg: _normal_of_logit(0.0, cfg.get("sigmoid_scale")),
    "logit_normal": lambda cfg: _normal_of_logit(cfg.get("mean"), cfg.get("std")),
    "weighted": lambda cfg: _bell_cdf(),
}
BIAS_INV = {  # g^-1 of each bias
    "balanced": lambda v: v,
    "high_noise": lambda v: 1 - max(0.0, 1 - v) ** (1 / 3),
    "low_noise": lambda v: max(0.0, v) ** (1 / 3),
}


def reference_cdf(cfg):
    base, g_inv = BASE_CDF[cfg.type](cfg), BIAS_INV[cfg.bias]
    return lambda s: g_inv(base(s))


def ks_distance(samples_t: torch.Tensor, cdf, lo_t: float, hi_t: float) -> float:
    """Kolmogorov-Smirnov distance between the draws and ``cdf`` conditioned on [lo, hi]."""
    a, b = cdf(lo_t / 1000), cdf(hi_t / 1000)
    x = np.sort(samples_t.double().numpy() / 1000)
    f = np.array([(cdf(v) - a) / (b - a) for v in x])
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(0, n) / n)))


CONFIGS = [ts.Config(type=t, bias=b) for t in ts.TYPES for b in ts.BIASES] + [
    ts.Config(type="shift", shift=12.0),
    ts.Config(type="sigmoid", sigmoid_scale=2.5, bias="high_noise"),
    ts.Config(type="logit_normal", mean=1.0, std=0.6),
    ts.Config(type="logit_normal", mean=-0.5, std=1.5, bias="low_noise"),
]


@pytest.mark.parametrize("expert", list(RANGES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.type}-{c.bias}-{c.shift or c.sigmoid_scale or c.mean or ''}")
def test_draws_follow_the_formula_inside_the_expert_range(cfg, expert):
    lo, hi = RANGES[expert]
    generator = torch.Generator().manual_seed(1234)
    t = ts.draw(ts.distribution(cfg), lo, hi, N, generator, include_hi=(expert == "high_noise"))
    assert t.dtype == torch.float32 and t.shape == (N,)
    assert float(t.min()) >= lo and (float(t.max()) <= hi if expert == "high_noise" else float(t.max()) < hi)
    assert ks_distance(t, reference_cdf(cfg), lo, hi) < KS_CRITICAL


@pytest.mark.parametrize("cfg", [ts.Config(type=t) for t in ts.TYPES], ids=lambda c: c.type)
def test_quantiles_over_the_whole_range_match_the_formula(cfg):
    """Quantiles of 20k full-range draws against the formula's quantiles."""
    t = ts.draw(ts.distribution(cfg), 0.0, 1000.0, N, torch.Generator().manual_seed(5))
    cdf = reference_cdf(cfg)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        lo, hi = 0.0, 1.0  # the formula's quantile by bisection
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
        empirical = float(torch.quantile(t.double() / 1000, q))
        assert empirical == pytest.approx(lo, abs=0.012), f"q={q}"


def test_the_ks_check_rejects_clamped_draws():
    """The check above has teeth: clamping a sigmoid draw into the high-noise
    range (what trainers that 'starve' that expert do) fails it."""
    cfg = ts.Config(type="sigmoid")
    sigma = torch.sigmoid(torch.randn(N, generator=torch.Generator().manual_seed(0)))
    clamped = (sigma * 1000).clamp(875.0, 1000.0)
    assert ks_distance(clamped, reference_cdf(cfg), 875.0, 1000.0) > 10 * KS_CRITICAL


def test_bias_moves_mass_the_way_it_says():
    means = {b: float(ts.draw(ts.distribution(ts.Config(bias=b)), 0, 1000, N, torch.Generator().manual_seed(3)).mean())
             for b in ts.BIASES}
    assert means["low_noise"] < 300 < means["balanced"] < 600 < means["high_noise"]
    # cubic bias: E[1 - (1-u)^3] = 3/4, E[u^3] = 1/4
    assert means["high_noise"] == pytest.approx(750, abs=10) and means["low_noise"] == pytest.approx(250, abs=10)


def test_draws_use_only_the_given_generator():
    dist = ts.distribution(ts.Config(type="weighted", bias="high_noise"))
    before = torch.get_rng_state()
    a = ts.draw(dist, 0, 875, 64, torch.Generator().manual_seed(9), include_hi=False)
    b = ts.draw(dist, 0, 875, 64, torch.Generator().manual_seed(9), include_hi=False)
    assert torch.equal(a, b) and torch.equal(before, torch.get_rng_state())


def test_low_noise_draws_never_reach_the_boundary():
    """Float rounding must not route a low-noise draw to the high-noise expert."""
    dist = ts.distribution(ts.Config(type="shift", shift=12.0, bias="high_noise"))  # mass piles up near the cut
    t = ts.draw(dist, 0.0, 875.0, 200_000, torch.Generator().manual_seed(0), include_hi=False)
    assert float(t.max()) < 875.0


def test_keys_the_type_ignores_are_errors(profile_data):
    profile_data["plugins"] = {"enabled": ["timesteps"], "timesteps": {"type": "sigmoid", "shift": 5.0}}
    with pytest.raises(ProfileError) as err:
        setup(load_profile(data=profile_data))
    assert str(err.value) == ("error: plugins.timesteps.shift: only used with type = 'shift', not 'sigmoid' (got 5.0); "
                              "remove it or set type = 'shift'")


def test_bad_values_are_profile_errors(profile_data):
    profile_data["plugins"] = {"enabled": ["timesteps"], "timesteps": {"type": "sigmoidd", "bias": "content", "shift": -1}}
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    text = str(err.value)
    assert "plugins.timesteps.type: must be one of" in text and "did you mean 'sigmoid'?" in text
    assert "plugins.timesteps.bias: must be one of 'balanced', 'high_noise', 'low_noise'" in text
    assert "plugins.timesteps.shift: must be greater than 0" in text


def test_training_uses_the_plugin_and_stays_in_range(profile_data, tmp_path):
    recorder = tmp_path / "rec_t.py"
    recorder.write_text(textwrap.dedent("""
        from wantrain import hookimpl
        class Plugin:
            def __init__(self):
                self.seen = []
            @hookimpl
            def compute_extra_losses(self, run, batch, ctx):
                self.seen.append((ctx.expert, ctx.timesteps.tolist()))
    """))
    profile_data["training"].update(steps=4, batch_size=3)
    profile_data["plugins"] = {"enabled": ["timesteps", str(recorder)],
                               "timesteps": {"type": "logit_normal", "mean": 3.0, "std": 0.5}}
    run = train(load_profile(data=profile_data))
    seen = run.pm.get_plugin(str(recorder)).seen
    assert len(seen) == 4
    for expert, values in seen:
        lo, hi = run.expert_range(expert)
        assert all(lo <= v <= hi for v in values) and (expert == "high_noise" or max(values) < hi)
    # logit-normal(3, 0.5) has 1.8% of its mass below 875, all of it near the top:
    # P(t < 600 | t < 875) ~ 1e-7 (uniform, the kernel's fallback, would put 69% there)
    low = [v for e, vs in seen if e == "low_noise" for v in vs]
    assert len(low) == 6 and min(low) > 600
