"""Which Wan 2.2 experts train, and how they take turns (``[plugins.multistage]``).

Wan 2.2 A14B denoises with two experts: the high-noise one (``transformer``,
t >= boundary * 1000) and the low-noise one (``transformer_2``, below). This
plugin decides

- which experts are trained (``high_noise``, ``low_noise``): only those get
  LoRA adapters and optimizer state, and an expert that is not trained is not
  loaded for training at all (a preview plugin may still load it through
  ``run.require_expert``);
- how long one expert trains before the other takes over: ``switch_every``
  counts **optimizer steps**. Every micro-batch of one optimizer step
  (``[training] gradient_accumulation``) trains the same expert, so with
  ``switch_every = 10`` and ``gradient_accumulation = 4`` an expert sees 40
  micro-batches per turn. The high-noise expert goes first;
- the routing boundary (``boundary``; default: the model's ``boundary_ratio``,
  0.875 for Wan 2.2 T2V), which sets each expert's timestep range.

Events: ``check_profile``, ``trained_experts``, ``after_adapters_attached``
(applies ``boundary``), ``select_expert``, ``state_dict`` /
``load_state_dict`` (the turn position, for resume), ``estimate_memory``
(how many experts carry a LoRA and optimizer state). The kernel fires
``before_expert_switch`` / ``after_expert_switch`` whenever the answer of
``select_expert`` changes.

Resume: the position is ``{"expert", "since"}`` (the expert of the current
turn and the step it began). Without saved state the position is derived
from the step (``(step // switch_every) % n``), which is what an
uninterrupted run does, so resuming is exact either way.
"""

from __future__ import annotations

import logging

import attrs

from wantrain import hookimpl
from wantrain.errors import ProfileProblem
from wantrain.profile import in_range, positive
from wantrain.run import Run

log = logging.getLogger("wantrain.multistage")

EXPERTS = ("high_noise", "low_noise")


@attrs.frozen(kw_only=True)
class Config:
    #: train the high-noise expert (composition, motion)
    high_noise: bool = True
    #: train the low-noise expert (detail, texture, identity)
    low_noise: bool = True
    #: optimizer steps one expert trains before the other takes over
    switch_every: int = attrs.field(default=10, validator=positive)
    #: routing boundary as a fraction of t = 1000; None = the model's boundary_ratio
    boundary: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(in_range(0.0, 1.0, lo_open=True, hi_open=True))
    )

    @property
    def experts(self) -> list[str]:
        return [e for e in EXPERTS if getattr(self, e)]


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    if not config.experts:
        return [ProfileProblem("plugins.multistage", "trains no expert (high_noise and low_noise are both false)",
                               fix="set high_noise = true or low_noise = true")]
    return []


@attrs.define
class Position:
    """The current turn: which expert, and the optimizer step it began at."""

    expert: str | None = None
    since: int = 0


def expert_at(experts: list[str], switch_every: int, step: int) -> str:
    """The expert an uninterrupted run trains at ``step``."""
    return experts[(step // switch_every) % len(experts)]


def advance(position: Position, experts: list[str], switch_every: int, step: int) -> str:
    """The expert for ``step``; moves ``position`` on when the turn is over.

    Asking twice for the same step gives the same answer."""
    if position.expert not in experts or step < position.since:
        position.expert = expert_at(experts, switch_every, step)
        position.since = step - step % switch_every
    elif step - position.since >= switch_every:
        position.expert = experts[(experts.index(position.expert) + 1) % len(experts)]
        position.since = step
    return position.expert


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.position = Position()

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @hookimpl
    def trained_experts(self, profile):
        return self.config.experts

    @hookimpl
    def estimate_memory(self):
        trained = self.config.experts
        what = f"one expert trained ({trained[0]}): one LoRA + optimizer state" if len(trained) == 1 else \
            f"both experts trained, switching every {self.config.switch_every} steps"
        return {"experts_trained": len(trained), "note": what}

    @hookimpl
    def after_adapters_attached(self, run: Run):
        if self.config.boundary is not None and self.config.boundary != run.boundary:
            log.info("multistage: boundary %.4g (the model says %.4g)", self.config.boundary, run.boundary)
            run.boundary = self.config.boundary

    @hookimpl
    def select_expert(self, run: Run, step):
        return advance(self.position, self.config.experts, self.config.switch_every, step)

    @hookimpl
    def state_dict(self):
        return {"expert": self.position.expert, "since": self.position.since}

    @hookimpl
    def load_state_dict(self, state):
        self.position = Position(expert=state.get("expert"), since=int(state.get("since", 0)))
