"""The run object handed to every hook, the one way to open a run and load
its frozen parts, and the kernel's own hook fallbacks.

Every command that needs plugins goes through :func:`open_run` (profile ->
plugins -> checks -> output folder); every command that needs the model's
frozen parts through :func:`load_frozen` (model index -> text encoder,
handed to ``after_text_encoder_load`` on the host, then moved -> VAE).
``wantrain run`` adds the trained experts, their adapters and the optimizer
(:func:`wantrain.loop.load`)."""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import pluggy
import torch

from . import archs, attention, compilation, distributed, flow, hookimpl, lora, model, optimizers, registry
from .archs.checks import check_arch
from .archs.condition import Condition, assemble, condition_video
from .formats import lora as lora_format
from .formats import sources
from .formats import safetensors as st
from .formats.state import Lineage
from .errors import ProfileError, ProfileProblem
from .profile import Profile

if TYPE_CHECKING:  # pragma: no cover
    from .data import TrainData

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
    #: the start-frame condition (image-to-video archs; an empty Condition otherwise)
    cond: Condition = attrs.Factory(Condition)


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
    #: the training RNG (timesteps, noise); part of the resume state
    generator: torch.Generator
    #: what the model is: experts, boundary, conditioning (``[model] arch``)
    arch: archs.Arch = attrs.Factory(lambda: archs.get(archs.DEFAULT))
    #: t >= boundary * 1000 routes to the high-noise expert
    boundary: float = 0.875
    source: model.ModelSource | None = None
    #: loaded experts by name ("high_noise", "low_noise"; "full" for a one-expert arch)
    experts: dict[str, torch.nn.Module] = attrs.Factory(dict)
    #: the experts that get adapters and optimizer state, in order
    trained: list[str] = attrs.Factory(list)
    lora_parameters: dict[str, list[torch.nn.Parameter]] = attrs.Factory(dict)
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None  # a transformers tokenizer
    data: TrainData | None = None
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    #: completed optimizer steps
    step: int = 0
    active_expert: str | None = None
    #: gradient norm of the last step, before clipping
    grad_norm: float = 0.0
    last_metrics: dict[str, Any] = attrs.Factory(dict)
    #: set by SIGINT/SIGTERM (or a plugin): the loop saves and stops after this step
    stop_requested: bool = False
    #: the chain of checkpoints this run continues (``wantrain.resume.start_lineage``)
    lineage: Lineage = attrs.Factory(Lineage)
    #: steps skipped so far for a nan/inf loss or gradient (``[training] on_nonfinite = "skip"``)
    nonfinite_steps: int = 0
    #: for plugins to publish things to each other (by name); the kernel never reads it
    extras: dict[str, Any] = attrs.Factory(dict)

    # ------------------------------------------------------------ helpers

    @property
    def name(self) -> str:
        return self.profile.job.name

    #: this process's rank under torchrun (0 alone; rank 0 alone writes files) and how many train together
    rank = property(lambda self: distributed.rank())
    world_size = property(lambda self: distributed.world_size())

    def expert_range(self, expert: str) -> tuple[float, float]:
        return flow.expert_range(expert, self.boundary)

    def expert_for(self, t: float) -> str:
        """The expert that denoises at ``t`` (one-expert archs: always it)."""
        return self.arch.expert_for(t, self.boundary)

    def target(self, expert: str):
        """``[target]`` as it applies to ``expert`` (a plugin may give it its own rank / alpha: ``expert_target``)."""
        return self.pm.hook.expert_target(profile=self.profile, expert=expert, target=self.profile.target)

    def require_expert(self, expert: str) -> torch.nn.Module:
        """Load an expert that is not trained (e.g. for previews) on first use."""
        if expert not in self.experts:
            load_expert_into(self, expert)
        return self.experts[expert]

    def predict(self, expert: str, noisy: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor,
                cond: Condition | None = None) -> torch.Tensor:
        """The expert's velocity prediction (fp32) for noisy latents at
        ``timesteps`` ``[B]``; ``cond``: the start-frame condition of an
        image-to-video arch (joined channels, or the clean first frame with
        per-token timesteps)."""
        module = self.experts[expert]
        if cond is not None:
            noisy, timesteps = cond.model_input(noisy), cond.timesteps(timesteps.to(noisy.device), module.config.patch_size)
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

    def activate_expert(self, expert: str) -> None:
        """Have ``expert`` loaded and ready on the device (``activate_expert``)."""
        self.require_expert(expert)
        self.pm.hook.activate_expert(run=self, expert=expert)

    @property
    def experts_placed_by_plugin(self) -> bool:
        """Whether a plugin owns where the experts live (implements
        ``activate_expert``); then no other code moves an expert."""
        return any(i.plugin_name != CORE for i in self.pm.hook.activate_expert.get_hookimpls())

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.pm.hook.encode_prompts(run=self, prompts=list(prompts))

    def encode_videos(self, batch) -> torch.Tensor:
        return self.pm.hook.encode_videos(run=self, batch=batch)

    def encode_condition(self, batch, num_frames: int, use: torch.Tensor | None = None) -> Condition:
        """The batch's start-frame condition on the device for clips of
        ``num_frames`` pixel frames (an empty one for text-to-video archs);
        ``use``: which samples get their start frame (TI2V)."""
        if not self.arch.takes_start_frame:
            return Condition()
        latents = self.pm.hook.encode_condition(run=self, batch=batch).to(self.device, torch.float32)
        return assemble(self.arch, latents, num_frames, self.profile.model.last_frame, use)

    def save_lora(self, step: int | None, folder: Path | None = None, dtype: str | None = None) -> dict[str, str]:
        """Write the LoRA pair (``step`` None = final names; ``dtype`` None =
        ``[target] save_dtype``) and fire ``on_save`` -- on rank 0 alone under torchrun."""
        if self.rank:
            return {}
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
    subfolder = run.arch.subfolders[expert]
    module = run.pm.hook.load_expert(run=run, expert=expert, subfolder=subfolder)
    module.to(distributed.expert_device(run))  # fsdp: stays on the host until sharded, never whole on the GPU
    attention.apply(module, run.profile.model.attention, run.device, run.dtype)  # [model] attention
    compilation.compile_blocks(module, run.profile.training.compile)  # [training] compile: regional
    run.experts[expert] = module
    run.pm.hook.after_expert_load(run=run, expert=expert, module=module)
    return module


