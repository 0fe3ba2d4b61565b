"""Every event the kernel emits, grouped by phase.

Each spec says when it fires relative to the kernel's own actions, what each
argument is, and its return contract:

- *notify*: return values are ignored;
- *first result*: the first non-None answer wins (``firstresult=True``); when
  no plugin answers, the kernel's fallback (named in the docstring) runs;
- *collected*: every plugin's answer is gathered into a list.

Hook implementations take only the arguments they need and are always
called by keyword. ``docs/hooks.md`` shows the firing order in a pseudocode
of the loop; ``tests/kernel/test_hookspecs.py`` fails when a spec here is not
documented there or has no test naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from . import hookspec

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import torch

    from .archs.condition import Condition
    from .commands.estimate import Remedy, Settings
    from .run import Run, StepContext
    from .data import Batch
    from .errors import ProfileProblem
    from .profile import Profile, TargetConfig


# ---------------------------------------------------------------- setup


@hookspec
def check_profile(profile: "Profile") -> "Iterable[ProfileProblem] | None":
    """Validate cross-section rules before anything heavy happens.

    Fires: in ``wantrain check`` and at the start of ``wantrain run``, after
    the profile is structured and every plugin is registered, before any
    weight loads.

    :param profile: the validated, frozen profile.
    :return: *collected* -- an iterable of :class:`~wantrain.errors.ProfileProblem`
        (or None). All problems from all plugins are reported together and the
        run stops with exit code 2.
    """


@hookspec
def on_run_start(run: "Run") -> None:
    """The run is about to enter the loop.

    Fires: once, after models are loaded, adapters attached, the optimizer
    built and any resume state restored; before the first step.
    ``run.step`` is the step the loop starts from (0, or the resumed step).

    :return: *notify*.
    """


# ---------------------------------------------------------------- model


@hookspec(firstresult=True)
def trained_experts(profile: "Profile") -> "list[str] | None":
    """Which experts get LoRA adapters and optimizer state.

    Fires: before any weight loads.

    :return: *first result* -- a list drawn from ``"high_noise"``,
        ``"low_noise"``. Kernel fallback: both.
    """


@hookspec(firstresult=True)
def expert_target(profile: "Profile", expert: str, target: "TargetConfig") -> "TargetConfig | None":
    """The adapter settings of one trained ``expert``: ``target`` is ``[target]``;
    answer a copy (``attrs.evolve``) with another ``rank`` / ``alpha`` to give
    the expert its own. Fires when adapters attach, when LoRA files and
    checkpoints are written and when a resume is checked. Fallback: ``target``.

    :return: *first result*.
    """


@hookspec(firstresult=True)
def load_expert(run: "Run", expert: str, subfolder: str) -> "torch.nn.Module | None":
    """Load one transformer expert (``subfolder`` is ``transformer`` for the
    high-noise expert, ``transformer_2`` for the low-noise one).

    Fires: once per expert that is needed (trained, or asked for by a plugin
    through ``run.require_expert``), before ``after_expert_load``.

    :return: *first result* -- the loaded module, or None to let the kernel
        load it with ``WanTransformer3DModel.from_pretrained`` (meta-device
        init, weights streamed in; no second copy).
    """


@hookspec
def after_expert_load(run: "Run", expert: str, module: "torch.nn.Module") -> None:
    """An expert's base weights are loaded (frozen), before adapters attach.

    Fires: once per loaded expert, right after ``load_expert``. Implementations
    may change the module in place (quantize, add frozen recovery adapters).

    :return: *notify*.
    """


@hookspec
def after_text_encoder_load(run: "Run", module: "torch.nn.Module") -> None:
    """The UMT5 text encoder is loaded (frozen, eval mode), still on the host.

    Fires: once, after the encoder is built and before it moves to the run's
    device (so a full-precision UMT5-XXL never lands on the GPU when it is
    quantized here) and before any prompt is encoded. May change the module
    in place (quantize it).

    :return: *notify*.
    """


@hookspec
def after_adapters_attached(run: "Run") -> None:
    """LoRA adapters are attached to every trained expert; ``run.lora_parameters``
    lists the trainable parameters. Fires before the optimizer is built.

    :return: *notify*.
    """


# ---------------------------------------------------------------- data


@hookspec(firstresult=True)
def encode_prompts(run: "Run", prompts: list[str]) -> "torch.Tensor | None":
    """Turn captions into text-encoder states ``[B, max_sequence_length, text_dim]``
    (padding zeroed, exactly as ``WanPipeline`` does).

    Fires: once per micro-batch (training) and per prompt set (previews).

    :return: *first result* -- the states, or None. Kernel fallback: run the
        text encoder now.
    """


@hookspec(firstresult=True)
def encode_videos(run: "Run", batch: "Batch") -> "torch.Tensor | None":
    """Turn a batch of pixels into normalised VAE latents ``[B, 16, F', H/8, W/8]``.

    ``batch.pixels`` is None for samples the latent cache serves (the loader
    does not decode them); ``batch.cache_keys`` identify each sample.

    Fires: once per micro-batch.

    :return: *first result* -- the latents, or None. Kernel fallback: encode
        with the VAE now (``wantrain.model.encode_pixels``).
    """


@hookspec(firstresult=True)
def encode_condition(run: "Run", batch: "Batch") -> "torch.Tensor | None":
    """The condition latents of a batch for an arch that takes a start frame
    (``run.arch.takes_start_frame``: I2V-A14B, TI2V-5B): normalised VAE
    latents of each sample's condition video
    (:func:`wantrain.archs.condition.condition_video`: I2V the start frame,
    zeros and optionally the last frame; TI2V the start frame alone), built
    from ``batch.start`` / ``batch.last`` -- the override image beside the
    clip, else its own first (last) frame. The kernel adds the mask
    (:func:`wantrain.archs.condition.assemble`).

    Fires: once per micro-batch, after ``encode_videos``, only for such archs.

    :return: *first result* -- the latents, or None. Kernel fallback:
        VAE-encode now (the latent cache serves stored condition latents).
    """


@hookspec
def caption_variants(run: "Run", template: str) -> "Iterable[str] | None":
    """Other prompts a plugin will derive from a dataset caption and pass to
    ``run.encode_prompts`` later (DOP: the caption with the trigger replaced
    by the class), so that a prompt cache can encode them up front.

    Fires: when a plugin prepares every caption in advance (``text_cache`` at
    ``on_run_start``), once per distinct caption template. ``template`` is the
    caption before trigger substitution (``"[trigger]"`` in it).

    :return: *collected* -- the variant prompts (final text), or None.
    """


# ---------------------------------------------------------------- step


@hookspec(firstresult=True)
def select_expert(run: "Run", step: int) -> "str | None":
    """Which expert trains at ``step`` (0-based optimizer step).

    Fires: at the start of every optimizer step, before the first micro-batch.

    :return: *first result* -- ``"high_noise"`` or ``"low_noise"``. Kernel
        fallback: alternate between the trained experts each step.
    """


@hookspec
def before_expert_switch(run: "Run", old: "str | None", new: str) -> None:
    """The active expert is about to change from ``old`` (None at the first
    step) to ``new``. Fires before any micro-batch of the new expert.

    :return: *notify*.
    """


@hookspec
def after_expert_switch(run: "Run", old: "str | None", new: str) -> None:
    """``new`` is now ``run.active_expert``. Fires right after the switch.

    :return: *notify*.
    """


@hookspec(firstresult=True)
def activate_expert(run: "Run", expert: str) -> "bool | None":
    """Make ``expert`` ready to run on ``run.device`` (``run.activate_expert``).

    Fires: whenever kernel code outside the training step needs an expert
    on the device -- the preview sampler, before each expert's denoising
    steps. A plugin that implements this event owns where the experts live
    (``run.experts_placed_by_plugin`` is then true): nothing else moves an
    expert between devices, and it must bring ``expert`` in here (parking
    others as it sees fit).

    :return: *first result* -- True when handled. Kernel fallback: nothing
        to do (a loaded expert already sits on ``run.device``); returns
        False.
    """


@hookspec(firstresult=True)
def sample_timesteps(run: "Run", expert: str, batch_size: int, generator: "torch.Generator") -> "torch.Tensor | None":
    """Draw training timesteps ``t`` in [0, 1000] for ``expert``.

    Fires: once per micro-batch. Draw from ``generator`` only (it is part of
    the resume state). The result must lie in the expert's range
    (``run.expert_range(expert)``: high noise [boundary*1000, 1000], low
    noise [0, boundary*1000)).

    :return: *first result* -- float tensor ``[batch_size]``. Kernel fallback:
        uniform within the expert's range.
    """


@hookspec(firstresult=True)
def compute_target(run: "Run", batch: "Batch", pred: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor | None":
    """Replace the flow-matching target (``noise - x0``) before the loss.

    Fires: once per micro-batch, after the forward pass.

    :return: *first result* -- the new target, or None to keep it.
    """


@hookspec
def compute_extra_losses(run: "Run", batch: "Batch", ctx: "StepContext") -> "Mapping[str, torch.Tensor] | None":
    """Extra loss terms added to the main loss.

    Fires: once per micro-batch, after the main loss is computed and before
    backward. ``ctx`` has ``expert``, ``latents``, ``noise``, ``noisy``,
    ``timesteps``, ``text_states``, ``pred`` and ``loss``.

    :return: *collected* -- mappings ``{name: scalar tensor}``; every value is
        added to the loss and logged under its name.
    """


@hookspec
def before_optimizer_step(run: "Run") -> None:
    """Gradients of the step are accumulated and clipped; the optimizer is
    about to step. ``run.grad_norm`` holds the norm before clipping.

    Fires: once per optimizer step, after clipping.

    :return: *notify*.
    """


@hookspec
def after_optimizer_step(run: "Run") -> None:
    """The optimizer and LR scheduler have stepped; gradients are zeroed.

    Fires: once per optimizer step, before ``run.step`` is incremented and
    before ``on_step``. EMA updates its shadow here.

    :return: *notify*.
    """


@hookspec
def on_step(run: "Run", step: int, metrics: "dict[str, Any]") -> None:
    """A step is complete. ``step`` counts completed optimizer steps (1-based,
    equal to ``run.step``); ``metrics`` has ``loss``, ``loss/<expert>``,
    ``lr``, ``grad_norm``, ``expert``, ``step_time``, ``samples_per_second``,
    ``peak_memory_gb``, any extra-loss names and, on steps that drew a
    regularization batch, ``loss/regularization``.

    Fires: after ``after_optimizer_step``, once per optimizer step. Saving and
    previews are triggered from here.

    :return: *notify*.
    """


# ---------------------------------------------------------------- save / resume


@hookspec(firstresult=True)
def write_lora(run: "Run", step: "int | None", folder: str, dtype: "str | None") -> "dict[str, str] | None":
    """Write the LoRA pair for ``step`` (None = the final files) into ``folder``
    in ``dtype`` (``"bf16"`` | ``"fp16"`` | ``"fp32"``; None = ``[target]
    save_dtype``; checkpoints pass ``[plugins.checkpoints] dtype``).

    Fires: from ``run.save_lora`` -- by the kernel at the end of the run, and by
    plugins (checkpoints). Wrap it (``hookimpl(wrapper=True)``) to change which
    weights are written, e.g. EMA.

    :return: *first result* -- ``{expert: path}``. The kernel's own
        implementation (``trylast``) writes the ComfyUI-layout files.
    """


@hookspec
def on_save(run: "Run", step: int, paths: "dict[str, str]") -> None:
    """A save is fully on disk (renamed into place). ``paths`` maps each expert
    (and ``"state"`` when resume state was written) to its path.

    Fires: after every ``write_lora`` (checkpoints and the final pair).

    :return: *notify*.
    """


@hookspec
def state_dict(run: "Run") -> "Mapping[str, Any] | None":
    """This plugin's state for the resume checkpoint.

    Fires: when a checkpoint with resume state is written, once per plugin
    (the kernel calls each implementation on its own and keys the answer by
    the name the plugin is registered under -- its ``[plugins] enabled``
    entry -- so a plugin never chooses or collides on a key).

    :return: *collected, keyed by plugin* -- a mapping of tensors and
        JSON-serialisable values (lists, dicts, numbers, strings), or None
        for nothing to save.
    """


@hookspec
def load_state_dict(run: "Run", state: "Mapping[str, Any]") -> None:
    """Restore this plugin's state on resume. ``state`` is exactly what this
    plugin's ``state_dict`` returned when the checkpoint was written (found
    under its registered name).

    Fires: after adapters and the optimizer exist, before ``on_run_start``;
    only for plugins that have an entry in the checkpoint.

    :return: *notify*.
    """


# ---------------------------------------------------------------- sample


@hookspec(firstresult=True)
def generate_samples(run: "Run", step: int) -> "list[str] | None":
    """Render preview videos for ``step``. Wrap it to change the weights used
    (EMA) or the device placement (offload) around rendering.

    Fires: when a plugin asks for previews (``run.generate_samples(step)``).

    :return: *first result* -- the written file paths.
    """


@hookspec
def on_progress(run: "Run", task: str, done: int, total: int) -> None:
    """Long work outside the training step moved on: ``done`` of ``total``
    units of ``task`` are finished (``task`` is a short label a person reads:
    "caching text states", "caching latents", "rendering previews").

    Fires: from the code doing such work -- the text and latent caches while
    they encode, the preview sampler after each prompt's denoising steps --
    once with ``done = 0`` when the task starts and after every unit;
    ``done == total`` ends the task. A progress display shows it as a nested
    bar (the ``progress`` plugin) or as log lines.

    :return: *notify*.
    """


# ---------------------------------------------------------------- end


@hookspec
def on_run_end(run: "Run") -> None:
    """The loop finished and the final files are written -- or it stopped
    gracefully (``run.stop_requested``, SIGINT/SIGTERM) before the last step
    and a resume checkpoint of ``run.step`` was written instead.

    Fires: once, last.

    :return: *notify*.
    """


@hookspec
def on_exception(run: "Run", exc: BaseException) -> None:
    """The loop raised ``exc``. Fires before the exception propagates; flush
    logs here. Do not raise.

    :return: *notify*.
    """


# ---------------------------------------------------------------- tools


@hookspec
def estimate_memory(profile: "Profile", memory: "Settings") -> "Mapping[str, Any] | None":
    """What this plugin changes in the memory a run needs (``wantrain estimate``).

    ``memory`` is the kernel's :class:`wantrain.commands.estimate.Settings`
    for the profile (model dtype, LoRA, batch, frames, checkpointing).

    Fires: in ``wantrain estimate``, once per enabled plugin (no weights
    load; the model's configs are read).

    :return: *collected, keyed by plugin* -- ``Settings`` field changes
        (``{"weight_bytes": 0.53, "weight_format": "qint4", ...}``) and an
        optional ``"note"``: one line the report prints as ``<plugin>: <note>``.
    """


@hookspec
def memory_remedies(profile: "Profile", memory: "Settings") -> "Iterable[Remedy] | None":
    """Changes this plugin can offer when a run does not fit the card.

    Implement it as a *module-level* function: it is asked of every
    available plugin (built-in, entry points, the profile's own), enabled or
    not, so that a plugin can suggest turning itself on. ``memory`` holds
    the run's settings with every enabled plugin's changes applied.

    Fires: in ``wantrain estimate --vram-gb N`` when the estimate exceeds N.

    :return: *collected* -- :class:`wantrain.commands.estimate.Remedy`
        items; the kernel sorts them by ``order``, applies them one after
        the other and prints each with the peak it leads to, until one fits.
    """


@hookspec
def add_commands(subparsers: "argparse._SubParsersAction", commands: "Mapping[str, argparse.ArgumentParser]") -> None:
    """Add ``wantrain`` subcommands, or options to existing ones (as pytest's
    ``pytest_addoption``).

    Implement it as a *module-level* function: the command line asks every
    available plugin before it parses the arguments. Add a command with
    ``p = subparsers.add_parser(name, help=...)`` and
    ``p.set_defaults(handler=fn)``, where ``fn(args) -> int`` is the exit
    code (raise :class:`~wantrain.errors.WantrainError` for user mistakes);
    ``commands`` maps the kernel's command names to their parsers.

    Fires: once per ``wantrain`` invocation, before parsing.

    :return: *notify*.
    """


@hookspec(firstresult=True)
def checkpoint_weights(states: "Mapping[str, Any]", variant: str) -> "Mapping[str, Mapping[str, torch.Tensor]] | None":
    """LoRA weights a plugin keeps in a resume checkpoint, for ``wantrain
    export --<variant>`` (the EMA shadow: ``variant = "ema"``).

    Implement it as a *module-level* function (asked of every available
    plugin). ``states`` maps registered plugin names to what each plugin's
    ``state_dict`` saved.

    Fires: in ``wantrain export`` of a checkpoint folder with a variant.

    :return: *first result* -- ``{expert: {"blocks.0.attn1.to_q.lora_A.weight": tensor, ...}}``
        (the kernel's LoRA names), or None when this plugin does not keep
        that variant.
    """
