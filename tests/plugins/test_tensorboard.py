"""The tensorboard plugin: event files read back with TensorBoard's own reader."""

from __future__ import annotations

import copy
import io
import textwrap

import numpy as np
import pluggy
import pytest
import torch
from PIL import Image

from wantrain import PROJECT, hookimpl, hookspecs
from wantrain.loop import train
from wantrain.plugins.tensorboard import Config, Plugin, frame_strip, image_tag, scalars
from wantrain.profile import load_profile

EXTRA_LOSS = textwrap.dedent(
    """
    from wantrain import hookimpl

    class Plugin:
        def __init__(self):
            self.metrics = []

        @hookimpl
        def on_step(self, metrics):
            self.metrics.append(dict(metrics))

        @hookimpl
        def compute_extra_losses(self, ctx):
            return {"preservation": 0.01 * ctx.pred.pow(2).mean()}
    """
)

KERNEL_TAGS = {
    "loss/total", "loss/main", "loss/high_noise", "loss/low_noise", "loss/preservation",
    "train/lr", "train/grad_norm", "train/active_expert",
    "perf/step_time", "perf/samples_per_second", "perf/peak_memory_gb",
}


@pytest.fixture(scope="module")
def logged(tiny_model, demo_data, tmp_path_factory):
    """4 steps with tensorboard, previews (base at start, step 2 and 4) and an extra loss."""
    from conftest import BASE_PROFILE
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path_factory.mktemp("tb")
    (root / "extra.py").write_text(EXTRA_LOSS)
    data = copy.deepcopy(BASE_PROFILE)
    data["job"]["output_dir"] = str(root / "out")
    data["model"]["name_or_path"] = str(tiny_model)
    data["datasets"][0]["folder"] = str(demo_data)
    data["plugins"] = {
        "enabled": ["tensorboard", "sample", str(root / "extra.py")],
        "tensorboard": {"histogram_every": 2},
        "sample": {"prompts": ["a [trigger] clip"], "width": 48, "height": 32, "num_frames": 5, "steps": 2, "every": 2},
    }
    run = train(load_profile(data=data))
    metrics = run.pm.get_plugin(str(root / "extra.py")).metrics
    acc = EventAccumulator(str(run.output_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return run, acc, metrics


def test_scalars_hold_the_step_metrics(logged):
    run, acc, metrics = logged
    assert KERNEL_TAGS <= set(acc.Tags()["scalars"])
    total = acc.Scalars("loss/total")
    assert [e.step for e in total] == [1, 2, 3, 4]
    assert [e.value for e in total] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in acc.Scalars("loss/preservation")] == pytest.approx([m["loss/preservation"] for m in metrics], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/active_expert")] == [1.0, 0.0, 1.0, 0.0]  # kernel alternates, high first
    assert [e.step for e in acc.Scalars("loss/high_noise")] == [1, 3]
    assert [e.step for e in acc.Scalars("loss/low_noise")] == [2, 4]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3] * 4)
    assert all(e.value > 0 for e in acc.Scalars("perf/peak_memory_gb"))
    assert [e.value for e in acc.Scalars("train/grad_norm")] == pytest.approx([m["grad_norm"] for m in metrics], rel=1e-6)


def test_timestep_histograms_per_expert(logged):
    _, acc, _ = logged
    assert {"timesteps/high_noise", "timesteps/low_noise"} <= set(acc.Tags()["histograms"])
    high = acc.Histograms("timesteps/high_noise")
    low = acc.Histograms("timesteps/low_noise")
    assert [e.step for e in high] == [2, 4] and [e.step for e in low] == [2, 4]
    for e in high:
        assert e.histogram_value.num == 1 and 875 <= e.histogram_value.min <= e.histogram_value.max <= 1000
    for e in low:
        assert e.histogram_value.num == 1 and 0 <= e.histogram_value.min <= e.histogram_value.max < 875


