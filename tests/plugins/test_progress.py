"""The progress plugin: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest

from wantrain.loop import train
from wantrain.plugins.progress import Config, Plugin, Tracker, format_duration, log_due
from wantrain.profile import load_profile


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _drive(config: Config, steps: int, stream=None, seconds_per_step: float = 0.5, start: int = 0):
    plugin = Plugin(config)
    plugin.clock = clock = _Clock()
    if stream is not None:
        plugin.stream = stream
    run = SimpleNamespace(profile=SimpleNamespace(training=SimpleNamespace(steps=steps)), step=start)
    plugin.on_run_start(run=run)
    for step in range(start + 1, steps + 1):
        clock.now += seconds_per_step
        expert = "high_noise" if step % 2 else "low_noise"
        plugin.on_step(run=run, step=step, metrics={"loss": 1.0 / step, "expert": expert, "step_time": seconds_per_step})
    plugin.on_run_end()
    return plugin


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "wantrain.progress"]


def test_log_lines_every_ten_percent_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="wantrain.progress")
    _drive(Config(log_every_seconds=1e6), 20, stream=io.StringIO())
    lines = _lines(caplog)
    assert [line.split(" ")[1] for line in lines] == [f"{s}/20" for s in range(2, 21, 2)]
    assert lines[0] == "step 2/20 (10%) | loss 0.9500 | low_noise | 0.50 s/step | ETA 9s"
    assert lines[-1].startswith("step 20/20 (100%) |") and lines[-1].endswith("ETA 0s")


def test_log_lines_every_n_seconds_on_long_steps(caplog):
    caplog.set_level(logging.INFO, logger="wantrain.progress")
    _drive(Config(log_every_percent=100, log_every_seconds=5), 12, stream=io.StringIO(), seconds_per_step=1.0)
    assert [line.split(" ")[1] for line in _lines(caplog)] == ["5/12", "10/12", "12/12"]


def test_bar_on_a_terminal(caplog):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    caplog.set_level(logging.INFO, logger="wantrain.progress")
    stream = Tty()
    root_handlers = list(logging.getLogger().handlers)
    plugin = _drive(Config(), 8, stream=stream)
    text = stream.getvalue()
    assert text.rstrip().endswith("100%|##########| 8/8, loss 0.5944 | low_noise | 0.50 s/step | ETA 0s")
    assert _lines(caplog) == []  # the bar replaces the log lines
    assert plugin.bar is None and logging.getLogger().handlers == root_handlers  # closed, logging restored


def test_mode_picks_bar_or_log():
    tty = SimpleNamespace(isatty=lambda: True)
    pipe = SimpleNamespace(isatty=lambda: False)
    for mode, stream, expected in [("auto", tty, True), ("auto", pipe, False), ("bar", pipe, True), ("log", tty, False)]:
        plugin = Plugin(Config(mode=mode))
        plugin.stream = stream
        assert plugin.use_bar() is expected, (mode, expected)


def test_smoothing_and_eta():
    tracker = Tracker(total=10, smoothing=0.5)
    tracker.start(0.0)
    tracker.update({"loss": 1.0, "expert": "high_noise", "step_time": 2.0}, 3.0)  # first step: the kernel's step_time
    assert (tracker.loss, tracker.seconds_per_step) == (1.0, 2.0)
    tracker.update({"loss": 0.0, "expert": "low_noise"}, 7.0)  # then wall time between steps (4 s)
    assert (tracker.loss, tracker.seconds_per_step) == (0.5, 3.0)
    assert tracker.eta(2) == 24.0
    assert tracker.status(2) == "loss 0.5000 | low_noise | 3.00 s/step | ETA 24s"


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3725, "1h02m")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_resumed_run_counts_from_the_resumed_step(caplog):
    caplog.set_level(logging.INFO, logger="wantrain.progress")
    _drive(Config(log_every_seconds=1e6), 20, stream=io.StringIO(), start=10)
    assert [line.split(" ")[1] for line in _lines(caplog)] == [f"{s}/20" for s in range(12, 21, 2)]
    assert not log_due(Config(), 11, 20, 10, 0.0, 1.0)


def test_real_run_logs_progress(profile_data, caplog):
    caplog.set_level(logging.INFO, logger="wantrain.progress")
    profile_data["plugins"] = {"enabled": ["progress"], "progress": {"log_every_percent": 50}}
    train(load_profile(data=profile_data))
    lines = _lines(caplog)
    assert [line.split(" (")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert "high_noise" in lines[0] or "low_noise" in lines[0]
    loss = float(lines[-1].split("loss ")[1].split(" ")[0])
    assert 0 < loss < 10


def test_bar_says_when_previews_render():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    plugin = Plugin(Config())
    plugin.stream = stream = Tty()
    run = SimpleNamespace(profile=SimpleNamespace(training=SimpleNamespace(steps=4)), step=0)
    plugin.on_run_start(run=run)
    around = plugin.generate_samples()
    next(around)  # the previews render here
    assert "rendering previews: " in stream.getvalue().splitlines()[-1].split("\r")[-1]
    with pytest.raises(StopIteration) as done:
        around.send(["samples/step_000000001/0.mp4"])
    assert done.value.value == ["samples/step_000000001/0.mp4"]  # the renderer's answer passes through
    assert not stream.getvalue().split("\r")[-1].startswith("rendering")  # the bar is itself again
    plugin.on_run_end()


def test_without_a_bar_previews_pass_through():
    plugin = Plugin(Config(mode="log"))
    around = plugin.generate_samples()
    next(around)
    with pytest.raises(StopIteration) as done:
        around.send(["a.mp4"])
    assert done.value.value == ["a.mp4"]


def test_long_work_gets_a_nested_bar_that_closes():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    plugin = Plugin(Config())
    plugin.stream = stream
    for done in range(4):
        plugin.on_progress(task="caching latents", done=done, total=3)
        if done < 3:
            assert "caching latents" in plugin.tasks  # open while the task runs
    assert plugin.tasks == {}  # done == total closes it
    text = stream.getvalue()
    assert "caching latents:   0%" in text and "0/3" in text  # drawn, then cleared (leave=False) when done


def test_long_work_in_log_mode_is_a_start_and_an_end_line(caplog):
    caplog.set_level(logging.INFO, logger="wantrain.progress")
    plugin = Plugin(Config(mode="log"))
    ticks = iter([10.0, 12.5])
    plugin.clock = lambda: next(ticks)
    for done in range(3):
        plugin.on_progress(task="caching text states", done=done, total=2)
    assert [r.getMessage() for r in caplog.records] == ["caching text states: 2 to do", "caching text states: 2 done in 2.5 s"]


def test_caches_and_previews_report_their_progress(profile_data, tmp_path):
    """A real run: the text cache, the latent cache and the preview sampler
    each fire on_progress from 0 up to their total."""
    (tmp_path / "rec_progress.py").write_text(
        "from wantrain import hookimpl\n\nseen = []\n\n"
        "@hookimpl\n"
        "def on_progress(task, done, total):\n"
        "    seen.append((task, done, total))\n")
    profile_data["datasets"][0]["cache_latents"] = True
    profile_data["training"]["steps"] = 2
    profile_data["plugins"] = {
        "enabled": ["text_cache", "latent_cache", "sample", str(tmp_path / "rec_progress.py")],
        "sample": {"prompts": ["a cat"], "steps": 2, "num_frames": 5, "width": 32, "height": 32, "every": 0,
                   "at_start": False, "guidance_high": 1.0, "guidance_low": 1.0}}
    run = train(load_profile(data=profile_data))
    seen = run.pm.get_plugin(str(tmp_path / "rec_progress.py")).seen
    for task in ("caching text states", "caching latents", "rendering previews"):
        mine = [(d, t) for name, d, t in seen if name == task]
        assert mine, task
        # one or more runs of the task, each from 0 up to its total, only forward
        starts = [i for i, (d, _) in enumerate(mine) if d == 0] + [len(mine)]
        for a, b in zip(starts, starts[1:]):
            one = mine[a:b]
            total = one[0][1]
            assert one[-1] == (total, total) and [d for d, _ in one] == sorted(d for d, _ in one), (task, mine)
