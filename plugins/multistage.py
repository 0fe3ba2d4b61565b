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
(applies ``boundary``, plans per-expert step counts and ranges), ``on_run_start``
(per-expert lr), ``sample_timesteps`` (wrapper: narrowed ranges), ``select_expert``, ``state_dict`` /
``load_state_dict`` (the turn position, for resume), ``estimate_memory``
(how many experts carry a LoRA and optimizer state). The kernel fires
``before_expert_switch`` / ``after_expert_switch`` whenever the answer of
``select_expert`` changes.

Per-expert settings (``[plugins.multistage.per_expert.<expert>]``, docs/plugins/multistage.md):
``rank`` / ``alpha`` (the expert's own adapter settings, answered through
``expert_target``: its files, checkpoint and resume checks carry them),
``lr`` (the expert's optimizer param group -- the kernel makes one group per
expert -- gets it on ``on_run_start``, after any resume, with the schedule's
base lr), ``steps`` (a count) or ``share`` (a fraction of ``training.steps``)
of optimizer steps, turns still ``switch_every`` long, an expert whose
count is done sitting out; ``t_min`` / ``t_max`` (narrow the expert's
timestep range: a wrapper maps what ``sample_timesteps`` drew in the
expert's range affinely into the narrower one, so any timestep distribution
keeps its shape and its random draws). The narrowed ranges are published as
``run.extras["expert_ranges"]`` (the validation plugin reads them).

