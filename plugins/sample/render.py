"""Preview videos: the denoising loop used by the ``sample`` plugin during
training and by ``wantrain sample`` after it.

No pipeline object is built: the run's own modules are reused (text
encoder, VAE, both experts with their LoRA in place), so a preview shows
exactly the weights being trained.

    text states   run.encode_prompts(prompts), run.encode_prompts([negative])
    noise         torch.Generator("cpu").manual_seed(seed)  -- never the training RNG;
                  walk_seed = true: prompt i from its own generator of seed + i
    schedule      sampler = "euler": diffusers FlowMatchEulerDiscreteScheduler(shift=shift);
                  sampler = "unipc": UniPCMultistepScheduler as the Wan pipelines set it up
                  (flow_prediction, use_flow_sigmas, flow_shift=shift), one per prompt;
                  `steps` steps
    start image   image-to-video archs (I2V-A14B, TI2V-5B): ``images[i]`` (one for
                  every prompt, or one per prompt; default: the first frame of the
                  first dataset clip), cover-resized to width x height, encoded
                  into the arch's condition (wantrain.archs.condition) -- as
                  diffusers' WanImageToVideoPipeline does; written beside the
                  preview as <i>.start.png. TI2V: "" renders that prompt text-to-video.
    each step     expert = high_noise if t >= boundary * 1000 else low_noise (one-expert archs: it)
                  v = uncond + g * (cond - uncond), g = guidance_high / guidance_low
                  (the TI2V-5B's one expert: guidance_high)
    decode        wantrain.model.decode_latents(run.vae, latents)
    write         <folder>/<i>.mp4 (H.264, yuv420p, PyAV) + <folder>/prompts.txt

The render runs in phases -- text encoder, high-noise steps of every prompt,
low-noise steps of every prompt, VAE -- so each expert is needed once. When
the run keeps components off the accelerator (an offload plugin parked one on
the CPU) or a preview needs an expert that is not trained (loaded on demand),
the components *take turns*: only the current phase's module sits on the
device, the others wait on the CPU, and every module goes back where it was
afterwards. On a CPU run nothing moves.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import re
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch

from wantrain import flow, hookimpl, lora, model
from wantrain.archs import ALL_EXPERTS, Arch
from wantrain.archs.condition import Condition, assemble, condition_video
from wantrain.formats.lora import LoraWeights, read_lora, read_lora_sources
from wantrain.profile import _Invalid, _named, frame_count, in_range, non_empty, one_of, positive

log = logging.getLogger("wantrain.sample")

TRIGGER = re.compile(r"\[trigger\]", re.IGNORECASE)


@_named
def _side(inst, attr, value):
    if value < 16 or value % 16:
        lo = max(16, value // 16 * 16)
        raise _Invalid("must be a multiple of 16, at least 16 (VAE stride 8 x patch 2)", value, f"use {lo} or {lo + 16}")


@attrs.frozen(kw_only=True)
class SampleSettings:
    """What a preview render looks like. The ``sample`` plugin's ``Config``
    extends this with when to render; ``wantrain sample`` uses it alone."""

    prompts: tuple[str, ...] = attrs.field(validator=non_empty)
    negative_prompt: str = ""
    num_frames: int = attrs.field(default=33, validator=frame_count)
    width: int = attrs.field(default=832, validator=_side)
    height: int = attrs.field(default=480, validator=_side)
    steps: int = attrs.field(default=40, validator=positive)
    shift: float = attrs.field(default=12.0, validator=positive)
    guidance_high: float = attrs.field(default=4.0, validator=in_range(1.0))
    guidance_low: float = attrs.field(default=3.0, validator=in_range(1.0))
    seed: int = 42
    fps: float = attrs.field(default=16.0, validator=positive)
    #: "euler" (flow-match Euler) or "unipc" (diffusers' UniPC, as Wan's pipelines use it)
    sampler: str = attrs.field(default="euler", validator=one_of("euler", "unipc"))
    #: prompt i starts from the noise of seed + i (else one generator of seed, drawn in prompt order)
    walk_seed: bool = False
    #: image-to-video archs: the start image of each prompt (one for all, or one per prompt;
    #: "" = none, TI2V-5B only); default: the first frame of the first dataset clip
    images: tuple[str, ...] = ()


def settings_from(config: Any, **changes: Any) -> SampleSettings:
    """The render settings held by any object with those attributes (the
    sample plugin's ``Config``), with ``changes`` applied."""
    values = {f.name: getattr(config, f.name) for f in attrs.fields(SampleSettings) if hasattr(config, f.name)}
    values.update(changes)
    return SampleSettings(**values)


def with_trigger(prompt: str, trigger_word: str | None) -> str:
    return TRIGGER.sub(trigger_word or "", prompt)


def latent_shape(settings: SampleSettings, arch: Arch | None = None) -> tuple[int, int, int, int, int]:
    channels, spatial, temporal = (arch.latent_channels, arch.vae_spatial, arch.vae_temporal) if arch else (16, 8, 4)
    return (1, channels, (settings.num_frames - 1) // temporal + 1, settings.height // spatial, settings.width // spatial)


def image_problems(settings: SampleSettings, arch: Arch, where: str = "plugins.sample") -> list:
    """Sizes the arch's VAE and patch divide, and a start image per prompt (image-to-video archs)."""
    from wantrain.errors import ProfileProblem

    problems, step = [], arch.size_multiple
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value % step:
            problems.append(ProfileProblem(f"{where}.{name}", f"must be a multiple of {step} for {arch.title}", value,
                                           f"use {max(step, value // step * step)}"))
    if settings.images and not arch.takes_start_frame:
        problems.append(ProfileProblem(f"{where}.images", f"{arch.title} takes no start image", list(settings.images),
                                       "remove images, or set [model] arch to an image-to-video model"))
    elif len(settings.images) not in (0, 1, len(settings.prompts)):
        problems.append(ProfileProblem(f"{where}.images", f"give one start image for every prompt or one per prompt "
                                       f"({len(settings.prompts)} prompts)", list(settings.images), "match the prompts"))
    elif "" in settings.images and arch.default_i2v_probability >= 1.0:
        problems.append(ProfileProblem(f"{where}.images", f"{arch.title} needs a start image for every prompt",
                                       list(settings.images), "replace \"\" by an image path"))
    return problems


def start_images(run, settings: SampleSettings, count: int) -> list[str | None]:
    """The start image path of each of ``count`` prompts (None: text-to-video)."""
    images = list(settings.images) or [default_start_image(run.profile)]
    if len(images) == 1:
        images *= count
    paths = [run.profile.resolve_path(p) if p else None for p in images]
    missing = [str(p) for p in paths if p is not None and not p.is_file()]
    if missing:
        from wantrain.errors import ProfileProblem, WantrainError

        raise WantrainError(ProfileProblem("plugins.sample.images", "start image not found", missing[0],
                                           "check the path (relative paths start from the profile's folder)"))
    return [str(p) if p else None for p in paths]


def default_start_image(profile) -> str:
    """The first dataset clip's start image: ``clip.png`` beside it, else the clip itself (its first frame);
    a dataset of stills only (a TI2V-5B character set): its first image."""
    from wantrain.data.media import VIDEO_EXTS
    from wantrain.data.scan import list_files, start_images as overrides

    still = None
    for ds in profile.datasets:
        folder = profile.resolve_path(ds.folder)
        files = list_files(folder, ds.caption_ext)[0] if folder.is_dir() else []
        clips = [f for f in files if f.suffix.lower() in VIDEO_EXTS]
        if clips:
            return str((overrides(files).get(clips[0]) or (None,))[0] or clips[0])
        still = still or next(iter(files), None)
    if still is not None:
        return str(still)
    from wantrain.errors import ProfileProblem, WantrainError

    raise WantrainError(ProfileProblem("plugins.sample.images", "no start image: no dataset clip or image to take one from",
                                       fix='set [plugins.sample] images = ["start.png"]'))


def load_start_pixels(path: str, width: int, height: int) -> torch.Tensor:
    """An image (or a clip's first frame), cover-resized and centre-cropped: ``[3, H, W]`` in [-1, 1]."""
    from wantrain.data import media
    from wantrain.data.loader import resize_crop

    kind = media.kind_of(Path(path))
    frame = media.read_frames(path, (0,))[0] if kind == "video" else media.read_image(path)
    out = resize_crop(np.asarray(frame), (width, height))
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).float() / 127.5 - 1.0


def preview_conditions(run, settings: SampleSettings, images: list[str | None]) -> list[Condition]:
    """Each prompt's condition (an empty one without a start image), encoded with the run's VAE."""
    out = []
    for path in images:
        if path is None:
            out.append(Condition())
            continue
        pixels = load_start_pixels(path, settings.width, settings.height)[None]
        latents = model.encode_pixels(run.vae, condition_video(run.arch, pixels, None, settings.num_frames))
        out.append(assemble(run.arch, latents.to(run.device, torch.float32), settings.num_frames))
    return out


def make_scheduler(settings: SampleSettings):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if settings.sampler == "unipc":  # as diffusers' Wan pipelines configure it
        scheduler = UniPCMultistepScheduler(num_train_timesteps=int(flow.T_MAX), prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=settings.shift)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(flow.T_MAX), shift=settings.shift)
    scheduler.set_timesteps(settings.steps)
    return scheduler