def test_profile_text_and_frame_strips(logged):
    run, acc, _ = logged
    text = acc.Tensors("profile/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'name = "t"' in text and "[plugins.sample]" in text
    assert set(acc.Tags()["images"]) == {"samples/0", "samples/0_base"}
    assert [e.step for e in acc.Images("samples/0_base")] == [0]
    images = acc.Images("samples/0")
    assert [e.step for e in images] == [2, 4]
    strip = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
    assert strip.shape == (32, 3 * 48 + 2 * 2, 3)
    expected = frame_strip(run.output_dir / "samples" / "step_000000004" / "0.mp4")
    assert np.array_equal(strip, expected)


def test_scalar_tags():
    got = scalars({"loss": 1.5, "loss/low_noise": 1.5, "loss/main": 1.0, "lr": 1e-4, "grad_norm": 2.0,
                   "expert": "low_noise", "step_time": 0.5, "samples_per_second": 2.0, "peak_memory_gb": 3.0,
                   "ema_decay": 0.99, "note": "text", "flag": True})
    assert got == {"loss/total": 1.5, "loss/low_noise": 1.5, "loss/main": 1.0, "train/lr": 1e-4,
                   "train/grad_norm": 2.0, "train/active_expert": 0.0, "perf/step_time": 0.5,
                   "perf/samples_per_second": 2.0, "perf/peak_memory_gb": 3.0, "train/ema_decay": 0.99}


def test_image_tags():
    assert image_tag("out/samples/step_000000300/1.mp4") == "samples/1"
    assert image_tag("out/samples/base/1.mp4") == "samples/1_base"


class _FixedTimesteps:
    @hookimpl
    def sample_timesteps(self, expert, batch_size):
        return torch.full((batch_size,), 900.0 if expert == "high_noise" else 100.0)


def test_timestep_wrapper_records_the_answer_and_never_answers():
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    plugin = Plugin(Config())
    pm.register(_FixedTimesteps(), name="timesteps")
    pm.register(plugin, name="tensorboard")
    g = torch.Generator().manual_seed(0)
    pm.hook.sample_timesteps(run=None, expert="high_noise", batch_size=3, generator=g)
    assert plugin.timesteps == {}  # no writer (a rank > 0 under torchrun): nothing kept, step after step
    plugin.writer = object()  # rank 0's writer (on_step reads the kept draws)
    got = pm.hook.sample_timesteps(run=None, expert="high_noise", batch_size=3, generator=g)
    pm.hook.sample_timesteps(run=None, expert="low_noise", batch_size=2, generator=g)
    assert got.tolist() == [900.0] * 3
    assert {k: torch.cat(v).tolist() for k, v in plugin.timesteps.items()} == {"high_noise": [900.0] * 3, "low_noise": [100.0] * 2}
    pm.unregister(name="timesteps")
    assert pm.hook.sample_timesteps(run=None, expert="high_noise", batch_size=1, generator=g) is None


CRASH_ONCE = textwrap.dedent(
    """
    import os
    from wantrain import hookimpl

    class Plugin:
        @hookimpl(trylast=True)  # after tensorboard has logged the step
        def on_step(self, step):
            if step == 3 and os.path.exists(os.environ["WANTRAIN_TEST_CRASH"]):
                os.remove(os.environ["WANTRAIN_TEST_CRASH"])
                raise RuntimeError("simulated crash after step 3")
    """
)


def test_a_resumed_curve_is_continuous_without_duplicates(profile_data, tmp_path, monkeypatch):
    """Checkpoint at 2, crash after 3 was logged, resume from 2: the curve is
    1, 2, 3, 4 -- the checkpoint's own step kept, the lost step 3 replaced."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "crash.py").write_text(CRASH_ONCE)
    marker = tmp_path / "crash-once"
    marker.write_text("")
    monkeypatch.setenv("WANTRAIN_TEST_CRASH", str(marker))
    profile_data["plugins"] = {"enabled": ["tensorboard", "checkpoints", str(tmp_path / "crash.py")],
                               "checkpoints": {"every": 2, "dtype": "fp32"}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_profile(data=profile_data))
    run = train(load_profile(data=profile_data), resume="auto")
    assert run.step == 4
    acc = EventAccumulator(str(run.output_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3, 4]