CORE = "wantrain.core"


def open_run(profile: Profile, *, purpose: str = "train", extra_plugins: dict[str, Any] | None = None) -> Run:
    """The one way into a run: plugins registered (hook names checked),
    every plugin's ``check_profile`` collected -- all before any weight loads.

    ``purpose``: ``"train"`` also resolves the device and makes the output
    folder (``profile.toml`` is written by :func:`write_profile` once the run
    is accepted: folder locked, checkpoint checked); ``"sample"``
    resolves the device only; ``"inspect"`` (check, plugins, estimate) does
    neither and runs on the CPU. ``extra_plugins`` (name -> plugin) are
    registered after the profile's own (commands that attach things).
    """
    pm = registry.make_plugin_manager(profile, core=CoreHooks(), extra=extra_plugins)
    problems = [p for found in pm.hook.check_profile(profile=profile) for p in (found or [])]
    if purpose in ("train", "inspect"):
        problems += output_dir_problems(Path(profile.job.output_dir))
    if problems:
        raise ProfileError(problems)
    device = model.resolve_device(profile.job.device) if purpose != "inspect" else torch.device("cpu")
    attention.check(profile, device if purpose != "inspect" else None, training=purpose in ("train", "inspect"))
    output_dir = Path(profile.job.output_dir)
    if purpose == "train":
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProfileError(ProfileProblem("job.output_dir", f"cannot be made ({exc.strerror})", str(output_dir),
                                              "give a folder you can write to")) from None
    torch.manual_seed(profile.job.seed)
    generator = torch.Generator("cpu").manual_seed(profile.job.seed)
    arch = archs.get(profile.model.arch)
    return Run(profile=profile, pm=pm, output_dir=output_dir, device=device, arch=arch, boundary=arch.boundary,
               dtype=model.DTYPES[profile.model.dtype], generator=generator)


def output_dir_problems(output_dir: Path) -> list[ProfileProblem]:
    """``job.output_dir`` must be a folder, or a path where one can be made."""
    found = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if found is None or found.is_dir():
        return []
    what = "is a file, not a folder" if found == output_dir else f"lies under {found}, which is a file"
    return [ProfileProblem("job.output_dir", what, str(output_dir), "give a folder (it is made if missing)")]


