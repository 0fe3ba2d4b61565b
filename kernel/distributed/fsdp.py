"""``[distributed] strategy = "fsdp"``: each expert's frozen weights sharded
over the ranks with FSDP2's ``fully_shard``, one unit per transformer block
(plus the root for embeddings and the output head).

The LoRA weights are left out of the sharding (``ignored_params``): they
are small, stay whole on every rank, get their gradients averaged like data
parallel (:func:`wantrain.distributed.step.reduce_step`), and are saved,
restored and exported exactly as in one process -- no gathering of sharded
adapter state on save. Each block's frozen weights are all-gathered for its
forward (and again for backward) and freed after, so a rank holds ``1/N`` of
the base plus one or two blocks in full.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

from ..errors import ProfileProblem, WantrainError


def shard_expert(module: torch.nn.Module, trainable: list[torch.nn.Parameter], device: torch.device) -> torch.nn.Module:
    """Shard ``module`` in place (per block, then the root) from the host
    onto ``device`` (one block whole on the device at a time); ``trainable``
    stay whole and move to ``device`` as they are (same Parameter objects)."""
    keep = set(trainable)
    frozen = [(n, p) for n, p in module.named_parameters() if p not in keep]
    odd = next((n for n, p in frozen if not p.dtype.is_floating_point or type(p) is not torch.nn.Parameter), None)
    if odd is not None:
        raise WantrainError(ProfileProblem(
            "distributed.strategy", f"\"fsdp\" shards bf16/fp16/fp32 weights, but {odd} is quantized or packed",
            "fsdp", "use strategy = \"ddp\" with quantization, or fsdp without it"))
    for block in module.blocks:
        fully_shard(block, ignored_params={p for p in block.parameters() if p in keep})
    fully_shard(module, ignored_params={p for p in module.parameters() if p in keep})
    for p in trainable:
        p.data = p.data.to(device)
    return module