def steppers(settings: SampleSettings, scheduler, count: int) -> list:
    """One multistep solver per prompt (its history is per trajectory), or
    Nones for Euler, which :func:`denoise` steps itself."""
    if settings.sampler == "euler":
        return [None] * count
    return [copy.deepcopy(scheduler) for _ in range(count)]


# ---------------------------------------------------------------- state


def _components(run) -> dict[str, torch.nn.Module]:
    found = {"text_encoder": run.text_encoder, "vae": run.vae, **run.experts}
    return {name: m for name, m in found.items() if isinstance(m, torch.nn.Module)}


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def training_state_preserved(run) -> Iterator[None]:
    """Whatever happens inside, training resumes as if nothing had: every
    RNG (the run's generator, torch CPU and CUDA, numpy, python), each
    submodule's train/eval flag, and grad mode are put back."""
    rng = run.rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    modes = [(m, m.training) for c in _components(run).values() for m in c.modules()]
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        run.set_rng_state(rng)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for module, mode in modes:
            module.training = mode
        torch.set_grad_enabled(grad)


class Placement:
    """Which component sits on the device during each phase of a render.

    When a plugin owns where the experts live (``run.experts_placed_by_plugin``:
    the ``activate_expert`` event is implemented, as by an offload plugin),
    experts are brought in through ``run.activate_expert`` and never moved
    here; only the text encoder and the VAE take turns.
    """

    def __init__(self, run, needed_experts: Sequence[str]):
        self.run = run
        self.managed = run.experts_placed_by_plugin
        self.home = {name: _device_of(m) for name, m in self._movable().items()}
        parked = any(_device_of(m) != run.device for m in _components(run).values())
        on_demand = any(e not in run.experts for e in needed_experts)
        self.turns = run.device.type != "cpu" and (parked or on_demand)

    def _movable(self) -> dict[str, torch.nn.Module]:
        found = _components(self.run)
        return {n: m for n, m in found.items() if n not in self.run.experts} if self.managed else found

    def visit(self, name: str) -> None:
        """Only ``name`` on the device (in turns mode); the rest on the CPU."""
        if self.managed and name in self.run.experts:
            self.run.activate_expert(name)
        if not self.turns:
            return
        cpu = torch.device("cpu")
        for other, module in self._movable().items():
            target = self.run.device if other == name else cpu
            if _device_of(module) != target:
                module.to(target)

    def restore(self) -> None:
        """Every module back where it was; experts loaded for previews only
        wait on the CPU (in turns mode) until the next render."""
        cpu = torch.device("cpu")
        for name, module in self._movable().items():
            home = self.home.get(name, cpu if self.turns else _device_of(module))
            if _device_of(module) != home:
                module.to(home)


