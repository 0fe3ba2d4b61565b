"""The training loop. Reads top to bottom: load -> attach -> for each step:
pick expert -> batch -> timesteps -> forward -> losses -> backward ->
optimizer -> events. Optional behaviour is only ever a ``pm.hook.<event>``."""

from __future__ import annotations

import logging
import math
import time
from collections import deque

import torch

from . import flow, lora
from .archs import ALL_EXPERTS
from .archs.condition import draw_start_frames
from .data import build_train_data
from .distributed import data_world, hooks as distributed_hooks
from .distributed.data import drawn_rows, loss_weight, my_rows
from .distributed.step import agree_on_stop, open_checkpoint, reduce_step
from .errors import ProfileProblem, WantrainError
from .run import CORE, Run, StepContext, load_expert_into, load_frozen, open_run, peak_memory_gb
from .lora import load_init_from
from .optim import build_optimizer, build_scheduler, effective_lr
from .profile import Profile
from .formats.outdir import hold_output_dir
from .resume import restore, save_final, save_on_stop, stop_on_signals

log = logging.getLogger("wantrain")


def setup(profile: Profile) -> Run:
    """Plugins registered and checked, profile cross-checked, output folder
    made -- everything before the first weight loads."""
    return open_run(profile, purpose="train", extra_plugins=distributed_hooks.plugins(profile))


def load(run: Run) -> None:
    """Data scanned (errors before any weight), then the frozen parts (text
    encoder, VAE), and the trained experts with their LoRA adapters,
    optimizer and schedule."""
    p = run.profile
    run.data = build_train_data(p, seed=p.job.seed, num_workers=p.training.num_workers)
    for line in run.data.report.lines():
        log.info(line)
    warn_unserved_caches(run)
    run.trained = list(run.pm.hook.trained_experts(profile=p))
    load_frozen(run)
    for expert in run.trained:
        module = load_expert_into(run, expert)
        if p.model.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        seed = p.job.seed + ALL_EXPERTS.index(expert)  # same init whichever experts are trained
        params = lora.attach_target(module, run.target(expert), seed=seed)
        run.lora_parameters[expert] = params
        module.train()
    load_init_from(run)  # [target] init_from: start from an existing LoRA
    run.pm.hook.after_adapters_attached(run=run)
    tcfg = p.training
    groups = [{"params": run.lora_parameters[e], "expert": e} for e in run.trained]  # one group per expert
    run.optimizer = build_optimizer(tcfg.optimizer, groups, tcfg.lr, tcfg.weight_decay, tcfg.optimizer_args)
    run.lr_scheduler = build_scheduler(tcfg.lr_scheduler, run.optimizer, tcfg.warmup_steps, tcfg.steps)


def warn_unserved_caches(run: Run) -> None:
    """``cache_latents = true`` asks for stored latents; without a plugin
    that serves them (``encode_videos``), the VAE encodes every step."""
    served = any(i.plugin_name != CORE for i in run.pm.hook.encode_videos.get_hookimpls())
    for i, ds in enumerate(run.profile.datasets):
        if ds.cache_latents and not served:
            log.warning("datasets[%d]: cache_latents = true but no enabled plugin serves stored latents "
                        "(encode_videos); latents are encoded every step", i)


def train(profile: Profile, resume: str = "auto") -> Run:
    """Run a whole training job and return the Run. ``resume``: ``"auto"``
    continues from the newest checkpoint in the output folder, ``"never"``
    refuses to, or a checkpoint folder. Ends with the final LoRA pair -- or,
    stopped by SIGINT/SIGTERM, with a checkpoint to resume from. One run per
    output folder: the folder is locked for the run's life."""
    run = setup(profile)
    with hold_output_dir(run.output_dir):
        try:
            checkpoint = open_checkpoint(run, resume)  # checked before any weight loads; lineage; profile.toml
            load(run)
            restore(run, checkpoint)
            run.pm.hook.on_run_start(run=run)
            with stop_on_signals(run):
                fit(run)
            finish(run)
            run.pm.hook.on_run_end(run=run)
        except BaseException as exc:
            run.pm.hook.on_exception(run=run, exc=exc)
            raise
        finally:
            if run.data is not None:
                run.data.close()
    return run


