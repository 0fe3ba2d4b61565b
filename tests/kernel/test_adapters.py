"""Adapter types (``[target] type``) and optimizers: each type trains,
resumes bit-exactly (each case with another optimizer, so each optimizer's
state is resumed too), saves in the LyCORIS names ComfyUI reads -- and the
weight a ComfyUI merge computes from the file (written below after
``comfy/weight_adapter``, independently of wantrain's code) is the trained
layer's effective weight, measured by running the layer on the identity.
``init_from``, ``wantrain sample``'s attach, ``export`` and ``lora-info``
know every type."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from wantrain import lora
from wantrain.commands.cli import main as cli
from wantrain.errors import ProfileError
from wantrain.formats import lora as lora_format
from wantrain.formats.lora import DIFFUSERS_TO_COMFY
from wantrain.loop import train
from wantrain.optim import eval_weights
from wantrain.profile import load_profile

#: (type, target options, optimizer, optimizer_args, lr)
CASES = {
    "dora": ({}, "prodigy", {"d0": 1e-3}, 1.0),
    "lokr": ({"lokr_factor": 4}, "came", {}, 1e-2),
    "lokr_full": ({"lokr_full_rank": True}, "adamw", {}, 1e-3),
    "loha": ({}, "adamw_schedulefree", {"warmup_steps": 1}, 1e-2),
    "lora": ({}, "torch.optim:SGD", {"momentum": 0.9}, 1e-2),
}


def _data(tiny_model, demo_data, out, case, steps=4):
    options, optimizer, args, lr = CASES[case]
    return {
        "job": {"name": "t", "device": "cpu", "seed": 7, "trigger_word": "sks", "output_dir": str(out)},
        "model": {"name_or_path": str(tiny_model), "dtype": "fp32", "gradient_checkpointing": False, "max_sequence_length": 32},
        "target": {"type": case.split("_")[0], "rank": 4, "alpha": 8, "save_dtype": "fp32", **options},
        "training": {"steps": steps, "lr": lr, "optimizer": optimizer, "optimizer_args": args, "num_workers": 0},
        "datasets": [{"folder": str(demo_data), "resolutions": [32], "num_frames": 5, "default_caption": "a clip"}],
        # one expert (half the loading); a checkpoint at step 2 to resume from
        "plugins": {"enabled": ["multistage", "checkpoints"], "multistage": {"high_noise": False},
                    "checkpoints": {"every": 2, "keep": 0, "dtype": "fp32"}},
    }


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tiny_model, demo_data, tmp_path_factory):
    """(case, run of 4 steps, the final file of that run, the final file of a
    second run resumed from its step-2 checkpoint)."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    run = train(load_profile(data=_data(tiny_model, demo_data, root / "out", case)))
    final = root / "out" / "t_low_noise.safetensors"
    shutil.copytree(root / "out" / "checkpoints" / "step_000000002", root / "resume" / "checkpoints" / "step_000000002")
    train(load_profile(data=_data(tiny_model, demo_data, root / "resume", case)), resume="auto")
    return case, run, final, root / "resume" / "t_low_noise.safetensors"


@pytest.mark.slow  # two short runs per case (5 cases)
def test_each_type_and_optimizer_resumes_bit_exactly(trained):
    case, run, final, resumed = trained
    a, b = load_file(str(final)), load_file(str(resumed))  # (the metadata names each run's output folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case


# ---------------------------------------------------------------- ComfyUI's merge, written out


def comfy_merge(file: dict[str, torch.Tensor], key: str, weight: torch.Tensor) -> torch.Tensor:
    """comfy/weight_adapter/{lora,lokr,loha}.py ``calculate_weight`` at
    strength 1, fp32: alpha / (the rank ComfyUI takes) times the product,
    DoRA through ``weight_decompose`` (output axis, normalising W + dW --
    Comfy-Org/ComfyUI#15458; see docs/adapters.md)."""
    t = {k[len(key) + 1:]: v.float() for k, v in file.items() if k.startswith(key + ".")}
    alpha = t["alpha"].item() if "alpha" in t else None
    if "lokr_w1" in t:
        dim = None
        w1 = t["lokr_w1"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            dim = t["lokr_w2_b"].shape[0]
            w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    elif "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = (torch.mm(t["hada_w1_a"], t["hada_w1_b"]) * torch.mm(t["hada_w2_a"], t["hada_w2_b"])).reshape(weight.shape)
    else:
        scale = alpha / t["lora_A.weight"].shape[0]
        diff = torch.mm(t["lora_B.weight"], t["lora_A.weight"]).reshape(weight.shape)
    if "dora_scale" not in t:
        return weight + scale * diff
    dora_scale = t["dora_scale"]
    assert dora_scale.shape == (weight.shape[0], 1)  # the output axis, 2-D (ComfyUI broadcasts it so)
    weight_calc = weight + diff * scale
    norm = weight_calc.reshape(weight_calc.shape[0], -1).norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / norm)


def effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """What the trained layer multiplies its input by: run it on the identity."""
    base = layer.get_base_layer()
    eye = torch.eye(base.in_features)
    with torch.no_grad():
        out = layer(eye) - (base.bias if base.bias is not None else 0)
    return out.T


@pytest.mark.slow  # two short runs per case (5 cases)
def test_a_comfyui_merge_of_the_file_is_the_trained_weight(trained):
    case, run, final, _ = trained
    file = load_file(str(final))
    module = run.experts["low_noise"]
    checked = 0
    with eval_weights(run.optimizer):  # schedule-free saves its averaged weights
        for name, layer in lora.adapters.adapter_layers(module):
            block, rest = name.split(".", 2)[1:]
            key = f"diffusion_model.blocks.{block}.{DIFFUSERS_TO_COMFY[rest]}"
            base = layer.get_base_layer().weight.detach().float()
            merged = comfy_merge(file, key, base)
            ours = effective_weight(layer)
            torch.testing.assert_close(merged, ours, rtol=1e-5, atol=2e-6)
            assert (ours - base).abs().max() > 1e-6, f"{case}: {name} did not train"
            checked += 1
    assert checked == 40


@pytest.mark.slow  # two short runs per case (5 cases)
def test_init_from_and_sample_attach_rebuild_the_weights(trained, tiny_model):
    """A fresh expert given the file -- by init_from's path (the profile's
    target) and by ``wantrain sample``'s (shapes from the file) -- computes the
    trained weights."""
    from diffusers import WanTransformer3DModel

    case, run, final, _ = trained
    w = lora_format.read_lora(final)
    assert w.type == case.split("_")[0]
    for how in ("init_from", "sample"):
        fresh = WanTransformer3DModel.from_pretrained(str(tiny_model), subfolder="transformer_2", torch_dtype=torch.float32)
        if how == "init_from":
            lora.attach_target(fresh, run.profile.target, seed=0)
            lora.load_lora_state(fresh, lora.fit_to_target(w, run.profile.target))
        else:
            lora.attach_weights(fresh, w)
        layers = dict(lora.adapters.adapter_layers(fresh))
        with eval_weights(run.optimizer):
            for name, layer in lora.adapters.adapter_layers(run.experts["low_noise"]):
                torch.testing.assert_close(effective_weight(layers[name]), effective_weight(layer), rtol=1e-5, atol=2e-6)


@pytest.mark.slow  # two short runs per case (5 cases)
def test_lora_info_and_export_know_the_type(trained, tmp_path, capsys):
    case, run, final, _ = trained
    kind = case.split("_")[0]
    assert cli(["lora-info", str(final)]) == 0
    out = capsys.readouterr().out
    types = [line for line in out.splitlines() if line.startswith("type: ")]
    assert types == ([] if kind == "lora" else [types[0]]) and (kind == "lora" or types[0].startswith(f"type: {kind} "))
    if case == "lokr_full":
        assert "rank: none" in out and "lokr_w2" not in str(lora_format.read_lora(final).ranks)
    ckpt = final.parent / "checkpoints" / "step_000000004"
    assert cli(["export", str(ckpt), "--format", "comfyui", "-o", str(tmp_path) + "/"]) == 0
    exported = load_file(str(tmp_path / "t_000000004_low_noise.safetensors"))
    ref = load_file(str(final))
    if not lora_format.read_lora(final).type == "loha":  # schedule-free: the checkpoint holds the training weights
        assert exported.keys() == ref.keys() and all(torch.equal(exported[k], ref[k]) for k in ref)
    code = cli(["export", str(final), "--format", "diffusers", "-o", str(tmp_path / "d.safetensors")])
    err = capsys.readouterr().err
    if kind in ("lokr", "loha"):
        assert code == 2 and err.strip().splitlines() == [
            f"error: --format diffusers: diffusers' Wan LoRA loader reads no {kind} weights (got '{final}'); "
            "export --format comfyui (ComfyUI loads it)"]
    else:
        assert code == 0


