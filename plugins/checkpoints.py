"""Periodic checkpoints that never lose work (``[plugins.checkpoints]``).

Every ``every`` steps (and at the last step, and when a graceful stop was
asked for) it writes one *save*:

- the LoRA pair ``<name>_<step:09d>_high_noise.safetensors`` /
  ``_low_noise.safetensors`` in ``dtype`` (through the ``write_lora`` event,
  so EMA's wrapper puts its weights in), and
- the resume state ``checkpoints/step_<step:09d>/`` (fp32 LoRA weights,
  optimizer, LR schedule, RNG states, data position, every plugin's
  ``state_dict``).

The writing itself is the kernel's (``wantrain.resume.save_checkpoint``):
each file goes to a temporary name, is fsynced and renamed; the state folder
is renamed into place last, which is the commit point. A kill at any
instant leaves the earlier checkpoints intact and never a half-written one
that resume could pick; a full disk stops the run with one error line and
removes what the failed save wrote.

After each save (``on_save`` with a ``"state"`` path) the folder is rotated:
the newest ``keep`` saves *of the run's lineage* (``run.lineage``) stay --
LoRA pair and state together -- older ones go (the state folder first, so a
half-rotated save is never resumable). Another lineage's saves (an abandoned
run that this one forked from, docs/checkpoints.md) and the final files
(``<name>_high_noise.safetensors``) are never touched.

Config keys: ``every`` (steps between saves, default 250), ``keep``
(saves kept, default 4; 0 keeps all), ``dtype`` (the pair's dtype: "bf16",
"fp16" or "fp32"; default "bf16"; resume state is always fp32).

Events: ``on_step`` (trylast), ``on_save``. Resuming is the kernel's:
``wantrain run`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import attrs

from wantrain import hookimpl, resume
from wantrain.profile import non_negative, one_of, positive
from wantrain.run import Run

log = logging.getLogger("wantrain.checkpoints")


@attrs.frozen(kw_only=True)
class Config:
    #: steps between saves
    every: int = attrs.field(default=250, validator=positive)
    #: newest saves kept (LoRA pair + resume state together); 0 keeps all
    keep: int = attrs.field(default=4, validator=non_negative)
    #: dtype of the checkpoint's LoRA pair (resume state is always fp32)
    dtype: str = attrs.field(default="bf16", validator=one_of("bf16", "fp16", "fp32"))


def is_due(step: int, total: int, every: int, stop_requested: bool) -> bool:
    """A save at every ``every``-th step, at the last step, and on a graceful stop."""
    return step % every == 0 or step == total or stop_requested


def rotate(output_dir: Path, name: str, keep: int, tag: str = "") -> list[int]:
    """Delete all but the newest ``keep`` complete saves of the lineage named
    ``tag`` ("" = the folder's first); return the steps removed."""
    saves = resume.list_checkpoints(output_dir, tag)
    if keep == 0 or len(saves) <= keep:
        return []
    removed = []
    for step, folder in saves[:-keep]:
        doomed = folder.with_name(f".{folder.name}.deleting")
        folder.rename(doomed)  # no longer a resume candidate from this instant on
        for path in resume.step_files(output_dir, name, step, tag):
            path.unlink(missing_ok=True)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(step)
    log.info("checkpoints: removed step %s (keep = %d)", ", ".join(map(str, removed)), keep)
    return removed


class Plugin:
    def __init__(self, config: Config):
        self.config = config

    # trylast: after `sample` and any other on_step impl that may draw from the
    # global RNG, so the saved RNG state is exactly what the next step sees
    @hookimpl(trylast=True)
    def on_step(self, run: Run, step):
        if is_due(step, run.profile.training.steps, self.config.every, run.stop_requested):
            paths = resume.save_checkpoint(run, step, dtype=self.config.dtype)
            log.info("checkpoint step %d: %s", step, ", ".join(Path(p).name for p in paths.values()))

    @hookimpl
    def on_save(self, run: Run, step, paths):
        if "state" in paths:
            rotate(run.output_dir, run.name, self.config.keep, run.lineage.tag)
