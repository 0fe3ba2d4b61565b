"""Each rank's share of a global batch, and the draws that go with it.

Every rank plans the same global sequence of batches (``training.batch_size
x world_size`` items each; the order depends on the seed and the global
batch size only, never on the number of processes). Rank ``r`` takes the
items ``[r*b, (r+1)*b)`` of a full global batch. A short global batch (a
bucket's last one) is cut into near-equal contiguous parts; a rank left
without an item runs the first item with weight 0 (it still has to join the
collectives), so it adds nothing to the gradient.

Weights: the one-process loss of a global batch of ``N`` items is the mean
over its items; rank ``r``'s loss is the mean over its ``n_r`` items and is
scaled by ``world * n_r / N`` before backward, so the averaged gradients are
exactly the one-process gradient (full batches have weight 1.0, an exact
no-op).

Timesteps and noise: every rank draws them for all ``N`` items from the same
generator (so the generators stay in step across ranks and with a
one-process run of the global batch) and keeps its own rows.
"""

from __future__ import annotations

import attrs
import torch

#: (first item of this rank in the global batch, the global batch's size, this rank's loss weight)
Share = tuple[int, int, float]


def share_of(total: int, rank: int, world: int) -> tuple[int, int, float]:
    """(start, count, weight) of rank ``rank`` in a global batch of ``total`` items.
    ``count`` 0 means "run item 0 with weight 0"."""
    base, extra = divmod(total, world)
    count = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return start, count, world * count / total


def slice_plan(plan, rank: int, world: int):
    """This rank's part of a global :class:`~wantrain.data.plan.BatchPlan`."""
    if world == 1:
        return plan
    start, count, weight = share_of(len(plan.units), rank, world)
    take = slice(start, start + count) if count else slice(0, 1)
    return attrs.evolve(plan, units=plan.units[take], draws=plan.draws[take],
                        share=(start if count else 0, len(plan.units), weight))


def drawn_rows(batch, local: int) -> int:
    """How many rows of timesteps and noise to draw: the global batch's size
    (``local``, the batch's own size, when alone)."""
    share = getattr(batch, "share", None)
    return share[1] if share else local


def my_rows(batch, values: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's rows of values drawn for the whole global batch (None stays None)."""
    share = getattr(batch, "share", None)
    if not share or values is None:
        return values
    return values[share[0]: share[0] + len(batch)]


def loss_weight(batch) -> float:
    """The factor on this rank's loss that makes averaged gradients equal the
    one-process gradient of the global batch (1.0 when alone or even)."""
    share = getattr(batch, "share", None)
    return share[2] if share else 1.0
