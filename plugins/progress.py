"""One progress bar for the run: step/total, smoothed loss, active expert,
s/step and ETA::

     42%|████████▍           | 252/600, loss 0.0831 | high_noise | 0.21 s/step | ETA 1m13s

When stderr is not a terminal (a log file, CI, ``nohup``), plain log lines
are written instead, every ``log_every_percent`` of the run or every
``log_every_seconds``, whichever comes first, and at the last step::

    12:00:01 I wantrain.progress: step 60/600 (10%) | loss 0.0912 | low_noise | 0.20 s/step | ETA 1m48s

Loss and s/step are exponential moving averages (``smoothing``); s/step is
wall-clock time between completed steps, so previews and saves count toward
the ETA. While the bar is shown, log records are printed above it.

Long work outside the step -- caching text states and latents, rendering
previews -- gets a nested bar under the step bar (``on_progress``; a line
when it starts and one when it ends in log mode).

Events: ``on_run_start`` (opens the bar), ``on_step`` (advances it),
``on_progress`` (nested bars), ``generate_samples`` (a wrapper: the bar
reads "rendering previews" while they render), ``on_run_end`` /
``on_exception`` (closes it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import attrs

from wantrain import distributed, hookimpl
from wantrain.profile import in_range, one_of, positive
from wantrain.run import Run

log = logging.getLogger("wantrain.progress")

BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"  # tqdm puts ", " before the postfix


@attrs.frozen(kw_only=True)
class Config:
    mode: str = attrs.field(default="auto", validator=one_of("auto", "bar", "log"))  # auto: bar on a terminal
    log_every_percent: float = attrs.field(default=10.0, validator=in_range(0.0, 100.0, lo_open=True))
    log_every_seconds: float = attrs.field(default=60.0, validator=positive)
    smoothing: float = attrs.field(default=0.9, validator=in_range(0.0, 1.0, hi_open=True))  # 0 = no smoothing


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@attrs.define
class Tracker:
    """Smoothed loss and step rate, and the status text built from them."""

    total: int
    smoothing: float = 0.9
    loss: float | None = None
    seconds_per_step: float | None = None
    expert: str = ""
    last_time: float | None = None

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.smoothing * old + (1 - self.smoothing) * new

    def start(self, now: float) -> None:
        self.last_time = now

    def update(self, metrics: dict, now: float) -> None:
        self.loss = self._smooth(self.loss, float(metrics["loss"]))
        self.expert = str(metrics.get("expert", ""))
        took = now - self.last_time if self.last_time is not None and self.seconds_per_step is not None else float(metrics.get("step_time", 0.0))
        self.seconds_per_step = self._smooth(self.seconds_per_step, took)
        self.last_time = now

    def eta(self, step: int) -> float:
        return max(0, self.total - step) * (self.seconds_per_step or 0.0)

    def status(self, step: int) -> str:
        parts = [f"loss {self.loss:.4f}" if self.loss is not None else "loss -"]
        if self.expert:
            parts.append(self.expert)
        if self.seconds_per_step is not None:
            parts += [f"{self.seconds_per_step:.2f} s/step", f"ETA {format_duration(self.eta(step))}"]
        return " | ".join(parts)

    def line(self, step: int) -> str:
        return f"step {step}/{self.total} ({100 * step / self.total:.0f}%) | {self.status(step)}"


def log_due(config: Config, step: int, total: int, last_step: int, last_time: float, now: float) -> bool:
    """Whether a plain log line is due at ``step`` (the last one was at ``last_step``, ``last_time``)."""
    if step >= total:
        return True
    every = max(1.0, total * config.log_every_percent / 100)
    return int(step // every) > int(last_step // every) or now - last_time >= config.log_every_seconds


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.stream = sys.stderr  # tests point this elsewhere
        self.clock = time.monotonic
        self.tracker: Tracker | None = None
        self.bar = None
        self._redirect: contextlib.ExitStack | None = None
        self._last_log = (0, 0.0)
        #: task label -> its nested bar (bar mode) or its start time (log mode)
        self.tasks: dict[str, object] = {}

    def use_bar(self) -> bool:
        if self.config.mode != "auto":
            return self.config.mode == "bar"
        return bool(getattr(self.stream, "isatty", lambda: False)())

    @hookimpl
    def on_run_start(self, run: Run):
        if distributed.rank():  # under torchrun rank 0 alone shows progress
            return
        total = run.profile.training.steps
        self.tracker = Tracker(total=total, smoothing=self.config.smoothing)
        self.tracker.start(self.clock())
        self._last_log = (run.step, self.clock())
        if self.use_bar():
            self.open_bar(total, run.step)

    def open_bar(self, total: int, initial: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm())
        self.bar = tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True,
                        bar_format=BAR_FORMAT, smoothing=0)

    @hookimpl
    def on_step(self, run: Run, step, metrics):
        if self.tracker is None:
            return
        now = self.clock()
        self.tracker.update(metrics, now)
        if self.bar is not None:
            self.bar.set_postfix_str(self.tracker.status(step), refresh=False)
            self.bar.update(step - self.bar.n)
        elif log_due(self.config, step, self.tracker.total, *self._last_log, now):
            log.info("%s", self.tracker.line(step))
            self._last_log = (step, now)

    @hookimpl(wrapper=True)
    def generate_samples(self):
        """While previews render (minutes on a real model), the bar says so
        instead of looking stuck."""
        if self.bar is None:
            return (yield)
        self.bar.set_description_str("rendering previews: ", refresh=True)
        try:
            return (yield)
        finally:
            self.bar.set_description_str("", refresh=True)

    @hookimpl
    def on_progress(self, task, done, total):
        """A nested bar per task under the step bar (bar mode); a line when a
        task starts and one when it ends (log mode). Rank 0 alone under torchrun."""
        if total <= 0 or distributed.rank():
            return
        if self.use_bar():
            from tqdm import tqdm

            bar = self.tasks.get(task)
            if bar is None:
                bar = self.tasks[task] = tqdm(total=total, desc=task, file=self.stream, leave=False, position=1,
                                              dynamic_ncols=True, unit="it")
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
                del self.tasks[task]
        elif task not in self.tasks:
            self.tasks[task] = self.clock()
            log.info("%s: %d to do", task, total)
        elif done >= total:
            log.info("%s: %d done in %.1f s", task, total, self.clock() - self.tasks.pop(task))

    @hookimpl
    def on_run_end(self):
        self.close()

    @hookimpl
    def on_exception(self):
        self.close()

    def close(self) -> None:
        for bar in self.tasks.values():
            if hasattr(bar, "close"):
                bar.close()
        self.tasks.clear()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
