"""Timestep distributions for training (``[plugins.timesteps]``).

Replaces the kernel's uniform draw with a chosen distribution of the noise
level sigma = t / 1000, always drawn *inside the active expert's range* while
keeping the distribution's shape: the draw is the full distribution
conditioned on the range, done by inverse-CDF sampling between CDF(lo) and
CDF(hi) -- never by clamping, which would pile mass on the boundary, and
never by rejecting, which would cost an unbounded number of draws.

Distributions (``type``), as a CDF F(s) / quantile function F^-1(u) of sigma:

- ``linear``: uniform, F(s) = s.
- ``shift``: a uniform u pushed through the scheduler's time shift,
  F^-1(u) = k u / (1 + (k-1) u) with k = ``shift``;
  F(s) = s / (k - (k-1) s).
- ``sigmoid``: sigma = sigmoid(``sigmoid_scale`` * z), z ~ N(0, 1);
  F(s) = Phi(logit(s) / scale).
- ``logit_normal``: sigma = sigmoid(``mean`` + ``std`` * z);
  F(s) = Phi((logit(s) - mean) / std).
- ``weighted``: a bell over sigma, density proportional to
  exp(-2 (s - 1/2)^2) - exp(-1/2) (zero at both ends, peak in the middle --
  the bell-shaped weighting AI Toolkit uses); F by its closed-form integral,
  F^-1 by bisection.

``bias`` reshapes any of them at the quantile level, u -> g(u), with the cubic
curves AI Toolkit uses for "content" / "style":

- ``balanced``: g(u) = u;
- ``high_noise``: g(u) = 1 - (1 - u)^3 (more draws at high noise: composition,
  motion, the subject's shape);
- ``low_noise``: g(u) = u^3 (more draws at low noise: texture, detail, style).

So the combined CDF is H(s) = g^-1(F(s)) and the draw inside [lo, hi] is
``H^-1(H(lo) + (H(hi) - H(lo)) * U)`` with U ~ uniform[0, 1) from the run's
generator (the only randomness used, so resume is exact).

Events: ``check_profile`` (keys that the chosen type would ignore are errors),
``on_run_start`` (logs each expert's share of the distribution),
``sample_timesteps`` (the draw).

Interplay: the expert ranges come from ``run.expert_range`` (the model's
``boundary_ratio``, or ``[plugins.multistage] boundary``).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import attrs
import torch

from wantrain import hookimpl
from wantrain.errors import ProfileProblem
from wantrain.profile import one_of, positive
from wantrain.run import Run

log = logging.getLogger("wantrain.timesteps")

TYPES = ("linear", "sigmoid", "shift", "logit_normal", "weighted")
BIASES = ("balanced", "high_noise", "low_noise")
#: which optional keys each type reads (a key given for another type is an error)
KEYS_OF_TYPE = {"linear": (), "sigmoid": ("sigmoid_scale",), "shift": ("shift",),
                "logit_normal": ("mean", "std"), "weighted": ()}
DEFAULTS = {"shift": 3.0, "sigmoid_scale": 1.0, "mean": 0.0, "std": 1.0}


@attrs.frozen(kw_only=True)
class Config:
    #: the distribution of sigma = t / 1000
    type: str = attrs.field(default="linear", validator=one_of(*TYPES))
    #: where to put more of the draws
    bias: str = attrs.field(default="balanced", validator=one_of(*BIASES))
    #: type = "shift": the time shift k (3.0 when not given)
    shift: float | None = attrs.field(default=None, validator=positive)
    #: type = "sigmoid": the spread of the normal before the sigmoid (1.0)
    sigmoid_scale: float | None = attrs.field(default=None, validator=positive)
    #: type = "logit_normal": mean of logit(sigma) (0.0)
    mean: float | None = None
    #: type = "logit_normal": standard deviation of logit(sigma) (1.0)
    std: float | None = attrs.field(default=None, validator=positive)

    def get(self, key: str) -> float:
        value = getattr(self, key)
        return DEFAULTS[key] if value is None else value


# ---------------------------------------------------------------- the math


@attrs.frozen
class Distribution:
    """A distribution of sigma in [0, 1]: its CDF and quantile function,
    both float64 tensor -> tensor."""

    cdf: Callable[[torch.Tensor], torch.Tensor]
    icdf: Callable[[torch.Tensor], torch.Tensor]


def _logit(s: torch.Tensor) -> torch.Tensor:
    return torch.log(s) - torch.log1p(-s)


def logit_normal(mean: float, std: float) -> Distribution:
    return Distribution(
        cdf=lambda s: torch.special.ndtr((_logit(s) - mean) / std),
        icdf=lambda u: torch.sigmoid(mean + std * torch.special.ndtri(u)),
    )


def shifted(k: float) -> Distribution:
    return Distribution(cdf=lambda s: s / (k - (k - 1) * s), icdf=lambda u: k * u / (1 + (k - 1) * u))


_BELL_FLOOR = math.exp(-0.5)


def _bell_integral(s: torch.Tensor) -> torch.Tensor:
    """Integral from 0 to s of exp(-2 (x - 1/2)^2) - exp(-1/2)."""
    root = math.sqrt(math.pi / 8)
    return root * (torch.special.erf(math.sqrt(2) * (s - 0.5)) + math.erf(math.sqrt(2) / 2)) - _BELL_FLOOR * s


def bisect(cdf: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """F^-1(u) for a continuous increasing CDF on [0, 1] (60 halvings: exact in float64)."""
    lo, hi = torch.zeros_like(u), torch.ones_like(u)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = cdf(mid) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def bell() -> Distribution:
    total = float(_bell_integral(torch.tensor(1.0, dtype=torch.float64)))

    def cdf(s):
        return (_bell_integral(s) / total).clamp(0.0, 1.0)

    return Distribution(cdf=cdf, icdf=lambda u: bisect(cdf, u))


def distribution(config: Config) -> Distribution:
    """The configured distribution of sigma, bias included."""
    if config.type == "linear":
        base = Distribution(cdf=lambda s: s, icdf=lambda u: u)
    elif config.type == "shift":
        base = shifted(config.get("shift"))
    elif config.type == "sigmoid":
        base = logit_normal(0.0, config.get("sigmoid_scale"))
    elif config.type == "logit_normal":
        base = logit_normal(config.get("mean"), config.get("std"))
    else:
        base = bell()
    return biased(base, config.bias)


def biased(base: Distribution, bias: str) -> Distribution:
    """Apply the quantile-level bias g: H(s) = g^-1(F(s)), H^-1(u) = F^-1(g(u))."""
    if bias == "balanced":
        return base
    if bias == "high_noise":
        g, g_inv = (lambda u: 1 - (1 - u) ** 3), (lambda v: 1 - (1 - v).clamp(min=0) ** (1 / 3))
    else:
        g, g_inv = (lambda u: u**3), (lambda v: v.clamp(min=0) ** (1 / 3))
    return Distribution(cdf=lambda s: g_inv(base.cdf(s)), icdf=lambda u: base.icdf(g(u)))


def mass_between(dist: Distribution, lo_t: float, hi_t: float) -> float:
    """Share of the whole distribution that falls in [lo_t, hi_t] (t space)."""
    ends = dist.cdf(torch.tensor([lo_t / 1000, hi_t / 1000], dtype=torch.float64))
    return float(ends[1] - ends[0])


def draw(dist: Distribution, lo_t: float, hi_t: float, batch_size: int, generator: torch.Generator,
         include_hi: bool = True) -> torch.Tensor:
    """``batch_size`` timesteps from ``dist`` conditioned on [lo_t, hi_t]
    (``hi_t`` itself excluded when ``include_hi`` is False), float32."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    ends = dist.cdf(torch.tensor([lo_t / 1000, hi_t / 1000], dtype=torch.float64))
    if float(ends[1] - ends[0]) <= 1e-12:
        # (almost) no mass in the range: uniform there rather than a point mass
        sigma = (lo_t + (hi_t - lo_t) * u) / 1000
    else:
        sigma = dist.icdf(ends[0] + (ends[1] - ends[0]) * u)
    t = (sigma * 1000).float()
    top = torch.tensor(hi_t, dtype=torch.float32)
    if not include_hi:  # float rounding must not route a draw to the other expert
        top = torch.nextafter(top, torch.tensor(-math.inf))
    return t.clamp(min=lo_t, max=float(top))


# ---------------------------------------------------------------- checks


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    """Keys that the chosen ``type`` would silently ignore."""
    used = KEYS_OF_TYPE[config.type]
    out = []
    for key in DEFAULTS:
        if getattr(config, key) is not None and key not in used:
            owner = next(t for t, keys in KEYS_OF_TYPE.items() if key in keys)
            out.append(ProfileProblem(f"plugins.timesteps.{key}", f"only used with type = {owner!r}, not {config.type!r}",
                                      getattr(config, key), f"remove it or set type = {owner!r}"))
    return out


# ---------------------------------------------------------------- the plugin


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.dist = distribution(config)

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @hookimpl
    def on_run_start(self, run: Run):
        shares = ", ".join(f"{e} {100 * mass_between(self.dist, *run.expert_range(e)):.1f}%" for e in run.trained)
        log.info("timesteps: %s, bias %s; share of the distribution in each trained expert's range: %s",
                 self.config.type, self.config.bias, shares)

    @hookimpl
    def sample_timesteps(self, run: Run, expert, batch_size, generator):
        lo, hi = run.expert_range(expert)
        return draw(self.dist, lo, hi, batch_size, generator, include_hi=(expert == "high_noise"))
