"""export / lora-info / init_from: exported files load in diffusers'
WanPipeline with the trainer's outputs (alpha != rank), other layouts read
with the same weights, init_from fills the adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from wantrain import lora
from wantrain.commands import export
from wantrain.formats import lora as lora_format
from wantrain.commands.cli import main as cli
from wantrain.errors import WantrainError
from wantrain.loop import load, setup, train
from wantrain.profile import load_profile

RANK, ALPHA = 4, 8  # alpha != rank; scale 2


def _profile(tiny_model, demo_data, out, **target):
    return {
        "job": {"name": "t", "device": "cpu", "trigger_word": "sks", "seed": 7, "output_dir": str(out)},
        "model": {"name_or_path": str(tiny_model), "dtype": "fp32", "gradient_checkpointing": False, "max_sequence_length": 32},
        "target": {"rank": RANK, "alpha": ALPHA, "save_dtype": "fp32", **target},
        "training": {"steps": 2, "lr": 1e-2},
        "datasets": [{"folder": str(demo_data), "resolutions": [32], "num_frames": 5, "default_caption": "a [trigger] clip"}],
        "plugins": {"enabled": ["ema", "checkpoints"], "ema": {"decay": 0.5, "save": "raw"},
                    "checkpoints": {"every": 2, "dtype": "bf16"}},
    }


@pytest.fixture(scope="module")
def trained(tiny_model, demo_data, tmp_path_factory):
    """Two steps (one per expert): final fp32 files hold the raw weights, the
    checkpoint of step 2 also holds the EMA shadow."""
    out = tmp_path_factory.mktemp("export") / "out"
    return train(load_profile(data=_profile(tiny_model, demo_data, out)))


def _outputs(module):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    module.eval()
    with torch.no_grad():
        return module(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
@pytest.mark.parametrize("source", ["file", "checkpoint"])
def test_exports_load_in_diffusers_with_the_trainers_outputs(trained, tiny_model, tmp_path, fmt, source):
    from diffusers import WanPipeline

    out = trained.output_dir
    if source == "checkpoint":
        assert cli(["export", str(out / "checkpoints" / "step_000000002"), "--format", fmt, "-o", str(tmp_path)]) == 0
        files = {e: tmp_path / f"t_000000002_{e}.safetensors" for e in ("high_noise", "low_noise")}
    else:
        files = {e: tmp_path / f"{e}.safetensors" for e in ("high_noise", "low_noise")}
        for e, path in files.items():
            assert cli(["export", str(out / f"t_{e}.safetensors"), "--format", fmt, "-o", str(path)]) == 0
    keys = set(load_file(str(files["low_noise"])))
    prefix = "diffusion_model.blocks.0.self_attn.q" if fmt == "comfyui" else "transformer.blocks.0.attn1.to_q"
    assert f"{prefix}.lora_A.weight" in keys and (f"{prefix}.alpha" in keys) == (fmt == "comfyui")
    pipe = WanPipeline.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    base = _outputs(pipe.transformer_2)
    pipe.load_lora_weights(str(files["high_noise"]), adapter_name="hi")
    pipe.load_lora_weights(str(files["low_noise"]), adapter_name="lo", load_into_transformer_2=True)
    for expert, module in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        torch.testing.assert_close(_outputs(module), _outputs(trained.experts[expert]), rtol=0, atol=0)
    assert (_outputs(pipe.transformer_2) - base).abs().max() > 1e-4, "the LoRA changes the output"


def test_export_ema_takes_the_checkpoints_shadow(trained, tmp_path, capsys):
    ckpt = trained.output_dir / "checkpoints" / "step_000000002"
    assert cli(["export", str(ckpt), "--format", "comfyui", "--ema", "-o", str(tmp_path)]) == 0
    exported = load_file(str(tmp_path / "t_000000002_high_noise.safetensors"))
    shadow = trained.pm.get_plugin("ema").shadow.tensors["high_noise"]["blocks.1.ffn.net.2.lora_B.default.weight"]
    assert torch.equal(exported["diffusion_model.blocks.1.ffn.2.lora_B.weight"], shadow)
    raw = load_file(str(trained.output_dir / "t_high_noise.safetensors"))["diffusion_model.blocks.1.ffn.2.lora_B.weight"]
    assert not torch.equal(raw, shadow)
    assert cli(["export", str(trained.output_dir / "t_high_noise.safetensors"), "--format", "comfyui", "--ema", "-o", str(tmp_path / "x")]) == 2
    assert "error: --ema: needs a checkpoint folder (checkpoints/step_N)" in capsys.readouterr().err


def test_checkpoint_weights_come_from_the_plugin_that_keeps_them(trained, tmp_path):
    """``checkpoint_weights`` (the EMA plugin's module-level answer) and the
    ``--ema`` option it adds with ``add_commands``; a variant nobody keeps is one line."""
    import argparse

    from wantrain import registry
    from wantrain.formats import state as state_files

    ckpt = trained.output_dir / "checkpoints" / "step_000000002"
    states = state_files.read_tree(ckpt, state_files.read_doc(ckpt))["plugins"]
    hook = registry.catalogue().hook
    shadow = hook.checkpoint_weights(states=states, variant="ema")
    want = trained.pm.get_plugin("ema").shadow.tensors["low_noise"]["blocks.1.ffn.net.2.lora_B.default.weight"]
    assert torch.equal(shadow["low_noise"]["blocks.1.ffn.net.2.lora_B.weight"], want)
    assert hook.checkpoint_weights(states=states, variant="swa") is None
    assert hook.checkpoint_weights(states={"checkpoints": None}, variant="ema") is None
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("export")
    p.set_defaults(variant=None)
    hook.add_commands(subparsers=sub, commands={"export": p})
    assert parser.parse_args(["export", "--ema"]).variant == "ema" and parser.parse_args(["export"]).variant is None
    with pytest.raises(WantrainError) as err:
        export.export(ckpt, "comfyui", tmp_path, variant="swa")
    assert err.value.lines()[0].startswith(f"error: --swa: this checkpoint holds no swa weights (got '{ckpt}'); ")


def test_lora_info_prints_layout_expert_modules_rank_alpha_and_metadata(trained, tmp_path, capsys):
    assert cli(["lora-info", str(trained.output_dir / "t_low_noise.safetensors")]) == 0
    text = capsys.readouterr().out
    for line in ["layout: comfyui", "expert: low_noise", "dtype: float32",
                 "modules: 40 (4 blocks x 10: attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out.0, attn2.to_q, "
                 "attn2.to_k, attn2.to_v, attn2.to_out.0, ffn.net.0.proj, ffn.net.2)",
                 "rank: 4", "alpha: 8 (scale alpha/rank = 2)", "  wantrain.step: final", "  wantrain.trigger_word: sks",
                 "  wantrain.profile: <resolved profile,"]:
        assert line in text, line
    diffusers_file = tmp_path / "d.safetensors"
    export.export(trained.output_dir / "t_low_noise.safetensors", "diffusers", diffusers_file)
    assert cli(["lora-info", str(diffusers_file)]) == 0
    text = capsys.readouterr().out
    assert "layout: diffusers" in text and "alpha: 4 (scale alpha/rank = 1)" in text and "alpha folded into lora_B: 8" in text


# ---------------------------------------------------------------- other layouts


def _deltas(w: lora_format.LoraWeights) -> dict[str, torch.Tensor]:
    return {n: (w.alphas[n] / a.shape[0]) * b.double() @ a.double() for n, (a, b) in w.modules.items()}


def _other_layouts(ours: lora_format.LoraWeights, folder) -> dict[str, tuple]:
    """The same LoRA written the way other tools write it."""
    kohya, down_up, peft = {}, {}, {}
    for name, (a, b) in ours.modules.items():
        block, path = name.split(".", 2)[1:]
        comfy = lora_format.DIFFUSERS_TO_COMFY[path]
        k = f"lora_unet_blocks_{block}_{comfy.replace('.', '_')}"
        kohya.update({f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(ALPHA / 2)})
        kohya[f"{k}.lora_up.weight"] = b * 2  # alpha halved, B doubled: same delta
        d = f"diffusion_model.blocks.{block}.{comfy}"
        down_up.update({f"{d}.lora_down.weight": a, f"{d}.lora_up.weight": b, f"{d}.alpha": torch.tensor(float(ALPHA))})
        p = f"base_model.model.{name}"
        peft.update({f"{p}.lora_A.weight": a, f"{p}.lora_B.weight": b})
    (folder / "peft").mkdir()
    (folder / "peft" / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    save_file(peft, str(folder / "peft" / "adapter_model.safetensors"))
    save_file(kohya, str(folder / "kohya.safetensors"))
    save_file(down_up, str(folder / "down_up.safetensors"), metadata={"ss_network_dim": "4"})
    return {"kohya": folder / "kohya.safetensors", "comfyui-down-up": folder / "down_up.safetensors",
            "diffusers": folder / "peft" / "adapter_model.safetensors"}


def test_other_layouts_read_with_the_same_weights(trained, tmp_path):
    ours = lora_format.read_lora(trained.output_dir / "t_high_noise.safetensors")
    assert ours.layout == "comfyui" and ours.expert == "high_noise" and ours.ranks == [RANK]
    folded = lora_format.read_lora(export.export(trained.output_dir / "t_high_noise.safetensors", "diffusers", tmp_path / "f.safetensors")[0])
    for layout, path in {**_other_layouts(ours, tmp_path), "diffusers (folded)": folded}.items():
        theirs = folded if layout.startswith("diffusers (") else lora_format.read_lora(path)
        assert theirs.layout == layout.split(" ")[0] and not theirs.skipped, layout
        assert set(theirs.modules) == set(ours.modules), layout
        want, got = _deltas(ours), _deltas(theirs)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=f"{layout} {name}")


def test_unknown_tensors_are_listed_and_a_non_lora_file_is_refused(tmp_path):
    a, b = torch.randn(4, 128), torch.randn(128, 4)
    w = lora_format.parse({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
                           "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b,
                           "diffusion_model.head.head.lora_A.weight": a}, {})[None]
    assert w.skipped == ["diffusion_model.head.head.lora_A.weight"] and w.alphas == {"blocks.0.attn1.to_q": 4.0}
    save_file({"weight": a}, str(tmp_path / "x.safetensors"))
    with pytest.raises(WantrainError, match="not a LoRA wantrain can read: no LoRA tensors of a Wan transformer"):
        lora_format.read_lora(tmp_path / "x.safetensors")


# ---------------------------------------------------------------- init_from


def _adapter_deltas(run, expert, alpha):
    state = lora.lora_state(run.experts[expert])
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    return {n: (alpha / RANK) * state[f"{n}.lora_B.weight"].double() @ state[f"{n}.lora_A.weight"].double() for n in names}


def test_init_from_our_pair_and_from_a_kohya_file_with_another_alpha(trained, tiny_model, demo_data, tmp_path):
    ours = lora_format.read_lora(trained.output_dir / "t_high_noise.safetensors")
    kohya = _other_layouts(ours, tmp_path)["kohya"]
    cases = [(str(trained.output_dir / "t_high_noise.safetensors"), ALPHA), (str(kohya), 2 * ALPHA)]
    for init_from, alpha in cases:
        data = _profile(tiny_model, demo_data, tmp_path / "run", init_from=init_from, alpha=alpha)
        data["plugins"] = {"enabled": []}
        run = setup(load_profile(data=data))
        load(run)
        run.data.close()
        for expert in ("high_noise", "low_noise"):  # the pair's partner / the same file for both
            source = lora_format.read_lora(trained.output_dir / f"t_{expert}.safetensors") if alpha == ALPHA else ours
            want, got = _deltas(source), _adapter_deltas(run, expert, alpha)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=f"{init_from} {expert} {name}")


def test_init_from_with_another_rank_names_the_key(trained):
    w = lora_format.read_lora(trained.output_dir / "t_high_noise.safetensors")
    target = load_profile(data={"job": {"name": "x"}, "target": {"rank": 8, "modules": ["attn1.to_q"]}}).target
    with pytest.raises(WantrainError) as err:
        lora.fit_to_target(w, target)
    assert err.value.lines()[0] == "error: target.init_from: has rank 4, target.rank is 8; set target.rank = 4"
    assert err.value.lines()[1].startswith("error: target.init_from: holds weights for modules target.modules does not list (got ['attn1.to_k'")