Resume: the position is ``{"expert", "since"}`` (the expert of the current
turn and the step it began). Without saved state the position is derived
from the step (``(step // switch_every) % n``), which is what an
uninterrupted run does, so resuming is exact either way.
"""

from __future__ import annotations

import logging

import attrs

from wantrain import hookimpl
from wantrain.errors import ProfileProblem, WantrainError
from wantrain.profile import in_range, positive
from wantrain.run import Run

log = logging.getLogger("wantrain.multistage")

EXPERTS = ("high_noise", "low_noise")


@attrs.frozen(kw_only=True)
class ExpertSettings:
    """``[plugins.multistage.per_expert.<expert>]``."""

    #: this expert's learning rate (default: training.lr)
    lr: float | None = attrs.field(default=None, validator=positive)
    #: optimizer steps this expert trains (a count) ...
    steps: int | None = attrs.field(default=None, validator=positive)
    #: ... or its share of training.steps
    share: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1.0, lo_open=True)))
    #: narrower timestep range within the expert's own, in [0, 1000]
    t_min: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1000.0)))
    t_max: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0.0, 1000.0)))
    #: this expert's adapter rank (default: target.rank)
    rank: int | None = attrs.field(default=None, validator=positive)
    #: this expert's adapter alpha, scale = alpha / rank (default: target.alpha)
    alpha: float | None = attrs.field(default=None, validator=positive)


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
    #: per-expert lr, step count / share and timestep range: {high_noise = {lr = 5e-5, share = 0.4}, ...}
    per_expert: dict[str, ExpertSettings] = attrs.field(factory=dict, hash=False)

    @property
    def experts(self) -> list[str]:
        return [e for e in EXPERTS if getattr(self, e)]


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    from wantrain.archs import get as get_arch

    if get_arch(profile.model.arch).single_expert:
        return [ProfileProblem("plugins.multistage", f"{profile.model.arch} has one expert: there are no stages to switch",
                               profile.model.arch, "remove multistage from [plugins] enabled")]
    if not config.experts:
        return [ProfileProblem("plugins.multistage", "trains no expert (high_noise and low_noise are both false)",
                               fix="set high_noise = true or low_noise = true")]
    out = []
    for expert, s in config.per_expert.items():
        where = f"plugins.multistage.per_expert.{expert}"
        if expert not in EXPERTS:
            out.append(ProfileProblem(where, "is not an expert", expert, "use high_noise or low_noise"))
        elif expert not in config.experts and s != ExpertSettings():
            out.append(ProfileProblem(where, "sets up an expert this run does not train", fix=f"set {expert} = true"))
        try:  # (nested tables' validators do not run while structuring)
            attrs.validate(s)
        except ValueError as exc:
            out.append(ProfileProblem(f"{where}.{getattr(exc, 'field', '')}", getattr(exc, "what", str(exc)),
                                      getattr(exc, "got", None), getattr(exc, "fix", "")))
        if s.steps is not None and s.share is not None:
            out.append(ProfileProblem(where, "sets both steps and share", s.steps, "keep one"))
        if s.t_min is not None and s.t_max is not None and s.t_min >= s.t_max:
            out.append(ProfileProblem(f"{where}.t_min", f"must be below t_max ({s.t_max:g})", s.t_min, "widen the range"))
        out += adapter_problems(s, where, profile)
    counts = quotas(config, profile.training.steps)
    if counts and sum(counts.values()) > profile.training.steps:
        out.append(ProfileProblem("plugins.multistage.per_expert", f"steps/share add up to {sum(counts.values())}, "
                                  f"more than training.steps = {profile.training.steps}", fix="lower them"))
    elif counts and sum(counts.values()) < profile.training.steps and all(
            e in config.per_expert and (config.per_expert[e].steps is not None or config.per_expert[e].share is not None)
            for e in config.experts):
        out.append(ProfileProblem("plugins.multistage.per_expert", f"steps/share of every trained expert add up to "
                                  f"{sum(counts.values())}, fewer than training.steps = {profile.training.steps}",
                                  fix=f"raise them, or set training.steps = {sum(counts.values())}"))
    return out


def adapter_problems(s: ExpertSettings, where: str, profile) -> list[ProfileProblem]:
    """A per-expert ``rank`` / ``alpha`` the adapter type has no use for, or a
    rank wider than the model's layers (read from a local folder)."""
    from wantrain.archs.checks import check_rank

    target = profile.target
    if target.type == "lokr" and target.lokr_full_rank and (s.rank is not None or s.alpha is not None):
        key = "rank" if s.rank is not None else "alpha"
        return [ProfileProblem(f"{where}.{key}", "has no use: LoKr with a full-rank w2 (target.lokr_full_rank) has no "
                               "rank or alpha", getattr(s, key), "remove it, or set target.lokr_full_rank = false")]
    if s.rank is None or not isinstance(s.rank, int):
        return []
    return [ProfileProblem(f"{where}.rank", p.what, p.got, p.fix)
            for p in check_rank(profile.model.name_or_path, s.rank, target.modules)]


def quotas(config: Config, total: int) -> dict[str, int]:
    """Optimizer steps of each trained expert when any ``steps`` / ``share``
    is set ({} otherwise); experts without one share what is left equally."""
    experts = config.experts
    given = {e: s.steps if s.steps is not None else round(s.share * total)
             for e, s in config.per_expert.items() if e in experts and (s.steps is not None or s.share is not None)}
    if not given:
        return {}
    rest = [e for e in experts if e not in given]
    left = max(total - sum(given.values()), 0)
    return {e: given.get(e, left // len(rest) + (i < left % len(rest)) if rest else 0) for i, e in enumerate(experts)}


def quota_schedule(experts: list[str], counts: dict[str, int], switch_every: int, total: int) -> list[str]:
    """The expert of every step: turns of ``switch_every``, each to the expert
    furthest behind its count (then the order); done experts sit out."""
    order, done = [], {e: 0 for e in experts}
    while len(order) < total:
        open_ = [e for e in experts if done[e] < counts[e]] or list(experts)
        expert = min(open_, key=lambda e: (done[e] / max(counts[e], 1), experts.index(e)))
        left = counts[expert] - done[expert]
        n = min(switch_every, total - len(order), left if left > 0 else switch_every)
        order += [expert] * n
        done[expert] += n
    return order


def squeeze(t, lo: float, hi: float, new_lo: float, new_hi: float):
    """``t`` drawn in [lo, hi] mapped affinely into [new_lo, new_hi]."""
    return new_lo + (t - lo) * ((new_hi - new_lo) / (hi - lo))


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
        self.schedule: list[str] = []
        self.ranges: dict[str, tuple[float, float]] = {}

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @hookimpl
    def trained_experts(self, profile):
        return self.config.experts

    @hookimpl
    def estimate_memory(self, profile):
        trained = self.config.experts
        what = f"one expert trained ({trained[0]}): one LoRA + optimizer state" if len(trained) == 1 else \
            f"both experts trained, switching every {self.config.switch_every} steps"
        ranks = [getattr(self.config.per_expert.get(e), "rank", None) for e in trained]
        if any(r is not None for r in ranks):  # each trained expert's LoRA at the widest rank: an upper bound
            return {"experts_trained": len(trained), "rank": max(r or profile.target.rank for r in ranks), "note": what}
        return {"experts_trained": len(trained), "note": what}

    @hookimpl
    def expert_target(self, expert, target):
        s = self.config.per_expert.get(expert)
        if s is None or (s.rank is None and s.alpha is None):
            return None
        return attrs.evolve(target, rank=target.rank if s.rank is None else s.rank,
                            alpha=target.alpha if s.alpha is None else s.alpha)

    @hookimpl
    def after_adapters_attached(self, run: Run):
        if self.config.boundary is not None and self.config.boundary != run.boundary:
            log.info("multistage: boundary %.4g (the model says %.4g)", self.config.boundary, run.boundary)
            run.boundary = self.config.boundary
        counts = quotas(self.config, run.profile.training.steps)
        if counts:
            self.schedule = quota_schedule(self.config.experts, counts, self.config.switch_every, run.profile.training.steps)
            log.info("multistage: steps per expert %s", ", ".join(f"{e} {n}" for e, n in counts.items()))
        for expert, s in self.config.per_expert.items():
            if expert in run.trained and (s.t_min is not None or s.t_max is not None):
                lo, hi = run.expert_range(expert)
                new = (lo if s.t_min is None else s.t_min, hi if s.t_max is None else s.t_max)
                if not lo <= new[0] < new[1] <= hi:
                    raise WantrainError(ProfileProblem(f"plugins.multistage.per_expert.{expert}", f"t_min/t_max {new[0]:g}-"
                                        f"{new[1]:g} leave the expert's range {lo:g}-{hi:g}", fix="narrow them"))
                self.ranges[expert] = new
        if self.ranges:
            run.extras["expert_ranges"] = {e: self.ranges.get(e, run.expert_range(e)) for e in run.trained}

    @hookimpl
    def on_run_start(self, run: Run):
        """Each expert's param group at its own lr, kept across resumes (the
        schedule's base lr and the current lr, as a fresh run would have them)."""
        sched = run.lr_scheduler
        for i, group in enumerate(run.optimizer.param_groups):
            s = self.config.per_expert.get(group.get("expert"))
            if s is None or s.lr is None:
                continue
            group["initial_lr"] = s.lr
            if hasattr(sched, "lr_lambdas"):
                sched.base_lrs[i] = s.lr
                group["lr"] = s.lr * sched.lr_lambdas[i](sched.last_epoch)
                sched._last_lr[i] = group["lr"]
            else:
                group["lr"] = s.lr
            log.info("multistage: %s trains at lr %g", group["expert"], s.lr)

    @hookimpl(wrapper=True)
    def sample_timesteps(self, run: Run, expert, batch_size, generator):
        t = yield
        if t is None or expert not in self.ranges:
            return t
        return squeeze(t, *run.expert_range(expert), *self.ranges[expert])

    @hookimpl
    def select_expert(self, run: Run, step):
        if self.schedule:
            return self.schedule[min(step, len(self.schedule) - 1)]
        return advance(self.position, self.config.experts, self.config.switch_every, step)

    @hookimpl
    def state_dict(self):
        return {"expert": self.position.expert, "since": self.position.since}

    @hookimpl
    def load_state_dict(self, state):
        self.position = Position(expert=state.get("expert"), since=int(state.get("since", 0)))
