"""Stop the run -- and save it -- when the loss spikes.

A loss far above its running mean usually means the run diverged (lr too
high, a bad batch, fp16 overflow). Continuing wastes GPU hours and may
overwrite good checkpoints through rotation. This plugin sets
``run.stop_requested = True`` in ``on_step`` when the step's loss exceeds
``factor`` times its running mean; the kernel then ends the loop like a
Ctrl-C: it writes a resume checkpoint of the current step and prints the
command that continues.

Use it from a profile (the path is relative to the profile)::

    [plugins]
    enabled = ["checkpoints", "../examples/plugins/loss_spike_alarm.py"]

    [plugins."../examples/plugins/loss_spike_alarm.py"]
    factor = 3.0

Events: ``on_step``; ``state_dict`` / ``load_state_dict`` (the running mean
survives a resume). Keys: see :class:`Config`.
"""

from __future__ import annotations

import logging

import attrs

from wantrain import hookimpl

log = logging.getLogger("wantrain.loss_spike_alarm")


def _positive(instance, attribute, value):
    if not value > 0:
        raise ValueError(f"must be > 0 (got {value!r})")


@attrs.frozen(kw_only=True)
class Config:
    #: stop when loss > factor x running mean
    factor: float = attrs.field(default=3.0, validator=_positive)
    #: steps to watch before the alarm arms (the first losses are noisy)
    warmup: int = 20
    #: weight of the past in the running mean (exponential moving average)
    smoothing: float = 0.9


def is_spike(config: Config, mean: float | None, seen: int, loss: float) -> bool:
    """Whether ``loss`` is a spike, given the running ``mean`` of ``seen`` losses."""
    return mean is not None and seen >= config.warmup and loss > config.factor * mean


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.mean: float | None = None
        self.seen = 0

    @hookimpl
    def on_step(self, run, step, metrics):
        loss = float(metrics["loss"])
        if is_spike(self.config, self.mean, self.seen, loss):
            log.warning("loss %.4f at step %d is over %.1fx its running mean %.4f: stopping and saving",
                        loss, step, self.config.factor, self.mean)
            run.stop_requested = True  # the kernel saves a resume checkpoint of this step and stops
            return
        s = self.config.smoothing
        self.mean = loss if self.mean is None else s * self.mean + (1 - s) * loss
        self.seen += 1

    @hookimpl
    def state_dict(self):
        return {"mean": self.mean, "seen": self.seen}

    @hookimpl
    def load_state_dict(self, state):
        self.mean, self.seen = state["mean"], state["seen"]
