"""The run object handed to every hook, and the kernel's own hook fallbacks."""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import sys
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pluggy
import torch

from . import flow, hookimpl, lora, model
from .profile import Profile

log = logging.getLogger("wantrain")


@attrs.define
class StepContext:
    """What ``compute_extra_losses`` sees of the current micro-batch."""

    expert: str
    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    text_states: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    loss: torch.Tensor


@attrs.define(eq=False)
class Run:
    """Everything a plugin may read or change during a run.

    Attributes are filled in as the loop progresses: ``experts`` after
    loading, ``lora_parameters`` after attaching, ``optimizer`` before
    ``on_run_start``, ``step`` / ``active_expert`` during the loop.
    """

    profile: Profile
    pm: pluggy.PluginManager
    output_dir: Path
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    boundary: float = 0.875
    source: Any = None  # model.ModelSource
    experts: dict[str, torch.nn.Module] = attrs.Factory(dict)
    trained: list[str] = attrs.Factory(list)
    lora_parameters: dict[str, list[torch.nn.Parameter]] = attrs.Factory(dict)
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    data: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    step: int = 0
    active_expert: str | None = None
    grad_norm: float = 0.0
    last_metrics: dict[str, Any] = attrs.Factory(dict)
    stop_requested: bool = False
    #: free-form space for plugins to publish things to each other (by name)
    extras: dict[str, Any] = attrs.Factory(dict)

    # ------------------------------------------------------------ helpers

    @property
    def name(self) -> str:
        return self.profile.job.name

    def expert_range(self, expert: str) -> tuple[float, float]:
        return flow.expert_range(expert, self.boundary)

    def require_expert(self, expert: str) -> torch.nn.Module:
        """Load an expert that is not trained (e.g. for previews) on first use."""
        if expert not in self.experts:
            load_expert_into(self, expert)
        return self.experts[expert]

    def predict(self, expert: str, noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """The expert's velocity prediction (fp32) for noisy latents at ``timesteps``."""
        module = self.experts[expert]
        out = module(
            hidden_states=noisy.to(self.dtype),
            timestep=timesteps.to(self.device),
            encoder_hidden_states=text_states.to(self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    @contextlib.contextmanager
    def lora_disabled(self, expert: str):
        """The expert as the base model (trained LoRA contributes exactly 0)."""
        with lora.lora_disabled(self.experts[expert]):
            yield self.experts[expert]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.pm.hook.encode_prompts(run=self, prompts=list(prompts))

    def encode_videos(self, batch) -> torch.Tensor:
        return self.pm.hook.encode_videos(run=self, batch=batch)

    def save_lora(self, step: int | None, folder: Path | None = None, dtype: str | None = None) -> dict[str, str]:
        """Write the LoRA pair (``step`` None = final names; ``dtype`` None =
        ``[target] save_dtype``) and fire ``on_save``."""
        paths = self.pm.hook.write_lora(run=self, step=step, folder=str(folder or self.output_dir), dtype=dtype)
        self.pm.hook.on_save(run=self, step=self.step if step is None else step, paths=paths)
        return paths

    def generate_samples(self, step: int) -> list[str]:
        return self.pm.hook.generate_samples(run=self, step=step) or []

    # ------------------------------------------------------------ RNG state

    def rng_state(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def load_expert_into(run: Run, expert: str) -> torch.nn.Module:
    subfolder = model.EXPERT_SUBFOLDERS[expert]
    module = run.pm.hook.load_expert(run=run, expert=expert, subfolder=subfolder)
    module.to(run.device)
    run.experts[expert] = module
    run.pm.hook.after_expert_load(run=run, expert=expert, module=module)
    return module


class CoreHooks:
    """The kernel's fallbacks, registered ``trylast`` under ``wantrain.core``:
    a plugin answering first replaces them; a wrapper can wrap them."""

    @hookimpl(trylast=True)
    def trained_experts(self, profile):
        return list(model.EXPERTS)

    @hookimpl(trylast=True)
    def load_expert(self, run, expert):
        return model.load_expert(run.source, expert, run.dtype)

    @hookimpl(trylast=True)
    def encode_prompts(self, run, prompts):
        return model.encode_text(
            run.tokenizer, run.text_encoder, prompts, run.profile.model.max_sequence_length, run.device, run.dtype
        )

    @hookimpl(trylast=True)
    def encode_videos(self, run, batch):
        return model.encode_pixels(run.vae, batch.pixels).to(run.device)

    @hookimpl(trylast=True)
    def select_expert(self, run, step):
        return run.trained[step % len(run.trained)]

    @hookimpl(trylast=True)
    def sample_timesteps(self, run, expert, batch_size, generator):
        return flow.uniform_timesteps(expert, run.boundary, batch_size, generator)

    @hookimpl(trylast=True)
    def write_lora(self, run, step, folder, dtype):
        return write_lora_pair(run, step, Path(folder), dtype)


def write_lora_pair(run: Run, step: int | None, folder: Path, dtype: str | None = None) -> dict[str, str]:
    """The ComfyUI-layout files of every trained expert, written atomically
    (``dtype``: "bf16" | "fp16" | "fp32"; None = ``[target] save_dtype``)."""
    target = run.profile.target
    dtype = model.DTYPES[dtype or target.save_dtype]
    paths = {}
    for expert in run.trained:
        state = lora.to_comfy(lora.lora_state(run.experts[expert]), target.alpha, dtype)
        meta = lora.metadata(
            profile_toml=run.profile.to_toml(),
            step=step,
            base_model=run.profile.model.name_or_path,
            trigger_word=run.profile.job.trigger_word,
            rank=target.rank,
            alpha=target.alpha,
            expert=expert,
        )
        path = folder / lora.lora_filename(run.name, expert, step)
        paths[expert] = str(lora.write_atomic(state, path, meta))
    return paths
