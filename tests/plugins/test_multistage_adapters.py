"""Per-expert ``rank`` / ``alpha`` (``[plugins.multistage.per_expert.<expert>]``,
answered through the ``expert_target`` event): each expert's adapter, file,
checkpoint, resume check, ``init_from`` and diffusers' loader carry its own."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wantrain import lora
from wantrain.errors import ProfileError, WantrainError
from wantrain.formats import lora as lora_format
from wantrain.formats.lora import DIFFUSERS_TO_COMFY
from wantrain.loop import load, setup, train
from wantrain.profile import load_profile

H, L = "high_noise", "low_noise"
#: [target] says rank 4, alpha 8; the high-noise expert gets rank 8 / alpha 4, the low-noise one rank 2 (alpha 8)
PER_EXPERT = {H: {"rank": 8, "alpha": 4.0}, L: {"rank": 2}}
OWN = {H: (8, 4.0), L: (2, 8.0)}


def _data(profile_data, out, per_expert=PER_EXPERT):
    data = copy.deepcopy(profile_data)
    data["job"]["output_dir"] = str(out)
    data["plugins"] = {"enabled": ["multistage", "checkpoints"],
                       "multistage": {"switch_every": 1, "per_expert": copy.deepcopy(per_expert)},
                       "checkpoints": {"every": 2, "keep": 0, "dtype": "fp32"}}
    return data


@pytest.fixture(scope="module")
def trained(tiny_model, demo_data, tmp_path_factory):
    """(profile data, a 4-step run, its output folder, the folder of a run resumed from its step-2 checkpoint)."""
    from tests.conftest import BASE_PROFILE

    root = tmp_path_factory.mktemp("per_expert")
    base = copy.deepcopy(BASE_PROFILE)
    base["model"]["name_or_path"] = str(tiny_model)
    base["datasets"][0]["folder"] = str(demo_data)
    run = train(load_profile(data=_data(base, root / "out")))
    shutil.copytree(root / "out" / "checkpoints" / "step_000000002", root / "resume" / "checkpoints" / "step_000000002")
    train(load_profile(data=_data(base, root / "resume")), resume="auto")
    return base, run, root / "out", root / "resume"


def _delta(layer) -> torch.Tensor:
    """A LoRA layer's trained weight change, as peft applies it."""
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]


@pytest.mark.slow  # two short runs
def test_each_expert_trains_and_writes_its_own_rank_and_alpha(trained):
    """The ``expert_target`` answer reaches the adapter, the file (``.alpha``,
    metadata) and a ComfyUI-style merge of the file equals the trained delta."""
    _, run, out, _ = trained
    for expert, (rank, alpha) in OWN.items():
        path = out / f"t_{expert}.safetensors"
        file = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        assert (meta["wantrain.rank"], meta["wantrain.alpha"]) == (str(rank), f"{alpha:g}")
        checked = 0
        for name, layer in lora.adapters.adapter_layers(run.experts[expert]):
            assert layer.lora_A["default"].weight.shape[0] == rank
            key = f"diffusion_model.blocks.{name.split('.', 2)[1]}.{DIFFUSERS_TO_COMFY[name.split('.', 2)[2]]}"
            down, up = file[f"{key}.lora_A.weight"], file[f"{key}.lora_B.weight"]
            assert down.shape[0] == rank and float(file[f"{key}.alpha"]) == alpha
            merged = up @ down * (float(file[f"{key}.alpha"]) / down.shape[0])  # ComfyUI: alpha / rank of the file
            torch.testing.assert_close(merged, _delta(layer).detach(), rtol=1e-5, atol=1e-7)
            assert merged.abs().max() > 0
            checked += 1
        assert checked == 40
        w = lora_format.read_lora(path)
        assert w.ranks == [rank] and set(w.alphas.values()) == {alpha}


