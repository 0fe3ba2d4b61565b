"""Stratified training timesteps.

Instead of ``batch_size`` independent uniform draws in the active expert's
range, cut the range into ``slices`` equal slices and draw once in each
(cycling through them over micro-batches, in a shuffled order): every part
of the range is visited regularly, with less variance than independent
draws. Draws come from the kernel's ``generator`` only (it is part of the
resume state), so runs stay reproducible and resume exactly.

Event: ``sample_timesteps`` (first result: it answers instead of the
kernel's uniform fallback -- do not enable the built-in ``timesteps``
plugin at the same time, the first one registered would win).

Keys (``[plugins.stratified_timesteps]``): ``slices`` (default 8).
"""

from __future__ import annotations

import attrs
import torch

from wantrain import hookimpl


def _at_least_one(instance, attribute, value):
    if value < 1:
        raise ValueError(f"must be >= 1 (got {value!r})")


@attrs.frozen(kw_only=True)
class Config:
    #: slices of the expert's range; each micro-batch draws in the next ones
    slices: int = attrs.field(default=8, validator=_at_least_one)


def stratified(lo: float, hi: float, slots: torch.Tensor, slices: int, generator: torch.Generator) -> torch.Tensor:
    """One draw inside each slice ``slots[i]`` of [lo, hi)."""
    u = torch.rand(len(slots), generator=generator, dtype=torch.float64)
    t = (lo + (hi - lo) * (slots.double() + u) / slices).float()
    below_hi = torch.nextafter(torch.tensor(hi), torch.tensor(lo))  # float32 rounding must not reach the other expert
    return torch.minimum(t, below_hi)


class Plugin:
    def __init__(self, config: Config):
        self.config = config

    @hookimpl
    def sample_timesteps(self, run, expert, batch_size, generator):
        lo, hi = run.expert_range(expert)
        slots = torch.randperm(self.config.slices, generator=generator)
        slots = slots.repeat(-(-batch_size // self.config.slices))[:batch_size]
        return stratified(lo, hi, slots, self.config.slices, generator)