def fit(run: Run) -> None:
    """Steps from ``run.step`` until ``training.steps`` or a graceful stop.
    A loss line every 5% of the run goes to the debug log (the ``progress``
    plugin is the user-facing view); the first/last loss summary to info."""
    steps = run.profile.training.steps
    log.info("training %s for %d steps on %s (experts: %s)%s", run.name, steps, run.device, ", ".join(run.trained),
             f", from step {run.step}" if run.step else "")
    history: deque[float] = deque(maxlen=50)
    first = []
    log_every = max(1, steps // 20)
    while run.step < steps and not agree_on_stop(run):
        metrics = train_step(run)
        if metrics is None:  # a skipped non-finite step
            continue
        history.append(metrics["loss"])
        if len(first) < 100:  # up to 100: a run shorter than that is summarised by its two halves
            first.append(metrics["loss"])
        if run.step % log_every == 0 or run.step == steps:
            log.debug("step %d/%d  loss %.4f (avg of last %d)  %s", run.step, steps,
                     sum(history) / len(history), len(history), metrics["expert"])
    if first:
        log.info("%s", loss_summary(first, list(history)))


def loss_summary(first: list[float], last: list[float]) -> str:
    """First 50 losses against the last 50; under 100 steps (``first`` holds all), first half against second."""
    if len(first) == 1:
        return f"loss: {first[0]:.4f} (1 step)"
    head, tail = (first[:50], last) if len(first) >= 100 else (first[: len(first) // 2], first[len(first) // 2:])
    return (f"loss: first {len(head)} steps avg {sum(head) / len(head):.4f} -> "
            f"last {len(tail)} steps avg {sum(tail) / len(tail):.4f}")


def finish(run: Run) -> None:
    """The final LoRA pair -- or, after a graceful stop before the last step,
    a resume checkpoint of the current step instead (final names mean done)."""
    if run.step < run.profile.training.steps:
        paths = save_on_stop(run)
        log.info("stopped at step %d of %d; resume state in %s", run.step, run.profile.training.steps, paths["state"])
        return
    paths = save_final(run)
    log.info("wrote %s", ", ".join(paths.values()))


def train_step(run: Run) -> dict | None:
    """One optimizer step: gradient accumulation over micro-batches, clipping,
    the optimizer and schedule, then ``on_step``. None: the step was skipped
    (a nan/inf loss or gradient, ``on_nonfinite = "skip"``)."""
    t0 = time.perf_counter()
    hook, tcfg = run.pm.hook, run.profile.training
    expert = hook.select_expert(run=run, step=run.step)
    if expert != run.active_expert:
        hook.before_expert_switch(run=run, old=run.active_expert, new=expert)
        old, run.active_expert = run.active_expert, expert
        hook.after_expert_switch(run=run, old=old, new=expert)
    sums: dict[str, torch.Tensor] = {}
    for _ in range(tcfg.gradient_accumulation):
        batch = run.data.next_batch(tcfg.batch_size)
        for key, value in micro_step(run, expert, batch).items():
            sums[key] = sums.get(key, 0.0) + value / tcfg.gradient_accumulation
    sums = reduce_step(run, expert, sums)  # torchrun: LoRA gradients and losses averaged over the ranks
    sums = {key: float(value) for key, value in sums.items()}  # one device sync per step
    params = run.lora_parameters[expert]
    max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else float("inf")
    run.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not (math.isfinite(sums["loss"]) and math.isfinite(run.grad_norm)):  # the floats above: no extra sync
        return skip_or_stop(run, sums["loss"])
    hook.before_optimizer_step(run=run)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    hook.after_optimizer_step(run=run)
    run.step += 1
    seconds = time.perf_counter() - t0
    metrics = {
        **sums,
        f"loss/{expert}": sums["loss"],
        "lr": effective_lr(run.optimizer, params),  # prodigy: d * lr
        "grad_norm": run.grad_norm,
        "expert": expert,
        "step_time": seconds,
        "samples_per_second": tcfg.batch_size * tcfg.gradient_accumulation * data_world() / seconds,
        "peak_memory_gb": peak_memory_gb(run.device),
    }
    run.last_metrics = metrics
    hook.on_step(run=run, step=run.step, metrics=metrics)
    return metrics


def skip_or_stop(run: Run, loss: float) -> None:
    """A nan/inf loss or gradient norm: the update is dropped (weights, optimizer, schedule, step
    count untouched); ``on_nonfinite`` "stop" ends the run, "skip" retries on the next batch."""
    tcfg, run.nonfinite_steps = run.profile.training, run.nonfinite_steps + 1
    run.optimizer.zero_grad(set_to_none=True)
    what, most = f"non-finite loss ({loss}) or gradient norm ({run.grad_norm})", tcfg.max_nonfinite_steps
    if tcfg.on_nonfinite == "skip" and run.nonfinite_steps <= most:
        log.warning("step %d: %s; skipped (%d of at most %d)", run.step + 1, what, run.nonfinite_steps, most)
        return None
    what += f", more than training.max_nonfinite_steps = {most} skipped" if tcfg.on_nonfinite == "skip" else ""
    raise WantrainError(ProfileProblem(
        f"step {run.step + 1}", f"{what}; the run stopped without applying it, earlier checkpoints are intact",
        fix='lower training.lr and resume from the last checkpoint (training.on_nonfinite = "skip" skips such steps)'))


def micro_step(run: Run, expert: str, batch) -> dict[str, torch.Tensor]:
    """Forward + losses + backward for one micro-batch; returns detached losses
    (tensors: no device sync here)."""
    hook = run.pm.hook
    latents = run.encode_videos(batch).to(run.device, torch.float32)
    text_states = run.encode_prompts(batch.captions)
    drawn = drawn_rows(batch, latents.shape[0])  # torchrun: draw for the global batch, keep this rank's rows
    timesteps = hook.sample_timesteps(run=run, expert=expert, batch_size=drawn, generator=run.generator)
    noise = my_rows(batch, torch.randn((drawn, *latents.shape[1:]), generator=run.generator)).to(run.device)
    timesteps = my_rows(batch, timesteps).to(run.device)
    use = my_rows(batch, draw_start_frames(run.arch, run.profile.model, drawn, run.generator))
    cond = run.encode_condition(batch, (latents.shape[2] - 1) * run.arch.vae_temporal + 1, use)
    noisy = flow.add_noise(latents, noise, timesteps)
    pred = run.predict(expert, noisy, timesteps, text_states, cond)
    target = flow.velocity_target(latents, noise)
    new_target = hook.compute_target(run=run, batch=batch, pred=pred, target=target)
    if new_target is not None:
        target = new_target
    main = flow.flow_loss(pred, target, run.profile.training.loss, cond.loss_weight())
    if batch.prior_loss_weight is not None:  # prior preservation: a regularization dataset's loss at its weight
        main = main * batch.prior_loss_weight
    ctx = StepContext(expert=expert, latents=latents, noise=noise, noisy=noisy, timesteps=timesteps,
                      text_states=text_states, pred=pred, target=target, loss=main, cond=cond)
    extras = {k: v for found in hook.compute_extra_losses(run=run, batch=batch, ctx=ctx) for k, v in (found or {}).items()}
    total = main + sum(extras.values()) if extras else main
    (total * loss_weight(batch) / run.profile.training.gradient_accumulation).backward()
    out = {"loss": total.detach(), "loss/main": main.detach()}
    out.update({f"loss/{k}": v.detach() for k, v in extras.items()})
    if batch.prior_loss_weight is not None:
        out["loss/regularization"] = main.detach()
    return out