@pytest.mark.slow
def test_the_checkpoint_carries_each_experts_rank_and_resume_is_exact(trained):
    _, _, out, resumed = trained
    ckpt = out / "checkpoints" / "step_000000004"
    with safe_open(str(ckpt / "lora.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["wantrain.rank"] == "high_noise:8,low_noise:2" and meta["wantrain.alpha"] == "high_noise:4,low_noise:8"
    for expert, w in lora_format.read_checkpoint(ckpt).items():
        assert (w.ranks, set(w.alphas.values())) == ([OWN[expert][0]], {OWN[expert][1]})
    for expert in OWN:  # the same tensors, bit for bit (the metadata names each run's output folder)
        a, b = load_file(str(out / f"t_{expert}.safetensors")), load_file(str(resumed / f"t_{expert}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_changing_an_experts_rank_refuses_the_resume_in_one_line(trained, tmp_path):
    base, _, out, _ = trained
    shutil.copytree(out / "checkpoints" / "step_000000002", tmp_path / "o" / "checkpoints" / "step_000000002")
    changed = {H: {"rank": 16, "alpha": 4.0}, L: {"rank": 2}}
    with pytest.raises(WantrainError) as info:
        train(load_profile(data=_data(base, tmp_path / "o", changed)), resume="auto")
    assert "target.experts.high_noise.rank: differs from the checkpoint being resumed" in str(info.value)
    # dropping the per-expert settings (both experts back at [target]'s rank) is refused too
    with pytest.raises(WantrainError, match="target.experts.high_noise.rank: differs .* has 8"):
        train(load_profile(data=_data(base, tmp_path / "o", {})), resume="auto")


@pytest.mark.slow
def test_init_from_the_pair_and_diffusers_load_each_experts_own_rank(trained, tiny_model):
    """A fresh run ``init_from`` the pair computes the trained deltas; diffusers'
    WanPipeline loads the two files (rank 8 and rank 2) with the trained outputs."""
    from diffusers import WanPipeline

    base, run, out, _ = trained
    data = _data(base, out.parent / "init")
    data["target"]["init_from"] = str(out / "t_high_noise.safetensors")  # and its partner beside it
    fresh = setup(load_profile(data=data))
    load(fresh)
    fresh.data.close()
    for expert in OWN:
        theirs = dict(lora.adapters.adapter_layers(fresh.experts[expert]))
        for name, layer in lora.adapters.adapter_layers(run.experts[expert]):
            torch.testing.assert_close(_delta(theirs[name]), _delta(layer), rtol=1e-5, atol=1e-7)
    pipe = WanPipeline.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(out / "t_high_noise.safetensors"), adapter_name="hi")
    pipe.load_lora_weights(str(out / "t_low_noise.safetensors"), adapter_name="lo", load_into_transformer_2=True)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 32, 32, generator=g)
    for module, expert in ((pipe.transformer, H), (pipe.transformer_2, L)):
        with torch.no_grad():
            a = module(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]
            b = run.experts[expert](hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                                    return_dict=False)[0]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_expert, target, line", [
    ({H: {"rank": 0}}, {}, "plugins.multistage.per_expert.high_noise.rank: must be greater than 0"),
    ({L: {"rank": 100000}}, {}, "plugins.multistage.per_expert.low_noise.rank: is wider than the model allows"),
    ({H: {"alpha": 4.0}}, {"type": "lokr", "lokr_full_rank": True},
     "plugins.multistage.per_expert.high_noise.alpha: has no use: LoKr with a full-rank w2"),
])
def test_per_expert_adapter_mistakes_are_one_line(profile_data, per_expert, target, line):
    from wantrain.run import open_run

    profile_data["target"].update(target)
    profile_data["plugins"] = {"enabled": ["multistage"], "multistage": {"per_expert": per_expert}}
    with pytest.raises(ProfileError) as info:
        open_run(load_profile(data=profile_data), purpose="inspect")
    assert line in str(info.value) and "Traceback" not in str(info.value), str(info.value)


def test_estimate_counts_the_widest_experts_lora(profile_data):
    from wantrain.commands.estimate import estimate_profile
    from wantrain.run import open_run

    profile_data["plugins"] = {"enabled": ["multistage"], "multistage": {"per_expert": {L: {"rank": 8}}}}
    profile = load_profile(data=profile_data)
    _, settings, _, _ = estimate_profile(profile, open_run(profile, purpose="inspect").pm)
    assert settings.rank == 8