# ---------------------------------------------------------------- render


def render(run, settings: SampleSettings, folder: str | Path, *, use_lora: bool = True) -> list[str]:
    """Render one preview per prompt into ``folder/<i>.mp4``; return the paths.

    ``use_lora=False`` renders the base model (every trained adapter scaled to
    exactly 0). Training state is preserved (see :func:`training_state_preserved`).
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [with_trigger(p, run.profile.job.trigger_word) for p in settings.prompts]
    scheduler = make_scheduler(settings)
    routes = [run.expert_for(float(t)) for t in scheduler.timesteps]
    needed = [e for e in ALL_EXPERTS if e in routes]
    placement = Placement(run, needed)
    images = start_images(run, settings, len(prompts)) if run.arch.takes_start_frame else [None] * len(prompts)
    with training_state_preserved(run), torch.no_grad():
        try:
            placement.visit("text_encoder")
            cond = run.encode_prompts(prompts)
            negative = run.encode_prompts([settings.negative_prompt]) if _uses_cfg(settings) else None
            if any(images):
                placement.visit("vae")
            starts = preview_conditions(run, settings, images)
            latents = initial_noise(settings, len(prompts), run.arch)
            solvers = steppers(settings, scheduler, len(prompts))
            done, total = 0, len(prompts) * len(routes)  # denoising steps, for on_progress
            run.pm.hook.on_progress(run=run, task="rendering previews", done=0, total=total)
            for expert in needed:
                placement.visit(expert)  # before loading: an on-demand expert arrives on a free device
                run.require_expert(expert).eval()
                placement.visit(expert)  # after: an offload manager brings a loaded expert in
                steps = [i for i, e in enumerate(routes) if e == expert]
                with contextlib.nullcontext() if use_lora else run.lora_disabled(expert):
                    for p in range(len(prompts)):
                        latents[p] = denoise(run, expert, scheduler, steps, latents[p], cond[p : p + 1], negative,
                                             _guidance(settings, expert), solvers[p], starts[p])
                        done += len(steps)
                        run.pm.hook.on_progress(run=run, task="rendering previews", done=done, total=total)
            placement.visit("vae")
            latents = [starts[p].model_input(x.to(run.device)).cpu() if starts[p].first is not None else x
                       for p, x in enumerate(latents)]  # TI2V: the clean start frame, as diffusers decodes it
            paths = [write_preview(run, latents[p], folder / f"{p}.mp4", settings.fps) for p in range(len(prompts))]
            for p, path in enumerate(images):
                if path is not None:
                    write_start_image(load_start_pixels(path, settings.width, settings.height), folder / f"{p}.start.png")
        finally:
            placement.restore()
    (folder / "prompts.txt").write_text("".join(f"{p}.mp4\t{text}\n" for p, text in enumerate(prompts)), encoding="utf-8")
    log.info("wrote %d preview(s) to %s in %.1f s", len(paths), folder, time.perf_counter() - t0)
    return [str(p) for p in paths]


def _uses_cfg(settings: SampleSettings) -> bool:
    return settings.guidance_high > 1.0 or settings.guidance_low > 1.0


def _guidance(settings: SampleSettings, expert: str) -> float:
    return settings.guidance_low if expert == "low_noise" else settings.guidance_high


def write_start_image(pixels: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(to_uint8(pixels[None, :, None])[0]).save(path)


def initial_noise(settings: SampleSettings, count: int, arch: Arch | None = None) -> list[torch.Tensor]:
    """One noise tensor per prompt from a generator of its own, so prompt
    ``i`` starts from the same noise at every preview step."""
    if settings.walk_seed:
        return [torch.randn(latent_shape(settings, arch), generator=torch.Generator("cpu").manual_seed(settings.seed + i))
                for i in range(count)]
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    return [torch.randn(latent_shape(settings, arch), generator=generator) for _ in range(count)]


def denoise(run, expert: str, template, steps: list[int], x: torch.Tensor, cond: torch.Tensor,
            negative: torch.Tensor | None, guidance: float, solver=None, start: Condition | None = None) -> torch.Tensor:
    """The steps ``steps`` (indices into the schedule) of one prompt with
    ``expert``: Euler, or ``solver.step`` (this prompt's own multistep
    scheduler); ``start``: its start-frame condition (image-to-video archs)."""
    x = x.to(run.device, torch.float32)
    sigmas = template.sigmas
    for i in steps:
        t = template.timesteps[i].reshape(1)
        v = run.predict(expert, x, t, cond, start)
        if guidance > 1.0 and negative is not None:
            uncond = run.predict(expert, x, t, negative, start)
            v = uncond + guidance * (v - uncond)
        if solver is not None:
            x = solver.step(v, template.timesteps[i], x, return_dict=False)[0].float()
            continue
        # FlowMatchEulerDiscreteScheduler.step: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
    return x.cpu()


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels ``[1, 3, F, H, W]`` in [-1, 1] -> uint8 ``[F, H, W, 3]``."""
    frames = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_preview(run, latents: torch.Tensor, path: Path, fps: float) -> Path:
    from wantrain.data.media import write_video

    return write_video(path, to_uint8(model.decode_latents(run.vae, latents)), fps)


