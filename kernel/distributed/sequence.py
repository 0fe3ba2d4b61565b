"""``[distributed] sequence_parallel = S``: each clip's video tokens split over
S processes with diffusers' context parallelism for the Wan transformer
(``ContextParallelConfig(ulysses_degree=S)``, its ``_cp_plan``).

Ulysses attention: every rank projects q/k/v for its part of the tokens, an
all-to-all gives each rank all tokens for ``heads / S`` heads, attention
runs, and a second all-to-all brings the tokens back; the output is
gathered before the loss, so every rank of a group computes the same loss.
Each rank's LoRA gradient then covers its own tokens: the group's gradients
are summed (:func:`wantrain.distributed.step.reduce_step`). Checked against
one process: forward identical, summed LoRA gradients within 3.4e-7
(relative, fp32; docs/distributed.md). Ring attention needs flash-attention
kernels that return the log-sum-exp (GPU only) and is not offered.

The processes of one group are consecutive ranks; they take the same share
of each global batch (``data_rank``) and draw the same noise.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import ProfileProblem, WantrainError
from . import data_world

_MESH = None


def mesh(degree: int, device: torch.device):
    """The ("ring", "ulysses") mesh of this process's group (made once; every rank calls this in the same order)."""
    global _MESH
    if _MESH is None:
        from torch.distributed.device_mesh import init_device_mesh

        full = init_device_mesh(device.type, (data_world(), 1, degree), mesh_dim_names=("data", "ring", "ulysses"))
        _MESH = full["ring", "ulysses"]
    return _MESH


@contextlib.contextmanager
def _accelerator_count_at_least_one() -> Iterator[None]:
    """diffusers 0.42 computes ``rank % torch.accelerator.device_count()``
    while setting up, which divides by zero on a CPU-only machine; the
    device it derives is not used when a mesh is given. GPUs: untouched."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def enable_ulysses(module: torch.nn.Module, degree: int, device: torch.device) -> None:
    """Split ``module``'s attention over ``degree`` processes (in place)."""
    from diffusers import ContextParallelConfig

    heads = module.config.num_attention_heads
    if heads % degree:
        raise WantrainError(ProfileProblem(
            "distributed.sequence_parallel", f"must divide the model's {heads} attention heads", degree,
            f"use a divisor of {heads}"))
    with _accelerator_count_at_least_one():
        module.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh(degree, device)))
