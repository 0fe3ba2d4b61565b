"""TensorBoard logging: ``tensorboard --logdir <output_dir>/tensorboard``.

What is written (tags):

- scalars, every ``every`` steps -- ``loss/total``, ``loss/<expert>`` (the
  loss of the expert that trained that step), ``loss/main`` and every extra
  loss (``loss/<name>``, e.g. the preservation loss of ``dop``),
  ``train/lr``, ``train/grad_norm`` (before clipping),
  ``train/active_expert`` (1 = high_noise, 0 = low_noise),
  ``perf/step_time`` (s), ``perf/samples_per_second``,
  ``perf/peak_memory_gb`` (CUDA max allocated, or the process's peak RSS on
  a CPU, GiB); any other numeric metric a plugin adds as ``train/<name>``;
- histograms ``timesteps/high_noise`` and ``timesteps/low_noise``: the
  training timesteps drawn since the last histogram, every
  ``histogram_every`` steps (and at the end);
- text ``profile``: the resolved profile (TOML);
- images ``samples/<i>`` at each preview step (``samples/<i>_base`` for the
  base render): a strip of the first, middle and last frame of preview ``i``.

Events: ``on_run_start`` (opens the writer, writes the profile),
``sample_timesteps`` (wrapper: records what the answering plugin drew, never
answers itself), ``on_step`` (scalars, histograms), ``generate_samples``
(wrapper: reads back the returned ``.mp4`` files), ``on_save`` (flush),
``on_run_end`` / ``on_exception`` (flush and close).

On resume the writer purges events from the resumed step on, so a crashed
run's tail does not overlap the continued one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import attrs
import numpy as np
import torch

from wantrain import distributed, hookimpl
from wantrain.data.media import probe_video, read_frames
from wantrain.profile import positive
from wantrain.run import Run

log = logging.getLogger("wantrain.tensorboard")

#: kernel metric -> tag; ``loss/...`` keys keep their name
SCALAR_TAGS = {
    "loss": "loss/total",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "step_time": "perf/step_time",
    "samples_per_second": "perf/samples_per_second",
    "peak_memory_gb": "perf/peak_memory_gb",
}
EXPERT_VALUE = {"high_noise": 1.0, "low_noise": 0.0}


@attrs.frozen(kw_only=True)
class Config:
    every: int = attrs.field(default=1, validator=positive)  # scalars every N steps
    histogram_every: int = attrs.field(default=50, validator=positive)  # timestep histograms every N steps
    images: bool = True  # frame strips of the preview videos
    flush_seconds: int = attrs.field(default=30, validator=positive)  # how stale the files on disk may get


def scalars(metrics: dict) -> dict[str, float]:
    """The tags and values logged for one step's ``metrics``."""
    out = {}
    for key, value in metrics.items():
        if key == "expert":
            if value in EXPERT_VALUE:
                out["train/active_expert"] = EXPERT_VALUE[value]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        elif key in SCALAR_TAGS:
            out[SCALAR_TAGS[key]] = float(value)
        else:
            out[key if "/" in key else f"train/{key}"] = float(value)
    return out


def frame_strip(path: str | Path, gap: int = 2) -> np.ndarray:
    """First, middle and last frame of a clip side by side, uint8 ``[H, W', 3]``."""
    count = probe_video(path).num_frames
    frames = read_frames(path, sorted({0, (count - 1) // 2, count - 1}))
    height = frames.shape[1]
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    parts = []
    for frame in frames:
        parts += [frame, spacer]
    return np.concatenate(parts[:-1], axis=1)


def image_tag(path: str | Path) -> str:
    """``samples/step_000000300/1.mp4`` -> ``samples/1``; ``samples/base/1.mp4`` -> ``samples/1_base``."""
    path = Path(path)
    return f"samples/{path.stem}_base" if path.parent.name == "base" else f"samples/{path.stem}"


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.writer = None
        self.timesteps: dict[str, list[torch.Tensor]] = {}

    @hookimpl(tryfirst=True)  # open before `sample` renders its at_start previews in its on_run_start
    def on_run_start(self, run):
        from torch.utils.tensorboard import SummaryWriter

        if distributed.rank():  # under torchrun rank 0 alone writes events
            return

        logdir = run.output_dir / "tensorboard"
        # resumed at step N: events of steps > N (written after the checkpoint,
        # before the crash) are dropped; step N's own are kept
        self.writer = SummaryWriter(str(logdir), purge_step=run.step + 1 if run.step else None,
                                    flush_secs=self.config.flush_seconds)
        text = "\n".join("    " + line for line in run.profile.to_toml().splitlines())  # markdown code block
        self.writer.add_text("profile", text, run.step)
        log.info("TensorBoard: tensorboard --logdir %s", logdir)

    @hookimpl(wrapper=True)
    def sample_timesteps(self, expert):
        result = yield
        if result is not None and self.writer is not None:  # kept as is (maybe on the GPU): no sync per step; rank 0 alone
            self.timesteps.setdefault(expert, []).append(result.detach().clone())
        return result

    @hookimpl
    def on_step(self, run: Run, step, metrics):
        if self.writer is None:
            return
        if step % self.config.every == 0:
            for tag, value in scalars(metrics).items():
                self.writer.add_scalar(tag, value, step)
        if step % self.config.histogram_every == 0:
            self.write_histograms(step)

    def write_histograms(self, step: int) -> None:
        for expert, drawn in sorted(self.timesteps.items()):
            if drawn:
                values = torch.cat([t.flatten().float().cpu() for t in drawn])
                self.writer.add_histogram(f"timesteps/{expert}", values, step)
        self.timesteps = {}

    @hookimpl(wrapper=True)
    def generate_samples(self, step):
        paths = yield
        if self.writer is not None and self.config.images:
            for path in paths or []:
                try:
                    self.writer.add_image(image_tag(path), frame_strip(path), step, dataformats="HWC")
                except Exception as exc:  # noqa: BLE001 - a preview that cannot be read never stops training
                    log.warning("TensorBoard: cannot read preview %s (%s)", path, exc)
            self.writer.flush()
        return paths

    @hookimpl
    def on_save(self):
        if self.writer is not None:
            self.writer.flush()

    @hookimpl
    def on_run_end(self, run: Run):
        self.close(run.step)

    @hookimpl
    def on_exception(self, run: Run):
        try:
            self.close(run.step)
        except Exception as exc:  # noqa: BLE001 - on_exception must not raise
            log.warning("TensorBoard: could not close the event file (%s)", exc)

    def close(self, step: int) -> None:
        if self.writer is None:
            return
        if any(self.timesteps.values()):
            self.write_histograms(step)
        self.writer.close()
        self.writer = None
