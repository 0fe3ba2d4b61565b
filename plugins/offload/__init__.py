"""Fit two 14B experts on a small card by keeping weights in CPU memory
(``[plugins.offload]``).

Two independent mechanisms:

- ``experts = true`` ("Low VRAM"): only the active expert is on the GPU. The
  other one -- frozen weights, its LoRA adapter and its optimizer state -- is
  parked in pinned CPU memory. At a switch, the old expert is parked in
  ``before_expert_switch`` and the new one brought in ``after_expert_switch``.
  Each expert is parked right after it loads (``after_expert_load``), so the
  GPU never holds two. Frozen weights keep a permanent host copy, so parking
  costs no GPU-to-CPU copy; bringing an expert in is one host-to-device copy.
- ``layers = f`` ("Layer offloading"): a fraction ``f`` of the transformer
  blocks (evenly spaced) keep their frozen weights in pinned CPU memory; a
  block's weights are copied in just before it runs (forward, and the
  recompute of gradient checkpointing in backward) and dropped right after.
  While a block runs, the next streamed block in the same direction is
  prefetched on a side CUDA stream. Needs ``model.gradient_checkpointing``
  (without it autograd keeps every block's weights alive until backward, so
  nothing would be saved). LoRA weights are small and always stay on the GPU.

Previews: ``generate_samples`` is wrapped; while it runs, an expert is
brought in on its first forward call (the other parked), and afterwards the
training placement is restored. The plugin implements ``activate_expert``:
it owns where the experts live, and anything that needs an expert on the
device (the preview sampler) asks through ``run.activate_expert(expert)``.

On a CPU run every move is a no-op (there is nowhere else to put a tensor),
but the choreography runs and is recorded in ``Plugin.placement``
(``{"high_noise": "device" | "host", "high_noise.blocks.3": ...}``) and
``Plugin.history`` (one snapshot per event), which is what the tests check
(tests set ``Plugin.moves_on_cpu = True`` to perform the tensor swaps on
the CPU too).

Events: ``check_profile``, ``after_expert_load``, ``after_adapters_attached``,
``before_expert_switch``, ``after_expert_switch``, ``activate_expert``,
``before_optimizer_step`` (streamed blocks out after backward),
``generate_samples`` (wrapper), ``on_run_end``; ``estimate_memory`` and
``memory_remedies`` for ``wantrain estimate``.

Config keys: ``experts`` (bool, default false), ``layers`` (0.0-1.0, default
0.0), ``pin_memory`` (bool, default true), ``prefetch`` (bool, default true).
See docs/memory.md.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

from wantrain import hookimpl
from wantrain.errors import ProfileProblem
from wantrain.profile import in_range
from wantrain.run import Run

log = logging.getLogger("wantrain.offload")

from .moves import DEVICE, HOST, BlockStreamer, ExpertHome, frozen_slots, put


@attrs.frozen(kw_only=True)
class Config:
    experts: bool = False
    layers: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))
    pin_memory: bool = True
    prefetch: bool = True


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    from wantrain.archs import get as get_arch

    if config.experts and get_arch(profile.model.arch).single_expert:
        return [ProfileProblem("plugins.offload.experts", f"{profile.model.arch} has one expert: there is no idle one to park",
                               True, "set experts = false (layers = 0.5 streams blocks instead)")]
    if config.layers > 0 and not profile.model.gradient_checkpointing:
        return [ProfileProblem("plugins.offload.layers", "layer offloading needs model.gradient_checkpointing = true",
                               config.layers, "set [model] gradient_checkpointing = true, or layers = 0.0")]
    return []


def streamed_blocks(num_blocks: int, fraction: float) -> list[int]:
    """Evenly spaced indices of ``round(fraction * num_blocks)`` blocks."""
    k = round(fraction * num_blocks)
    if k <= 0:
        return []
    return sorted({min(num_blocks - 1, int((j + 0.5) * num_blocks / k)) for j in range(k)})


# ---------------------------------------------------------------- the plugin


class Plugin:
    #: perform the tensor swaps on a CPU run too (tests; a CPU has nowhere else to put a tensor)
    moves_on_cpu = False

    def __init__(self, config: Config):
        self.config = config
        self.homes: dict[str, ExpertHome] = {}
        self.streamers: dict[str, BlockStreamer] = {}
        #: where each expert (and each streamed block) is now: "device" / "host"
        self.placement: dict[str, str] = {}
        #: (event, expert or None, copy of placement) after each handled event
        self.history: list[tuple[str, Any, dict[str, str]]] = []
        self.device = torch.device("cpu")

    # ------------------------------------------------------------ helpers

    def _real(self, run) -> bool:
        return run.device.type != "cpu" or self.moves_on_cpu

    def _home(self, run, expert: str) -> ExpertHome:
        if expert not in self.homes:
            module = run.experts[expert]
            home = ExpertHome(expert, module, self.config.pin_memory, self._real(run))
            n = len(getattr(module, "blocks", []))
            home.streamed = set(streamed_blocks(n, self.config.layers))
            home.index_blocks()
            self.homes[expert] = home
        return self.homes[expert]

    def _note(self, event: str, expert) -> None:
        self.history.append((event, expert, dict(self.placement)))

    def park(self, run, expert: str) -> None:
        self._home(run, expert).park(torch.device("cpu"), run.optimizer)
        self.placement[expert] = HOST
        if expert in self.streamers:
            self.streamers[expert].reset()

    def bring(self, run, expert: str) -> None:
        self._home(run, expert).bring(run.device, run.optimizer)
        self.placement[expert] = DEVICE

    def activate(self, run, expert: str) -> None:
        """``expert`` on the device, every other expert parked."""
        if not self.config.experts:
            return
        for other in list(run.experts):
            if other != expert and self.placement.get(other) == DEVICE:
                self.park(run, other)
        if self.placement.get(expert) != DEVICE:
            self.bring(run, expert)

    def _stream(self, run, expert: str) -> None:
        home = self._home(run, expert)
        if not home.streamed or expert in self.streamers:
            return
        if self.placement.get(expert) != HOST:  # on the device: drop the streamed blocks' copies now
            for i in home.streamed:
                for owner, slot, kind in home.block_slots(i):
                    if home.real:
                        put(owner, slot, kind, home.host(owner, slot))
        for i in home.streamed:
            self.placement[f"{expert}.blocks.{i}"] = HOST
        self.streamers[expert] = BlockStreamer(home, run.device, self.placement, self.config.prefetch)

    # ------------------------------------------------------------ events

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @property
    def active(self) -> bool:
        return self.config.experts or self.config.layers > 0

    @hookimpl
    def after_expert_load(self, run: Run, expert):
        self.device = run.device
        self.placement[expert] = DEVICE  # the kernel put it there
        if self.config.experts:
            self.park(run, expert)
        self._note("after_expert_load", expert)

    @hookimpl
    def after_adapters_attached(self, run: Run):
        for expert in run.experts if self.active else ():
            # host copies of LoRA-wrapped modules are indexed again: peft
            # inserted wrappers, the frozen tensors are the same objects
            home = self._home(run, expert)
            home.slots = frozen_slots(home.module)
            home.index_blocks()
            if self.config.experts:
                self.park(run, expert)  # the adapters peft just made go to the host too
            self._stream(run, expert)
        self._note("after_adapters_attached", None)

    @hookimpl
    def before_expert_switch(self, run: Run, old, new):
        if self.config.experts and old is not None and old != new:
            self.park(run, old)
        for streamer in self.streamers.values():
            streamer.reset()
        self._note("before_expert_switch", old)

    @hookimpl
    def after_expert_switch(self, run: Run, new):
        if self.config.experts:
            self.activate(run, new)
        self._note("after_expert_switch", new)

    @hookimpl
    def activate_expert(self, run: Run, expert):
        self.activate(run, expert)  # without experts = true they never leave the device
        return True

    @hookimpl
    def estimate_memory(self):
        return {"idle_expert_on_host": self.config.experts, "streamed_layers": self.config.layers,
                "note": f"experts={str(self.config.experts).lower()}, layers={self.config.layers:g}"}

    @hookimpl
    def before_optimizer_step(self, run: Run):
        # backward is complete: no streamed block is needed until the next forward
        for streamer in self.streamers.values():
            streamer.reset()

    @hookimpl(wrapper=True)
    def generate_samples(self, run: Run, step):
        if not self.config.experts:
            return (yield)
        training = run.active_expert
        handles = [m.register_forward_pre_hook(self._on_demand(run, name)) for name, m in run.experts.items()]
        try:
            return (yield)
        finally:
            for h in handles:
                h.remove()
            if training is not None:
                self.activate(run, training)
            self._note("generate_samples", training)

    def _on_demand(self, run, expert: str):
        def hook(module, args):
            if self.placement.get(expert) != DEVICE:
                self.activate(run, expert)
        return hook

    @hookimpl
    def on_run_end(self, run: Run):
        for streamer in self.streamers.values():
            streamer.remove()


@hookimpl
def memory_remedies(memory):
    """Offered to any run that does not fit: park the idle expert, then stream
    ever more of the blocks (gradient checkpointing on)."""
    from wantrain.commands.estimate import Remedy

    out = []
    if not memory.idle_expert_on_host and memory.experts > 1:  # a one-expert arch has no idle expert
        out.append(Remedy(40, "[plugins.offload] experts = true", {"idle_expert_on_host": True}))
    for layers in (0.25, 0.5, 0.75, 1.0):
        if layers > memory.streamed_layers:
            out.append(Remedy(50, f"[plugins.offload] layers = {layers}", {"streamed_layers": layers, "checkpointing": True}, quiet=True))
    return out