@pytest.mark.slow  # two short runs per case (5 cases)
def test_prodigy_logs_its_effective_step_size(trained):
    case, run, _, _ = trained
    if case != "dora":
        pytest.skip("prodigy runs in the dora case")
    group = run.optimizer.param_groups[0]
    assert run.last_metrics["lr"] == pytest.approx(group["d"] * group["lr"]) and run.last_metrics["lr"] != 1.0


@pytest.mark.slow  # two short runs per case (5 cases)
def test_diffusers_loads_the_types_it_supports(trained, tiny_model, tmp_path):
    """LoRA and DoRA (exported in diffusers' layout) load in WanPipeline with the trained outputs."""
    from diffusers import WanPipeline

    case, run, final, _ = trained
    if case not in ("lora", "dora"):
        pytest.skip("diffusers' Wan loader reads LoRA and DoRA only")
    path = tmp_path / "d.safetensors"
    assert cli(["export", str(final), "--format", "diffusers", "-o", str(path)]) == 0
    pipe = WanPipeline.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(path), adapter_name="lo", load_into_transformer_2=True)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 32, 32, generator=g)
    with torch.no_grad():
        theirs = pipe.transformer_2(hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=text, return_dict=False)[0]
        ours = run.experts["low_noise"](hidden_states=x, timestep=torch.tensor([300.0]), encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- one-line errors, no runs


@pytest.mark.parametrize("optimizer, args, where, what", [
    ("adamw_shedulefree", {}, "training.optimizer", "must be one of 'adamw'"),
    ("no_such_module:Opt", {}, "training.optimizer", "cannot be imported (ModuleNotFoundError"),
    ("torch.optim:NoSuch", {}, "training.optimizer", "cannot be imported (AttributeError"),
    ("torch.nn:Linear", {}, "training.optimizer", "is not a torch.optim.Optimizer class"),
    ("prodigy", {"d_coeff": 2.0}, "training.optimizer_args.d_coeff", "is not an argument of Prodigy"),
    ("came", {"lr": 1.0}, "training.optimizer_args.lr", "is set by training.lr"),
])
def test_unknown_optimizers_and_arguments_are_one_line(profile_data, optimizer, args, where, what):
    profile_data["training"].update(optimizer=optimizer, optimizer_args=args)
    with pytest.raises(ProfileError) as info:
        load_profile(data=profile_data)
    lines = str(info.value).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: {what}"), lines


def test_a_bad_argument_value_is_one_line(profile_data, tmp_path):
    from wantrain.optimizers import build_optimizer

    with pytest.raises(ProfileError, match=r"training.optimizer_args: refused by CAME \(.*\)") as info:
        build_optimizer("came", [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0, {"betas": (2.0, 0.5, 0.1)})
    assert len(str(info.value).strip().splitlines()) == 1


def test_the_default_type_attaches_exactly_as_before(tiny_model):
    """type = "lora" goes through attach_lora: same parameters, same draws."""
    from diffusers import WanTransformer3DModel

    def fresh():
        return WanTransformer3DModel.from_pretrained(str(tiny_model), subfolder="transformer", torch_dtype=torch.float32)

    profile = load_profile(data={"job": {"name": "t"}, "target": {"rank": 4, "alpha": 8}})
    a, b = fresh(), fresh()
    pa = lora.attach_target(a, profile.target, seed=3)
    pb = lora.attach_lora(b, 4, 8, profile.target.modules, seed=3)
    assert len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert list(lora.lora_state(a)) == list(lora.lora_state(b))


def test_lokr_settings_on_another_type_and_a_wrong_type_to_start_from_are_one_line(tmp_path):
    with pytest.raises(ProfileError) as info:
        load_profile(data={"job": {"name": "t"}, "target": {"type": "loha", "lokr_factor": 8}})
    assert str(info.value).strip() == ('error: target.lokr_factor: is a LoKr setting; target.type is "loha" (got 8); '
                                       'set target.type = "lokr", or remove lokr_factor')
    w = lora_format.from_state({"blocks.0.attn1.to_q.hada_w1_a": torch.zeros(8, 2), "blocks.0.attn1.to_q.hada_w1_b": torch.zeros(2, 8),
                                "blocks.0.attn1.to_q.hada_w2_a": torch.zeros(8, 2), "blocks.0.attn1.to_q.hada_w2_b": torch.zeros(2, 8)}, 2.0)
    target = load_profile(data={"job": {"name": "t"}, "target": {"type": "lokr", "rank": 2}}).target
    with pytest.raises(Exception) as info:
        lora.fit_to_target(w, target)
    assert "target.init_from: holds loha weights, target.type is 'lokr'; set target.type = \"loha\"" in str(info.value)
