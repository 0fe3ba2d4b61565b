"""Planning: which units, with which random choices, in which order.

A deterministic planner, no global RNG: every choice comes from a ``numpy``
seed sequence keyed by (seed, purpose, dataset, epoch, batch, slot). Per batch
it picks a dataset by ``weight`` (:func:`pick_dataset`), takes the next batch
of that dataset's shuffled epoch (:func:`plan_epoch`: one bucket, one frame
count) and draws each sample's choices (:func:`draw_sample`: "fps" window,
flips, caption dropout). The position is a small JSON dict
(:func:`_start_state`), so a run resumes mid-epoch.
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence

import attrs
import numpy as np

from ..profile import DatasetConfig
from .scan import ScannedDataset

STATE_VERSION = 1
# seed-sequence purposes (changing one changes every run's data order)
_ORDER, _SAMPLE, _MIX = 1, 2, 3


@attrs.frozen
class Draw:
    """One sample's random choices."""

    window: float  # [0, 1): which "fps" window
    flip_x: bool
    flip_y: bool
    drop_caption: bool


def _seed(seed: int) -> int:
    return seed % (1 << 64)  # seed sequences take non-negative integers


def draw_sample(seed: int, dataset: int, epoch: int, batch: int, slot: int, cfg: DatasetConfig) -> Draw:
    u = np.random.default_rng([_seed(seed), _SAMPLE, dataset, epoch, batch, slot]).random(4)
    return Draw(window=float(u[0]), flip_x=bool(cfg.flip_x and u[1] < 0.5), flip_y=bool(cfg.flip_y and u[2] < 0.5),
                drop_caption=bool(u[3] < cfg.caption_dropout))


def plan_epoch(ds: ScannedDataset, seed: int, epoch: int, batch_size: int) -> list[tuple[int, ...]]:
    """The batches (unit ids) of one epoch of ``ds``: each unit ``repeats``
    times, shuffled within its (bucket, frames) group, cut into batches of
    ``batch_size`` (a group's last batch may be smaller), batches shuffled.
    Each repeat is shuffled on its own, so copies of an item rarely share a batch."""
    rng = np.random.default_rng([_seed(seed), _ORDER, ds.index, epoch])
    batches: list[tuple[int, ...]] = []
    for group in ds.groups:
        ids = np.concatenate([rng.permutation(np.array(group)) for _ in range(ds.config.repeats)])
        batches += [tuple(int(u) for u in ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def pick_dataset(seed: int, step: int, weights: Sequence[float]) -> int:
    """Which dataset batch number ``step`` comes from (probability ~ weight)."""
    if len(weights) == 1:
        return 0
    u = np.random.default_rng([_seed(seed), _MIX, step]).random()
    cumulative = np.cumsum(weights) / float(sum(weights))
    return min(int(np.searchsorted(cumulative, u, side="right")), len(weights) - 1)


@attrs.frozen
class BatchPlan:
    dataset: int
    epoch: int
    number: int
    units: tuple[int, ...]
    draws: tuple[Draw, ...]
    state_after: dict  # the position once this batch is consumed
    #: data parallel: this rank's part of the global batch (``wantrain.distributed.data.Share``); None alone
    share: tuple[int, int, float] | None = None


def _start_state(count: int, batch_size: int) -> dict:
    return {"version": STATE_VERSION, "batch_size": batch_size, "step": 0, "datasets": [{"epoch": 0, "cursor": 0} for _ in range(count)]}


class Planner:
    """An endless, deterministic stream of :class:`BatchPlan` from a position."""

    def __init__(self, datasets: Sequence[ScannedDataset], seed: int, state: dict):
        self.datasets, self.seed = datasets, seed
        self.state = json.loads(json.dumps(state))  # a private copy
        self._epochs: dict[tuple[int, int], list[tuple[int, ...]]] = {}

    def _epoch(self, d: int, epoch: int) -> list[tuple[int, ...]]:
        key = (d, epoch)
        if key not in self._epochs:
            self._epochs = {k: v for k, v in self._epochs.items() if k[0] != d}
            self._epochs[key] = plan_epoch(self.datasets[d], self.seed, epoch, self.state["batch_size"])
        return self._epochs[key]

    def next_plan(self) -> BatchPlan:
        weights = [ds.config.weight for ds in self.datasets]
        d = pick_dataset(self.seed, self.state["step"], weights)
        pos = self.state["datasets"][d]
        if pos["cursor"] >= len(self._epoch(d, pos["epoch"])):
            pos["epoch"], pos["cursor"] = pos["epoch"] + 1, 0
        epoch, number = pos["epoch"], pos["cursor"]
        units = self._epoch(d, epoch)[number]
        cfg = self.datasets[d].config
        draws = tuple(draw_sample(self.seed, d, epoch, number, slot, cfg) for slot in range(len(units)))
        pos["cursor"] += 1
        self.state["step"] += 1
        return BatchPlan(dataset=d, epoch=epoch, number=number, units=units, draws=draws, state_after=json.loads(json.dumps(self.state)))

    def __iter__(self) -> Iterator[BatchPlan]:
        while True:
            yield self.next_plan()