# ---------------------------------------------------------------- wantrain sample


def lora_paths(prefix: str, experts: Sequence[str] = model.EXPERTS, arch: Arch | None = None) -> dict[str, LoraWeights]:
    """What ``--lora`` gives each expert: ``output/demo/demo`` -> the files
    ``output/demo/demo_{expert}.safetensors`` that exist; or one file of any
    layout ``[target] init_from`` reads (with its high_noise/low_noise
    partner; a two-expert file gives each expert its half; a file naming no
    expert serves both); or a checkpoints/step_N folder."""
    return read_lora_sources(prefix, experts, where="--lora", prefix=True, arch=arch)


def attach_lora_file(module: torch.nn.Module, source: Path | LoraWeights, expert: str | None = None) -> None:
    """Attach a LoRA (a file of any layout, or weights already read) to
    ``module``, honouring its alpha per module (scale = alpha / rank)."""
    weights = source if isinstance(source, LoraWeights) else read_lora(source, expert)
    lora.attach_weights(module, weights)


class _LoraFiles:
    """Attaches the weights of ``wantrain sample --lora`` as each expert loads."""

    def __init__(self, sources: dict[str, LoraWeights]):
        self.sources = sources

    @hookimpl(trylast=True)  # after quantize & co. have changed the base module
    def after_expert_load(self, run, expert, module):
        if expert in self.sources:
            attach_lora_file(module, self.sources[expert])
        else:
            log.warning("no %s LoRA file: the %s expert renders as the base model", expert, expert)