def write_profile(run: Run) -> None:
    """The resolved ``profile.toml`` in the output folder, for ``wantrain sample``
    and the record -- only for a run that was accepted."""
    st.write_bytes_atomic(run.profile.to_toml().encode("utf-8"), run.output_dir / "profile.toml")


def load_frozen(run: Run) -> None:
    """The model's frozen parts other than the experts: model index and
    boundary, tokenizer and text encoder (handed to ``after_text_encoder_load``
    while still on the host, so a quantized encoder never reaches the device
    in full precision), then the VAE. Experts load on demand
    (:meth:`Run.require_expert`) or in :func:`wantrain.loop.load`."""
    run.source = sources.model_source(run.profile, run.arch)  # name_or_path, and any single files
    index = run.source.model_index()
    check_arch(run.source, index, run.arch)
    run.boundary = model.boundary_ratio(index, run.arch)
    run.tokenizer, run.text_encoder = model.load_text_encoder(run.source, run.dtype)
    run.pm.hook.after_text_encoder_load(run=run, module=run.text_encoder)
    run.text_encoder.to(run.device)
    run.vae = model.load_vae(run.source).to(run.device)


class CoreHooks:
    """The kernel's fallbacks, registered ``trylast`` under ``wantrain.core``:
    a plugin answering first replaces them; a wrapper can wrap them."""

    @hookimpl(trylast=True)
    def trained_experts(self, profile):
        return list(archs.get(profile.model.arch).experts)

    @hookimpl(trylast=True)
    def expert_target(self, target):
        return target

    @hookimpl(trylast=True)
    def load_expert(self, run, expert, subfolder):
        return model.load_expert(run.source, expert, run.dtype, subfolder)

    @hookimpl(trylast=True)
    def encode_prompts(self, run, prompts):
        return model.encode_text(
            run.tokenizer, run.text_encoder, prompts, run.profile.model.max_sequence_length, run.device, run.dtype
        )

    @hookimpl(trylast=True)
    def encode_videos(self, run, batch):
        return model.encode_pixels(run.vae, batch.pixels).to(run.device)

    @hookimpl(trylast=True)
    def encode_condition(self, run, batch):
        video = condition_video(run.arch, batch.start, batch.last, batch.pixels.shape[2])
        return model.encode_pixels(run.vae, video).to(run.device)

    @hookimpl(trylast=True)
    def select_expert(self, run, step):
        return run.trained[step % len(run.trained)]

    @hookimpl(trylast=True)
    def sample_timesteps(self, run, expert, batch_size, generator):
        return flow.uniform_timesteps(expert, run.boundary, batch_size, generator)

    @hookimpl(trylast=True)
    def activate_expert(self, run, expert):
        return False

    @hookimpl(trylast=True)
    def write_lora(self, run, step, folder, dtype):
        return write_lora_pair(run, step, Path(folder), dtype)


def write_lora_pair(run: Run, step: int | None, folder: Path, dtype: str | None = None) -> dict[str, str]:
    """The ComfyUI-layout files of every trained expert, written atomically
    (``dtype``: "bf16" | "fp16" | "fp32"; None = ``[target] save_dtype``)."""
    dtype = model.DTYPES[dtype or run.profile.target.save_dtype]
    targets = {e: run.target(e) for e in run.trained}
    with optimizers.eval_weights(run.optimizer):  # schedule-free: its averaged weights are the ones to use
        states = {e: lora_format.to_comfy(lora.lora_state(run.experts[e]), targets[e].alpha, dtype) for e in run.trained}
    st.require_finite({f"{e}.{k}": v for e, s in states.items() for k, v in s.items()}, f"step {run.step}")
    paths = {}
    for expert, state in states.items():
        meta = lora_format.metadata(
            profile_toml=run.profile.to_toml(),
            step=step,
            base_model=run.profile.model.name_or_path,
            trigger_word=run.profile.job.trigger_word,
            rank=targets[expert].rank,
            alpha=targets[expert].alpha,
            expert=expert,
            arch=run.arch.name,
        )
        path = folder / lora_format.lora_filename(run.name, expert, step, run.lineage.tag)
        paths[expert] = str(st.write_atomic(state, path, meta))
    return paths
