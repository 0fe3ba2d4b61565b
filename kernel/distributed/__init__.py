"""Several processes, one run: ``torchrun`` + ``torch.distributed`` (docs/distributed.md).

A run started by ``torchrun`` (or ``wantrain run --nproc N``, which execs it)
finds ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` in its environment;
:func:`wantrain.distributed.launch.session` joins the process group (nccl on
GPUs, gloo on CPUs, the ``[distributed] timeout_minutes`` on every
collective). Without that environment nothing here does anything: one
process trains exactly as before, byte for byte.

What the processes share, and how (each in its own module):

* ``data``  -- the global batch: every rank plans the same global sequence of
  batches of ``training.batch_size x world_size`` items and takes its own
  slice; timesteps and noise are drawn for the whole global batch on every
  rank (same generator, same draws) and sliced, so N processes train like
  one process with N times the batch;
* ``step``  -- after backward, the LoRA gradients of the active expert (and
  the step's loss figures) are averaged with one ``all_reduce``; the stop
  decision (SIGTERM, a plugin) is agreed on by every rank before each step;
  rank 0 picks the checkpoint to resume and the lineage, the others follow;
* ``fsdp``  -- ``[distributed] strategy = "fsdp"``: each expert's frozen
  weights sharded per transformer block with ``fully_shard``; the LoRA
  weights stay whole on every rank (``ignored_params``), so gradients,
  optimizer and saving are the same as data parallel;
* ``sequence`` -- ``[distributed] sequence_parallel = S``: groups of S
  consecutive ranks split each clip's tokens (diffusers' Ulysses context
  parallelism); a group takes one share of the batch, its gradients are
  summed;
* ``hooks`` -- the kernel's own hooks for a distributed run (sharding,
  sequence parallelism, the effective-batch line, checks that need the plugins);
* ``launch`` -- process group set-up, ``--nproc`` and failure handling.

Rank 0 alone writes files (LoRA, checkpoints, ``profile.toml``) and logs at
info level; plugins that write read ``run.rank`` (docs/hooks.md).
"""

from __future__ import annotations

import os

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether this process trains together with others (a process group of 2+)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when alone)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes train together (1 when alone)."""
    return dist.get_world_size() if is_distributed() else 1


#: ``[distributed] sequence_parallel`` of the running job (set by ``launch.session``)
_sequence_parallel = 1


def sequence_parallel() -> int:
    """Processes that split one clip's tokens (1: none)."""
    return _sequence_parallel if is_distributed() else 1


def data_rank() -> int:
    """Which share of each global batch this process takes: processes of
    one sequence-parallel group (consecutive ranks) take the same share."""
    return rank() // sequence_parallel()


def data_world() -> int:
    """How many shares each global batch is cut into."""
    return world_size() // sequence_parallel()


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not started by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def expert_device(run):
    """Where a freshly loaded expert goes: the run's device, or -- when its
    frozen weights are to be sharded (``strategy = "fsdp"``) -- the host,
    from which ``fully_shard`` moves each rank's shards to the device."""
    sharded = is_distributed() and run.profile.distributed.strategy == "fsdp"
    return "cpu" if sharded else run.device


def barrier() -> None:
    """Wait for every rank (nothing when alone)."""
    if is_distributed():
        dist.barrier()


def broadcast(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` when alone)."""
    if not is_distributed():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def my_share(items: list) -> list:
    """This rank's part of work every rank lists the same way (every
    ``world_size``-th item from its rank; all of it when alone)."""
    return list(items)[rank()::world_size()] if is_distributed() else list(items)


def merged(items: list) -> list:
    """Every rank's ``items`` joined in rank order, repeats dropped (a barrier
    too); ``items`` as they are when alone."""
    if not is_distributed():
        return items
    return list(dict.fromkeys(x for part in all_gather(list(items)) for x in part))
