"""ema: the average is the documented recurrence, files hold what `save`
says, previews see the average, the raw weights always come back, state
survives a resume round trip."""

from __future__ import annotations

import textwrap

import pytest
import torch

from wantrain import lora
from wantrain.formats import lora as lora_format
from wantrain.errors import ProfileError
from wantrain.loop import train
from wantrain.plugins import ema
from wantrain.profile import load_profile

# records the raw LoRA weights after every optimizer step, and what a preview sees
RECORDER = textwrap.dedent("""
    from wantrain import lora as _lora
    from wantrain import hookimpl

    class lora:  # lora_state shares storage with fp32 CPU weights: copy
        @staticmethod
        def lora_state(module):
            return {k: v.clone() for k, v in _lora.lora_state(module).items()}

    class Plugin:
        def __init__(self):
            self.after_step, self.previewed, self.after_preview = [], [], []
        @hookimpl
        def after_adapters_attached(self, run):
            self.initial = {e: lora.lora_state(run.experts[e]) for e in run.trained}
        @hookimpl
        def after_optimizer_step(self, run):
            self.after_step.append((run.active_expert, {e: lora.lora_state(run.experts[e]) for e in run.trained}))
        @hookimpl
        def on_step(self, run, step):
            if step == PREVIEW_AT:
                run.generate_samples(step)
                self.after_preview.append({e: lora.lora_state(run.experts[e]) for e in run.trained})
        @hookimpl
        def generate_samples(self, run, step):
            self.previewed.append({e: lora.lora_state(run.experts[e]) for e in run.trained})
            return []
""")


def _train(profile_data, tmp_path, ema_cfg, *, preview_at=-1, multistage=None, steps=4):
    rec = tmp_path / "rec_ema.py"
    rec.write_text(RECORDER.replace("PREVIEW_AT", str(preview_at)))
    profile_data["training"]["steps"] = steps
    enabled = (["multistage"] if multistage else []) + ["ema", str(rec)]
    profile_data["plugins"] = {"enabled": enabled, "ema": ema_cfg, **({"multistage": multistage} if multistage else {})}
    run = train(load_profile(data=profile_data))
    return run, run.pm.get_plugin(str(rec))


def expected_ema(initial: dict, history: list, decay: float, update_every: int = 1) -> dict:
    """shadow = decay * shadow + (1 - decay) * weights after every update_every-th step of each expert."""
    shadow = {e: {k: v.clone() for k, v in s.items()} for e, s in initial.items()}
    count = {e: 0 for e in initial}
    for expert, weights in history:
        count[expert] += 1
        if count[expert] % update_every == 0:
            for k, v in weights[expert].items():
                shadow[expert][k] = decay * shadow[expert][k] + (1 - decay) * v
    return shadow


def _file(path) -> dict:
    return lora_format.read_lora(path).state()


def test_shadow_update_is_the_documented_recurrence():
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    shadow = ema.Shadow({"high_noise": {"w": p}})
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, 1.0]))
    assert shadow.step("high_noise", decay=0.75, update_every=2) is False  # not due yet
    assert torch.equal(shadow.tensors["high_noise"]["w"], torch.tensor([0.0, 1.0]))
    assert shadow.step("high_noise", decay=0.75, update_every=2) is True
    assert torch.allclose(shadow.tensors["high_noise"]["w"], torch.tensor([0.25, 1.0]))
    assert shadow.updates == {"high_noise": 1} and shadow.steps == {"high_noise": 2}


def test_raw_weights_come_back_even_when_the_inside_fails():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    shadow = ema.Shadow({"low_noise": {"w": p}})
    shadow.tensors["low_noise"]["w"].fill_(-1.0)
    with pytest.raises(RuntimeError, match="render failed"):
        with shadow.swapped_in():
            assert float(p.detach()) == -1.0
            raise RuntimeError("render failed")
    assert float(p.detach()) == 2.0


def test_decay_must_be_below_one(profile_data):
    profile_data["plugins"] = {"enabled": ["ema"], "ema": {"decay": 1.0, "save": "shadow"}}
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    assert "plugins.ema.decay: must be in [0, 1) (got 1.0)" in str(err.value)
    assert "plugins.ema.save: must be one of 'ema', 'raw', 'both'" in str(err.value)


def test_files_previews_and_state(profile_data, tmp_path):
    """save = "both": the usual files hold the EMA of the recorded trajectory,
    the _raw files and the model afterwards hold the raw weights; the preview
    at step 3 saw the EMA of steps 1-3."""
    run, rec = _train(profile_data, tmp_path, {"decay": 0.5, "save": "both"}, preview_at=3)
    plugin = run.pm.get_plugin("ema")
    initial = rec.initial
    final_ema = expected_ema(initial, rec.after_step, 0.5)
    raw_now = {e: {k: v.clone() for k, v in lora.lora_state(run.experts[e]).items()} for e in run.trained}
    out = run.output_dir
    for e in run.trained:
        saved, raw_file = _file(out / f"t_{e}.safetensors"), _file(out / f"t_{e}_raw.safetensors")
        for k, v in raw_now[e].items():
            torch.testing.assert_close(saved[k], final_ema[e][k], rtol=1e-5, atol=1e-7)
            assert torch.equal(raw_file[k], v)
        assert any(not torch.allclose(saved[k], raw_now[e][k]) for k in saved)  # EMA differs from raw
    at3 = expected_ema(initial, rec.after_step[:3], 0.5)
    for e in run.trained:
        for k in at3[e]:
            torch.testing.assert_close(rec.previewed[0][e][k], at3[e][k], rtol=1e-5, atol=1e-7)
            assert torch.equal(rec.after_preview[0][e][k], rec.after_step[2][1][e][k])  # raw again
    # resume state: the shadow and counts round-trip into a fresh plugin
    state = plugin.state_dict()
    assert state["updates"] == {"high_noise": 2, "low_noise": 2}
    fresh = ema.Plugin(ema.Config(decay=0.5))
    fresh.after_adapters_attached(run=run)
    fresh.load_state_dict(state=state)
    for e in run.trained:
        for k, v in plugin.shadow.tensors[e].items():
            assert torch.equal(fresh.shadow.tensors[e][k], v)
    assert fresh.shadow.updates == plugin.shadow.updates


def test_save_raw_writes_the_raw_weights(profile_data, tmp_path):
    run, _ = _train(profile_data, tmp_path, {"decay": 0.5, "save": "raw"}, steps=2)
    for e in run.trained:
        saved = _file(run.output_dir / f"t_{e}.safetensors")
        for k, v in lora.lora_state(run.experts[e]).items():
            assert torch.equal(saved[k], v)
        assert not (run.output_dir / f"t_{e}_raw.safetensors").exists()


def test_a_mismatched_resume_state_is_refused():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    shadow = ema.Shadow({"high_noise": {"w": p}})
    with pytest.raises(ValueError, match=r"ema: w has shape \(3, 2\) in the resume state, \(2, 3\) here"):
        shadow.load({"shadow": {"high_noise": {"w": torch.zeros(3, 2)}}})
    with pytest.raises(ValueError, match="does not match this run's LoRA"):
        shadow.load({"shadow": {"high_noise": {"v": torch.zeros(2, 3)}}})
