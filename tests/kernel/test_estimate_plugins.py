"""``wantrain estimate`` models DOP's second forward graph and runs that
train one expert (multistage with an expert switched off)."""

from __future__ import annotations

import attrs
import pytest

from wantrain.commands import estimate as est
from wantrain.profile import load_profile
from wantrain.run import open_run

GiB = 2**30
A14B = est.A14B_TRANSFORMER


def _profile(profile_data, **plugins):
    data = dict(profile_data)
    data["model"] = {**data["model"], "name_or_path": "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16", "dtype": "bf16",
                     "gradient_checkpointing": True}
    data["datasets"] = [{**data["datasets"][0], "resolutions": [512], "num_frames": 33}]
    data["plugins"] = {"enabled": list(plugins), **{k: v for k, v in plugins.items() if v}}
    return load_profile(data=data)


def _estimate(profile):
    return est.estimate_profile(profile, open_run(profile, purpose="inspect").pm)


def test_dop_adds_one_forward_graph(profile_data):
    plain, s0, _, _ = _estimate(_profile(profile_data))
    dop, s1, notes, _ = _estimate(_profile(profile_data, dop={}))
    assert s1.extra_forward_graphs == 1 and s0.extra_forward_graphs == 0
    assert any(n.startswith("dop: ") for n in notes)
    # the modelled amount: a second graph keeps each block's input (checkpointing) and what lies outside the blocks
    tokens, dim, blocks = 9216, 5120, 40  # 512x512x33 -> 9216 video tokens; A14B
    graph = blocks * tokens * 2 * dim + tokens * 8 * dim
    assert plain.phase == dop.phase == "training"
    assert dop.gpu_peak - plain.gpu_peak == pytest.approx(graph / GiB)
    assert 3.5 < graph / GiB < 4.0  # the rough count: ~3.5 GiB more at 512x512x33


def test_dop_without_checkpointing_doubles_the_block_activations():
    s = est.Settings(modules=(), checkpointing=False)
    c = est.count_transformer(A14B, False, (), ())
    one = est.activation_bytes(s, c)
    two = est.activation_bytes(attrs.evolve(s, extra_forward_graphs=1), c)
    workspace = 9216 * (16 * 5120 + 4 * 13824)
    assert two - workspace == pytest.approx(2 * (one - workspace))


@pytest.mark.parametrize("off", ["high_noise", "low_noise"])
def test_a_one_expert_run_needs_less(profile_data, off):
    both, s2, _, _ = _estimate(_profile(profile_data, multistage={}))
    one, s1, notes, _ = _estimate(_profile(profile_data, multistage={off: False}))
    assert (s2.experts_trained, s1.experts_trained) == (2, 1)
    assert any(n.startswith("multistage: ") and "one expert" in n for n in notes), notes
    # one expert loaded (no previews): its weights, LoRA and optimizer state only
    assert s1.experts_loaded == 1
    assert both.gpu_peak - one.gpu_peak > 25  # a bf16 A14B expert is ~26.6 GiB


def test_previews_load_the_untrained_expert(profile_data):
    sample = {"prompts": ["a clip"]}
    one, s, _, _ = _estimate(_profile(profile_data, multistage={"low_noise": False}, sample=sample))
    both, _, _, _ = _estimate(_profile(profile_data, multistage={}, sample=sample))
    assert s.experts_loaded == 2 and s.experts_trained == 1
    # the same weights on the card; one expert's LoRA + AdamW state less
    lora_and_state = 4 * s.rank * est.count_transformer(A14B, False, (), s.modules).lora_io * 3
    assert both.gpu_peak - one.gpu_peak == pytest.approx(lora_and_state / GiB)
