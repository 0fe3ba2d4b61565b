"""The training-feature plugins together, as users run them, and proof that
each acts only through events (recorded), with no imports between them or
from the kernel."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
import textwrap
from pathlib import Path

import pytest
import torch

from wantrain import lora
from wantrain.formats import safetensors as st
from wantrain.loop import train
from wantrain.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ["multistage", "timesteps", "text_cache", "dop", "diff_guidance", "ema"]
H, L = "high_noise", "low_noise"

RECORDER = textwrap.dedent("""
    import torch
    from wantrain import hookimpl, lora

    def snap(run):
        return {e: {k: v.clone() for k, v in lora.lora_state(run.experts[e]).items()} for e in run.trained}

    class Plugin:
        def __init__(self):
            self.forwards, self.at_steps, self.metrics = [0], [], []
            self.after_step, self.previewed, self.after_preview, self.expected_cut = [], [], [], None
        @hookimpl
        def after_text_encoder_load(self, run, module):
            module.register_forward_hook(lambda *a: self.forwards.__setitem__(0, self.forwards[0] + 1))
        @hookimpl
        def after_adapters_attached(self, run):
            self.initial = snap(run)
        @hookimpl
        def after_optimizer_step(self, run):
            self.after_step.append((run.active_expert, snap(run)))
        @hookimpl
        def generate_samples(self, run, step):  # sees the weights, lets `sample` render (returns None)
            self.previewed.append((step, snap(run)))
        @hookimpl(trylast=True)  # after `sample` rendered its previews
        def on_step(self, run, step, metrics):
            self.at_steps.append(self.forwards[0])
            self.metrics.append(dict(metrics))
            if self.previewed and self.previewed[-1][0] == step:
                self.after_preview.append(snap(run))
