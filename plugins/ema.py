"""Exponential moving average of the LoRA weights (``[plugins.ema]``).

Keeps a shadow copy (fp32) of every trained expert's LoRA weights::

    shadow = decay * shadow + (1 - decay) * weights

updated after every ``update_every``-th optimizer step *of that expert*: with
``[plugins.multistage]`` only the expert that just stepped is averaged, so an
expert's EMA horizon (about ``update_every / (1 - decay)`` of its own steps)
does not depend on how often it gets its turn.

Around saving (``write_lora``) and previews (``generate_samples``) the shadow
is swapped into the model by one wrapper each (try/finally: the raw weights
are always restored, also when saving or rendering fails):

- ``save = "ema"``: the LoRA files hold the EMA weights;
- ``save = "raw"``: the LoRA files hold the raw weights (EMA only for previews
  and resume);
- ``save = "both"``: the usual files hold the EMA weights and a second set
  with ``_raw`` before the extension holds the raw ones
  (``job_000000500_high_noise_raw.safetensors``); ``on_save`` gets them under
  ``"<expert>_raw"``.

``sample_with = "ema" | "raw"`` picks the weights previews use.

``device = "host" | "device"`` is where the shadow lives. ``"host"`` (the
default, right for 24 GB cards) keeps it in CPU memory, never on the card (a
rank-32 shadow of one A14B expert is ~0.6 GB in fp32); each update copies the
stepped expert's LoRA weights over (~0.3 GB in bf16 per update).
``"device"`` keeps it beside the weights: no copies, costs its size in VRAM. Either works with
``[plugins.offload] experts = true``, which moves the LoRA weights between
host and device: the update brings what it needs to the shadow.

Resume: ``state_dict`` returns the shadow tensors (by LoRA parameter name)
and the per-expert update counts; ``load_state_dict`` puts them back.

Export: ``wantrain export --ema checkpoints/step_N`` writes a checkpoint's
shadow instead of its raw weights -- this module adds the ``--ema`` option
(``add_commands``) and hands the shadow out of the saved state
(``checkpoint_weights``), both module-level: they work whether or not a
profile enables the plugin.

Events: ``after_adapters_attached`` (shadow = initial weights),
``after_optimizer_step`` (update), ``write_lora`` and ``generate_samples``
(wrappers), ``state_dict`` / ``load_state_dict``; module-level
``add_commands`` and ``checkpoint_weights``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import attrs
import torch

from wantrain import hookimpl
from wantrain.profile import in_range, one_of, positive

log = logging.getLogger("wantrain.ema")


@attrs.frozen(kw_only=True)
class Config:
    #: weight of the old average at each update
    decay: float = attrs.field(default=0.999, validator=in_range(0.0, 1.0, hi_open=True))
    #: update after every N-th optimizer step of an expert
    update_every: int = attrs.field(default=1, validator=positive)
    #: which weights the LoRA files hold
    save: str = attrs.field(default="ema", validator=one_of("ema", "raw", "both"))
    #: which weights previews use
    sample_with: str = attrs.field(default="ema", validator=one_of("ema", "raw"))
    #: where the shadow lives: "host" (CPU memory, default) or "device" (beside the weights)
    device: str = attrs.field(default="host", validator=one_of("host", "device"))


def named_lora_parameters(run) -> dict[str, dict[str, torch.nn.Parameter]]:
    """``{expert: {parameter name: parameter}}`` for the trained LoRA weights."""
    out = {}
    for expert in run.trained:
        wanted = {id(p) for p in run.lora_parameters[expert]}
        out[expert] = {n: p for n, p in run.experts[expert].named_parameters() if id(p) in wanted}
    return out


class Shadow:
    """The averaged copy of the LoRA weights, per expert."""

    def __init__(self, params: dict[str, dict[str, torch.nn.Parameter]], device: torch.device | None = None):
        self.params = params
        self.device = device  # None: beside each weight as it is now
        self.tensors = {e: {n: self._here(p).float().clone() for n, p in ps.items()} for e, ps in params.items()}
        self.updates = {e: 0 for e in params}
        self.steps = {e: 0 for e in params}

    @torch.no_grad()
    def step(self, expert: str, decay: float, update_every: int) -> bool:
        """One optimizer step of ``expert`` happened; average it in when due."""
        self.steps[expert] += 1
        if self.steps[expert] % update_every:
            return False
        for name, param in self.params[expert].items():
            self.tensors[expert][name].lerp_(self._here(param).float(), 1.0 - decay)
        self.updates[expert] += 1
        return True

    def _here(self, param: torch.Tensor) -> torch.Tensor:
        """``param`` on the shadow's device (the LoRA weights move between host
        and device with offload). Host-bound copies block: a non-blocking
        device-to-host copy may be read before it lands."""
        t = param.detach()
        if self.device is None or t.device == self.device:
            return t
        return t.to(self.device, non_blocking=self.device.type != "cpu")

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the shadow weights inside the block, the raw ones after."""
        raw = {e: {n: p.detach().clone() for n, p in ps.items()} for e, ps in self.params.items()}
        try:
            with torch.no_grad():
                for e, ps in self.params.items():
                    for n, p in ps.items():
                        p.copy_(self.tensors[e][n])
            yield
        finally:
            with torch.no_grad():
                for e, ps in self.params.items():
                    for n, p in ps.items():
                        p.copy_(raw[e][n])

    def state(self) -> dict:
        return {
            "shadow": {e: {n: t.clone() for n, t in ts.items()} for e, ts in self.tensors.items()},
            "updates": dict(self.updates),
            "steps": dict(self.steps),
        }

    def load(self, state: dict) -> None:
        for expert, tensors in state.get("shadow", {}).items():
            if expert not in self.tensors:
                log.warning("ema: the resume state has a shadow for %s, which this run does not train; ignored", expert)
                continue
            mine = self.tensors[expert]
            if set(tensors) != set(mine):
                raise ValueError(f"ema: the resume state's {expert} shadow does not match this run's LoRA "
                                 f"(different rank or target modules?)")
            for name, tensor in tensors.items():
                if tensor.shape != mine[name].shape:
                    raise ValueError(f"ema: {name} has shape {tuple(tensor.shape)} in the resume state, "
                                     f"{tuple(mine[name].shape)} here")
                mine[name].copy_(tensor.float())
        self.updates.update({e: int(v) for e, v in state.get("updates", {}).items() if e in self.updates})
        self.steps.update({e: int(v) for e, v in state.get("steps", {}).items() if e in self.steps})


