"""What the ranks agree on while training: gradients and loss figures after
each step's backward passes, whether to stop, which checkpoint to resume.

Only the LoRA parameters of the active expert are averaged -- one flat
``all_reduce`` per optimizer step, after gradient accumulation and before
clipping, so clipping, the non-finite check, the optimizer and every plugin
see the same numbers on every rank. No ``DistributedDataParallel`` wrapper:
the two experts take turns, plugins reach into the modules, and a wrapper's
``find_unused_parameters`` / attribute-forwarding problems are exactly what
other trainers trip on; an explicit reduction of the few LoRA tensors costs
the same bytes on the wire.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..errors import DataError, ProfileProblem
from . import broadcast, data_world, is_distributed, rank, world_size

log = logging.getLogger("wantrain")


def _comm_device(run) -> torch.device:
    """Where collective tensors live: the GPU under nccl, the CPU under gloo."""
    return run.device if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_step(run, expert: str, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average the active expert's LoRA gradients and the step's loss
    figures over the ranks (one collective); ``sums`` unchanged when alone.
    With sequence parallelism each rank's gradient covers its part of the
    tokens: they are summed within a group and averaged over the groups."""
    if not is_distributed():
        return sums
    params = run.lora_parameters[expert]
    device = _comm_device(run)
    keys = sorted(sums)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float32)
             for p in params]
    parts.append(torch.stack([torch.as_tensor(sums[k]).detach().reshape(()).to(device, torch.float32) for k in keys]))
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    grads = flat.numel() - len(keys)
    flat[:grads] /= data_world()  # gradients: summed over a sequence-parallel group, averaged over the groups
    flat[grads:] /= world_size()  # loss figures: every rank of a group computed the same ones
    at = 0
    for p in params:
        n = p.numel()
        grad = flat[at: at + n].view_as(p).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = grad.clone()
        else:
            p.grad.copy_(grad)
        at += n
    return {k: flat[at + i] for i, k in enumerate(keys)}


def agree_on_stop(run) -> bool:
    """``run.stop_requested`` as every rank sees it: true once any rank asked
    (SIGINT/SIGTERM reach the ranks at different moments, a plugin may ask on
    one rank only), so all ranks save and stop after the same step. A
    request that arrives during the vote counts in the next one."""
    if not is_distributed():
        return run.stop_requested
    flag = torch.tensor([1.0 if run.stop_requested else 0.0], device=_comm_device(run))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = bool(flag.item())
    if agreed:
        run.stop_requested = True
    return agreed


def open_checkpoint(run, mode: str):
    """Which checkpoint the run continues (``--resume``): rank 0 finds and
    checks it, starts the lineage and writes ``profile.toml`` -- the only rank
    that touches the folder -- and every other rank reads the same checkpoint."""
    from ..formats.outdir import start_lineage
    from ..formats.state import Lineage
    from ..resume import find_checkpoint, read_checkpoint
    from ..run import write_profile
    from .hooks import check_run

    check_run(run)
    ckpt = None
    if rank() == 0:
        ckpt = find_checkpoint(run, mode)  # profile checked against it before any weight loads
        start_lineage(run, ckpt)  # which checkpoints this run continues and rotates
        write_profile(run)  # the run is accepted
    if ckpt is not None or is_distributed():
        where, lineage = broadcast((str(ckpt.path) if ckpt else None, (run.lineage.id, run.lineage.tag,
                                                                          run.lineage.resumed_from)))
        if rank() != 0:
            run.lineage = Lineage(id=lineage[0], tag=lineage[1], resumed_from=lineage[2])
            ckpt = read_checkpoint(where) if where else None
        if ckpt is not None:
            check_world_size(ckpt.state, data_world(), run.profile.training.batch_size)  # sequence groups draw as one
    return ckpt


def check_world_size(state: dict, world: int, batch_size: int) -> None:
    """Resuming under another number of processes continues the same global
    data order only with the same global batch (``training.batch_size`` x
    processes); otherwise one error saying what to set."""
    data = state.get("tree", {}).get("data", {})
    if not isinstance(data, dict) or "batch_size" not in data:
        return
    was, global_batch = int(data.get("world_size", 1)), int(data["batch_size"])
    if was == world or global_batch == batch_size * world:
        return
    fits = (f"training.batch_size = {global_batch // world} (--set training.batch_size={global_batch // world})"
            if global_batch % world == 0 else f"a number of processes that divides {global_batch}")
    raise DataError(ProfileProblem(
        "resume", f"the checkpoint was trained by {was} process(es) with a global batch of {global_batch} "
        f"(training.batch_size x processes); this run has {world} x {batch_size} = {world * batch_size}",
        fix=f"use {fits} to continue the same data order, or start a new run in another job.output_dir"))