""")


def _train(profile_data, tmp_path, plugins: dict, steps: int, **training):
    rec = tmp_path / "rec_combo.py"
    rec.write_text(RECORDER)
    profile_data["training"].update(steps=steps, **training)
    profile_data["plugins"] = {"enabled": [*plugins, str(rec)], **{k: v for k, v in plugins.items() if v}}
    run = train(load_profile(data=profile_data))
    return run, run.pm.get_plugin(str(rec))


def _ema(initial, history, decay):
    shadow = {e: dict(s) for e, s in initial.items()}
    for expert, weights in history:
        shadow[expert] = {k: decay * v + (1 - decay) * weights[expert][k] for k, v in shadow[expert].items()}
    return shadow


SAMPLE = {"prompts": ["a [trigger] clip"], "num_frames": 5, "width": 32, "height": 32, "steps": 2,
          "every": 2, "at_start": False, "at_end": False}


@pytest.mark.parametrize("unload", [False, True])
def test_dop_with_text_cache_and_caption_dropout(profile_data, tmp_path, unload):
    """DOP's class captions and the dropped caption come from the cache: the
    encoder runs only before step 1 (with unload it is gone), and the
    preservation term is live."""
    profile_data["datasets"][0]["caption_dropout"] = 0.3
    run, rec = _train(profile_data, tmp_path, {"text_cache": {"unload": unload}, "dop": {"preservation_class": "person"}},
                      steps=3, batch_size=2)
    store = run.pm.get_plugin("text_cache").store
    texts = set(store.memory)
    assert "" in texts and any("person" in t for t in texts)
    if unload:
        assert run.text_encoder is None and texts == {"", "sks", "person"}
    else:
        templates = {i.template for ds in run.data.datasets for i in ds.items}
        assert {t.replace("[trigger]", "person") for t in templates} <= texts
    assert rec.at_steps[0] == rec.at_steps[-1]  # no encoder forward during training
    assert max(m["loss/preservation"] for m in rec.metrics) > 0
    assert all(m["loss"] == pytest.approx(m["loss/main"] + m["loss/preservation"], rel=1e-6) for m in rec.metrics)


def test_ema_with_multistage_and_sampling(profile_data, tmp_path):
    """Previews render with the EMA of each expert's own steps (the expert
    waiting for its turn keeps its average), then training continues on the
    raw weights; real preview files are written."""
    run, rec = _train(profile_data, tmp_path, {"multistage": {"switch_every": 3}, "ema": {"decay": 0.5}, "sample": SAMPLE},
                      steps=4)
    assert [m["expert"] for m in rec.metrics] == [H, H, H, L]
    assert run.pm.get_plugin("ema").shadow.updates == {H: 3, L: 1}
    step, seen = rec.previewed[0]
    assert step == 2
    expected = _ema(rec.initial, rec.after_step[:2], 0.5)
    for e in (H, L):
        for k, v in expected[e].items():
            torch.testing.assert_close(seen[e][k], v, rtol=1e-5, atol=1e-8)
            assert torch.equal(rec.after_preview[0][e][k], rec.after_step[1][1][e][k])  # raw restored
    assert all(torch.equal(seen[L][k], rec.initial[L][k]) for k in seen[L])  # low noise not trained yet
    assert any(not torch.equal(seen[H][k], rec.after_step[1][1][H][k]) for k in seen[H])  # EMA, not raw
    clips = list((run.output_dir / "samples" / "step_000000002").glob("*.mp4"))
    assert len(clips) == 1 and clips[0].stat().st_size > 0


def test_one_expert_trains_the_other_is_loaded_only_for_previews(profile_data, tmp_path):
    run, rec = _train(profile_data, tmp_path, {"multistage": {"low_noise": False}, "timesteps": {"type": "sigmoid", "bias": "high_noise"},
                                               "ema": {}, "sample": SAMPLE}, steps=2)
    assert run.trained == [H] and set(run.lora_parameters) == {H}
    assert set(run.pm.get_plugin("ema").shadow.tensors) == {H}
    assert set(rec.previewed[0][1]) == {H}
    # the preview needed the low-noise expert: loaded then, without an adapter or optimizer state
    assert L in run.experts and lora.lora_layers(run.experts[L]) == []
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == {id(p) for p in run.lora_parameters[H]}
    assert not (run.output_dir / "t_low_noise.safetensors").exists()


# ------------------------------------------------ purely through events


def test_every_feature_acts_through_events(profile_data, tmp_path, monkeypatch, caplog):
    """A recorded run with all six plugins: each of them answers its events
    (the trace of every event call names the plugins that implement it)."""
    monkeypatch.setenv("WANTRAIN_TRACE_HOOKS", "1")
    caplog.set_level(logging.INFO, logger="wantrain.hooks")
    profile_data["datasets"][0]["caption_dropout"] = 0.3
    config = {"multistage": {"switch_every": 2}, "timesteps": {"type": "shift"}, "text_cache": {},
              "dop": {}, "diff_guidance": {"scale": 2.0}, "ema": {"save": "both"}, "checkpoints": {"every": 2}, "sample": SAMPLE}
    _train(profile_data, tmp_path, config, steps=2)
    run, rec = _train(profile_data, tmp_path, config, steps=3)  # resumes from step 2: load_state_dict
    assert run.pm.get_plugin("multistage").position.expert == L
    calls: dict[str, set[str]] = {}
    for message in caplog.messages:
        m = re.match(r"event (\w+)\(.*\) -> \[(.*)\]", message)
        if m:
            calls.setdefault(m.group(1), set()).update(re.findall(r"'([^']+)'", m.group(2)))
    tools = {"estimate_memory"}  # wantrain estimate's event, not the training run's (tests/kernel/test_estimate.py)
    for name in FEATURES:
        implemented = [hook for hook in _hook_names(name) if hook not in tools]
        assert implemented, name
        missing = [hook for hook in implemented if name not in calls.get(hook, set())]
        assert not missing, f"{name}: {missing} never called"
    assert [m["expert"] for m in rec.metrics] == [L]  # step 3 of H, H, L
    assert {k for m in rec.metrics for k in m} >= {"loss/main", "loss/preservation"}
    assert (run.output_dir / "t_high_noise_raw.safetensors").is_file()


def _hook_names(plugin: str) -> list[str]:
    cls = importlib.import_module(f"wantrain.plugins.{plugin}").Plugin
    return [n for n, f in inspect.getmembers(cls, inspect.isfunction) if hasattr(f, "wantrain_impl")]


@pytest.mark.parametrize("plugin", FEATURES)
def test_a_plugin_is_only_event_handlers_and_imports_no_plugin(plugin):
    cls = importlib.import_module(f"wantrain.plugins.{plugin}").Plugin
    public = [n for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")]
    assert public and public == _hook_names(plugin), f"{plugin}: public methods that are not events"
    others = set(FEATURES) - {plugin} | {"sample", "checkpoints", "offload", "quantize", "latent_cache"}
    for node in ast.walk(ast.parse((ROOT / "plugins" / f"{plugin}.py").read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any(n.split(".")[-1] in others or "plugins." in n for n in names), f"{plugin} imports {names}"


def test_the_kernel_imports_no_plugin():
    for path in (ROOT / "kernel").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("wantrain.plugins", "plugins")), path.name
                assert not (node.level and (node.module or "").startswith("plugins")), path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("wantrain.plugins.") for a in node.names), path.name
        text = path.read_text()
        for name in FEATURES:
            assert f"plugins.{name}" not in text and f"plugins import {name}" not in text, (path.name, name)


def test_resume_continues_multistage_and_ema_bit_exactly(profile_data, tmp_path):
    """Stopped after step 2 of a 3-step turn and resumed: the same expert
    finishes its turn and the EMA and raw files equal an uninterrupted run's."""
    config = {"multistage": {"switch_every": 3}, "timesteps": {"type": "sigmoid"}, "ema": {"decay": 0.5, "save": "both"},
              "checkpoints": {"every": 2, "dtype": "fp32"}}
    out = profile_data["job"]["output_dir"]
    profile_data["job"]["output_dir"] = out + "_straight"
    straight, straight_rec = _train(profile_data, tmp_path, config, steps=4)
    profile_data["job"]["output_dir"] = out
    _train(profile_data, tmp_path, config, steps=2)
    resumed, rec = _train(profile_data, tmp_path, config, steps=4)
    assert [m["expert"] for m in straight_rec.metrics] == [H, H, H, L]
    assert [m["expert"] for m in rec.metrics] == [H, L]
    assert resumed.pm.get_plugin("ema").shadow.updates == {H: 3, L: 1}
    for name in ("t_high_noise", "t_low_noise", "t_high_noise_raw", "t_low_noise_raw"):
        a = st.read(straight.output_dir / f"{name}.safetensors")[0]
        b = st.read(resumed.output_dir / f"{name}.safetensors")[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
