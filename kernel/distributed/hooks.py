"""The kernel's own hooks for a run of several processes, registered under
``wantrain.distributed`` only when torchrun started 2+ processes (one process
registers nothing, so its run is exactly what it always was)."""

from __future__ import annotations

import logging

import torch.distributed as dist

from .. import hookimpl
from ..errors import ProfileProblem, WantrainError
from . import data_world, is_distributed, rank, sequence_parallel, world_size

log = logging.getLogger("wantrain")

NAME = "wantrain.distributed"


def plugins(profile) -> dict[str, object]:
    """``{NAME: hooks}`` under torchrun with 2+ processes, else nothing."""
    return {NAME: DistributedHooks(profile)} if is_distributed() else {}


def profile_problems(profile) -> list[ProfileProblem]:
    """``[distributed]`` settings this version cannot honour (one line each)."""
    problems = []
    d = profile.distributed
    if d.sequence_parallel > 1 and d.strategy == "fsdp":
        problems.append(ProfileProblem(
            "distributed.sequence_parallel", "cannot be combined with strategy = \"fsdp\" in this version",
            d.sequence_parallel, "use strategy = \"ddp\" with sequence_parallel, or fsdp without it"))
    return problems


def run_problems(run) -> list[ProfileProblem]:
    """Rules that need the plugins: with the base sharded, every rank must
    take part in every forward pass, so previews rendered by rank 0 alone
    during training cannot run."""
    problems = []
    d = run.profile.distributed
    renderers = [i.plugin_name for i in run.pm.hook.generate_samples.get_hookimpls() if not i.wrapper]
    for key, value, on in (("strategy", "fsdp", d.strategy == "fsdp"), ("sequence_parallel", d.sequence_parallel,
                                                                           d.sequence_parallel > 1)):
        if on and renderers:
            problems.append(ProfileProblem(
                f"distributed.{key}", f"cannot render previews during training (plugin {renderers[0]}: rank 0 "
                "renders alone, but a sharded or sequence-parallel expert needs every rank in every forward)", value,
                f"disable {renderers[0]} and render previews afterwards with `wantrain sample`"))
    return problems


class DistributedHooks:
    def __init__(self, profile):
        self.profile = profile

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(profile)

    # tryfirst: shard before `offload` parks the idle expert and `ema` copies the adapters
    @hookimpl(tryfirst=True)
    def after_adapters_attached(self, run):
        if run.profile.distributed.strategy == "fsdp":
            from .fsdp import shard_expert

            for expert in run.trained:
                shard_expert(run.experts[expert], run.lora_parameters[expert], run.device)
            log.info("fsdp: the frozen weights of %s are sharded over %d processes (per block); LoRA weights stay whole",
                     ", ".join(run.trained), world_size())
        if sequence_parallel() > 1:
            from .sequence import enable_ulysses

            for expert in run.trained:
                enable_ulysses(run.experts[expert], sequence_parallel(), run.device)
            log.info("sequence parallel: each clip's tokens split over %d processes (Ulysses attention)", sequence_parallel())

    @hookimpl
    def on_run_start(self, run):
        t = run.profile.training
        sp = sequence_parallel()
        who = f"{world_size()} processes" if sp == 1 else f"{data_world()} group(s) of {sp} sequence-parallel processes"
        log.info("data parallel: %s (%s, %s) x batch_size %d x gradient_accumulation %d = effective batch %d",
                 who, dist.get_backend(), run.profile.distributed.strategy, t.batch_size,
                 t.gradient_accumulation, data_world() * t.batch_size * t.gradient_accumulation)


def check_run(run) -> None:
    """:func:`run_problems` as one error (rank 0, before any weight loads)."""
    problems = run_problems(run) if rank() == 0 and is_distributed() else []
    if problems:
        raise WantrainError(problems)
