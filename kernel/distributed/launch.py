"""Joining and leaving the process group; ``wantrain run --nproc N``.

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`session` reads them, picks the backend (nccl
when the run trains on CUDA, gloo otherwise), binds each process to the GPU
of its local rank, and sets ``[distributed] timeout_minutes`` on every
collective, so a rank that dies or hangs ends the job instead of stalling it
(torchrun then stops the other ranks and exits non-zero). Ranks other than 0
log warnings and errors only.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from typing import Iterator

import torch
import torch.distributed as dist

from ..errors import ProfileProblem, WantrainError
from .. import distributed
from . import launched_world_size

log = logging.getLogger("wantrain")


def backend_for(profile) -> str:
    """nccl when the run trains on CUDA, gloo on the CPU."""
    device = profile.job.device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def check_launch(profile, world: int) -> list[ProfileProblem]:
    """What cannot work under torchrun, before the group forms (one line each)."""
    problems = []
    if profile.job.device.startswith("cuda:"):
        problems.append(ProfileProblem(
            "job.device", "names one GPU, but each torchrun process uses the GPU of its local rank", profile.job.device,
            'use device = "auto" or "cuda" (pick GPUs with CUDA_VISIBLE_DEVICES)'))
    sp = profile.distributed.sequence_parallel
    if world % sp:
        problems.append(ProfileProblem("distributed.sequence_parallel", f"must divide the number of processes ({world})",
                                       sp, f"use a divisor of {world}, or start a multiple of {sp} processes"))
    if backend_for(profile) == "nccl" and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        problems.append(ProfileProblem(
            "--nproc-per-node", f"asks for more processes than this machine has GPUs ({torch.cuda.device_count()})",
            int(os.environ.get("LOCAL_WORLD_SIZE", world)), "start one process per GPU"))
    return problems


@contextlib.contextmanager
def session(profile) -> Iterator[None]:
    """The process group for the run's life when started by torchrun with
    2+ processes; nothing at all otherwise."""
    world = launched_world_size()
    if world == 1 or dist.is_initialized():
        yield
        return
    problems = check_launch(profile, world)
    if problems:
        raise WantrainError(problems)
    distributed._sequence_parallel = profile.distributed.sequence_parallel
    backend = backend_for(profile)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(minutes=profile.distributed.timeout_minutes)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend, timeout=timeout)
    if dist.get_rank() != 0:
        logging.getLogger("wantrain").setLevel(logging.WARNING)
    try:
        yield
    except Exception as exc:
        if not peer_failed(exc):
            raise
        raise WantrainError(f"rank {dist.get_rank()}: stopped because another process of the job failed "
                            f"(its error is above; torchrun names it)") from None
    finally:
        distributed._sequence_parallel = 1
        with contextlib.suppress(Exception):  # a failed peer may have broken the group already
            dist.destroy_process_group()


def peer_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank died
    (its own error is the one to show; this rank's traceback is noise)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")))


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``wantrain run --nproc N ...`` as the torchrun command it stands for
    (one machine; ``--standalone`` picks a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "wantrain", *argv]


def exec_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process with torchrun (its exit code is the job's)."""
    command = torchrun_command(nproc, argv)
    log.info("starting %d processes: %s", nproc, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