def raw_name(path: str) -> Path:
    p = Path(path)
    return p.with_name(f"{p.stem}_raw{p.suffix}")


def write_raw_copies(run, step, folder: str, dtype: str | None = None) -> dict[str, str]:
    """The raw weights under ``<usual name>_raw.safetensors`` (kernel writer, then renamed)."""
    from wantrain.run import write_lora_pair

    staging = Path(folder) / f".ema_raw_{os.getpid()}"
    try:
        written = write_lora_pair(run, step, staging, dtype)
        out = {}
        for expert, path in written.items():
            target = raw_name(str(Path(folder) / Path(path).name))
            os.replace(path, target)
            out[f"{expert}_raw"] = str(target)
        return out
    finally:
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()


def shadow_weights(states) -> dict[str, dict[str, torch.Tensor]] | None:
    """The shadow a checkpoint holds (``states``: plugin states by registered
    name; this plugin's entry preferred), in the kernel's LoRA names
    (``blocks.1.ffn.net.2.lora_B.weight``: peft's ``.default`` removed)."""
    candidates = [states.get("ema"), *states.values()]
    for entry in candidates:
        if isinstance(entry, dict) and isinstance(entry.get("shadow"), dict):
            return {expert: {re.sub(r"\.default(?=\.weight$)", "", name): t for name, t in tensors.items()}
                    for expert, tensors in entry["shadow"].items()}
    return None


@hookimpl
def checkpoint_weights(states, variant):
    """``wantrain export --ema``: the shadow of a checkpoint."""
    return shadow_weights(states) if variant == "ema" else None


@hookimpl
def add_commands(subparsers, commands):
    """``--ema`` for ``wantrain export``."""
    if "export" in commands:
        commands["export"].add_argument("--ema", dest="variant", action="store_const", const="ema",
                                        help="export the checkpoint's EMA weights (checkpoint folders only)")


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.shadow: Shadow | None = None

    @hookimpl
    def after_adapters_attached(self, run):
        device = torch.device("cpu") if self.config.device == "host" else run.device
        self.shadow = Shadow(named_lora_parameters(run), device)

    @hookimpl
    def after_optimizer_step(self, run):
        self.shadow.step(run.active_expert, self.config.decay, self.config.update_every)

    @hookimpl(wrapper=True)
    def write_lora(self, run, step, folder, dtype):
        if self.shadow is None or self.config.save == "raw":
            return (yield)
        with self.shadow.swapped_in():
            paths = yield
        if self.config.save == "both" and paths:
            paths = {**paths, **write_raw_copies(run, step, folder, dtype)}
        return paths

    @hookimpl(wrapper=True)
    def generate_samples(self, run, step):
        if self.shadow is None or self.config.sample_with == "raw":
            return (yield)
        with self.shadow.swapped_in():
            return (yield)

    @hookimpl
    def state_dict(self):
        return self.shadow.state() if self.shadow is not None else None

    @hookimpl
    def load_state_dict(self, state):
        if self.shadow is not None:
            self.shadow.load(state)
