"""Preview videos while training, to pick the best checkpoint by watching.

Renders one H.264 clip per prompt with both experts (routed at the model's
boundary), the LoRA in place, a fixed seed (previews are comparable across
steps) and the Wan 2.2 inference defaults (40 steps, shift 12, guidance 4.0
on the high-noise expert and 3.0 on the low-noise one, 16 fps)::

    <output_dir>/samples/base/<i>.mp4            the base model, once (at_start)
    <output_dir>/samples/step_<step:09d>/<i>.mp4  every `every` steps and at the end
    .../prompts.txt                               which prompt each file shows

Events:

- ``estimate_memory`` -- previews need every expert, trained or not;
- ``on_run_start`` -- at_start: asks for previews of the starting step
  (otherwise it only encodes the prompts, so ``text_cache`` holds them);
- ``on_step`` -- every ``every`` steps and at the last step (``at_end``);
- ``generate_samples`` -- does the rendering (:func:`wantrain.plugins.sample.render.render`).
  Previews are always requested through ``run.generate_samples(step)``, so
  wrappers apply: the ``ema`` plugin swaps its averaged weights in, an
  offload plugin may move modules; ``tensorboard`` logs frame strips of the
  returned files;
- ``check_profile`` -- ``[trigger]`` in a prompt needs ``job.trigger_word``.

Training continues bit-identically after a preview: all RNG states, module
train/eval flags, grad mode and device placement are put back (around the
whole ``generate_samples`` call, wrappers included). The last preview's
``{"step": ..., "paths": [...]}`` is published as ``run.extras["samples"]``.

Config keys: see :class:`Config` and ``docs/plugins/sample.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import attrs
import torch

from wantrain import distributed, hookimpl
from wantrain.errors import ProfileProblem
from wantrain.profile import non_negative
from wantrain.run import Run
from . import render as sampler
from .render import TRIGGER, SampleSettings, settings_from, training_state_preserved, with_trigger

log = logging.getLogger("wantrain.sample")


@attrs.frozen(kw_only=True)
class Config(SampleSettings):
    """``[plugins.sample]``: the render settings of
    :class:`.render.SampleSettings` plus when to render."""

    every: int = attrs.field(default=250, validator=non_negative)  # 0 = only at start / end
    at_start: bool = True  # render the base model (no LoRA) once, before the first step
    at_end: bool = True  # also render at the last step when `every` does not land on it


def due(config: Config, step: int, total: int) -> bool:
    """Whether completed step ``step`` (1-based) of ``total`` gets previews."""
    return bool(config.every and step % config.every == 0) or (config.at_end and step == total)


def step_folder(run, step: int) -> Path:
    return run.output_dir / "samples" / f"step_{step:09d}"


def base_folder(run) -> Path:
    return run.output_dir / "samples" / "base"


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    from wantrain import archs

    problems = sampler.image_problems(config, archs.get(profile.model.arch))
    if profile.job.trigger_word or not any(TRIGGER.search(p) for p in config.prompts):
        return problems
    return problems + [ProfileProblem("plugins.sample.prompts", "a prompt uses [trigger] but job.trigger_word is not set",
                           fix='set job.trigger_word = "sks" (your token) or remove [trigger] from the prompts')]


def request(run, step: int) -> list[str]:
    """Ask for previews through the event (wrappers included); training state
    is the same afterwards. Under torchrun rank 0 renders alone."""
    if distributed.rank():
        return []
    log.info("rendering previews at step %d", step)
    with training_state_preserved(run):
        paths = run.generate_samples(step)
    run.extras["samples"] = {"step": step, "paths": list(paths)}
    return paths


def prime_prompts(run, config: Config) -> None:
    """Encode the preview prompts now, while the text encoder is surely there
    (``text_cache`` with ``unload = true`` drops it after ``on_run_start``)."""
    settings = settings_from(config)
    prompts = [with_trigger(p, run.profile.job.trigger_word) for p in settings.prompts] + [settings.negative_prompt]
    with training_state_preserved(run), torch.no_grad():
        run.encode_prompts(prompts)


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.base_due = True  # the base render is owed once, at the first preview of at_start

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @hookimpl
    def estimate_memory(self):
        # the denoising loop needs both experts: one that is not trained loads on first use and stays
        return {"loads_untrained_experts": True, "note": "previews load every expert, trained or not"}

    @hookimpl
    def on_run_start(self, run: Run):
        if self.config.at_start:
            request(run, run.step)
        else:
            prime_prompts(run, self.config)

    @hookimpl
    def on_step(self, run: Run, step):
        if due(self.config, step, run.profile.training.steps):
            request(run, step)

    @hookimpl
    def generate_samples(self, run: Run, step):
        settings, paths = settings_from(self.config), []
        if self.config.at_start and self.base_due:
            self.base_due = False
            paths += sampler.render(run, settings, base_folder(run), use_lora=False)
            if step == 0:  # a fresh LoRA adds exactly 0: its render would equal the base
                return paths
        return paths + sampler.render(run, settings, step_folder(run, step))


@hookimpl
def add_commands(subparsers):
    """``wantrain sample`` (see :mod:`.command`)."""
    from .command import add_parser

    add_parser(subparsers)
