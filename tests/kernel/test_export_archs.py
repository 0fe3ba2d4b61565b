"""export, lora-info and init_from for every arch, on the tiny models after
short real runs: the TI2V-5B's one file ``<name>.safetensors`` (expert
``full``) and the I2V-A14B pair load in diffusers with the trainer's
outputs; files name their arch; a LoRA of the wrong arch is refused (5B vs
A14B) or loads with a warning (T2V vs I2V: the same shapes)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from wantrain import lora
from wantrain.commands.cli import main as cli
from wantrain.commands.tiny import make_tiny_model
from wantrain.errors import ProfileError, WantrainError
from wantrain.formats import lora as lora_format
from wantrain.loop import load, setup, train
from wantrain.profile import load_profile

I2V, TI2V, T2V = "wan22_i2v_a14b", "wan22_ti2v_5b", "wan22_t2v_a14b"
RANK, ALPHA = 4, 8


def _profile(model, demo_data, out, arch, **target):
    return {
        "job": {"name": "t", "device": "cpu", "trigger_word": "sks", "seed": 7, "output_dir": str(out)},
        "model": {"arch": arch, "name_or_path": str(model), "dtype": "fp32", "gradient_checkpointing": False,
                  "max_sequence_length": 32},
        "target": {"rank": RANK, "alpha": ALPHA, "save_dtype": "fp32", **target},
        "training": {"steps": 2, "lr": 1e-2},
        "datasets": [{"folder": str(demo_data), "resolutions": [64], "num_frames": 5, "default_caption": "a [trigger] clip"}],
        "plugins": {"enabled": ["checkpoints"], "checkpoints": {"every": 2}},
    }


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    """Two real steps on each tiny model (I2V-A14B: one per expert; TI2V-5B: two on its one expert)."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for arch in (I2V, TI2V):
        model = make_tiny_model(root / f"model_{arch}", seed=0, arch=arch)
        run = train(load_profile(data=_profile(model, demo_data, root / f"out_{arch}", arch)))
        run.data.close()
        out[arch] = (model, run)
    return out


def _outputs(module, channels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, 2, 4, 4, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    module.eval()
    with torch.no_grad():
        return module(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text, return_dict=False)[0]


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_the_5b_file_and_its_checkpoint_export_and_load_in_diffusers(runs, tmp_path, fmt):
    from diffusers import WanPipeline

    model, run = runs[TI2V]
    out = run.output_dir
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t.safetensors", "t_000000002.safetensors"]
    assert cli(["export", str(out / "checkpoints" / "step_000000002"), "--format", fmt, "-o", str(tmp_path / "ckpt") + "/"]) == 0
    assert cli(["export", str(out / "t.safetensors"), "--format", fmt, "-o", str(tmp_path / "t_x.safetensors")]) == 0
    pipe = WanPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    assert pipe.transformer_2 is None and pipe.config.expand_timesteps
    base = _outputs(pipe.transformer, 48)
    for i, path in enumerate([tmp_path / "ckpt" / "t_000000002.safetensors", tmp_path / "t_x.safetensors"]):
        meta = _meta(path)
        assert (meta["wantrain.arch"], meta["wantrain.expert"], meta["ss_base_model_version"]) == (TI2V, "full", "wan2.2_ti2v_5b")
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        pipe.set_adapters([f"a{i}"])
        torch.testing.assert_close(_outputs(pipe.transformer, 48), _outputs(run.experts["full"], 48), rtol=0, atol=0)
    assert (_outputs(pipe.transformer, 48) - base).abs().max() > 1e-4, "the LoRA changes the output"


def test_the_i2v_pair_loads_in_the_image_to_video_pipeline(runs, tmp_path):
    from diffusers import WanImageToVideoPipeline

    model, run = runs[I2V]
    files = {e: run.output_dir / f"t_{e}.safetensors" for e in ("high_noise", "low_noise")}
    assert all(_meta(p)["wantrain.arch"] == I2V for p in files.values())
    pipe = WanImageToVideoPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(files["high_noise"]), adapter_name="hi")
    pipe.load_lora_weights(str(files["low_noise"]), adapter_name="lo", load_into_transformer_2=True)
    for expert, module in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        torch.testing.assert_close(_outputs(module, 36), _outputs(run.experts[expert], 36), rtol=0, atol=0)


def test_lora_info_names_the_arch(runs, tmp_path, capsys):
    _, run5 = runs[TI2V]
    assert cli(["lora-info", str(run5.output_dir / "t.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "expert: full" in text and "arch: Wan 2.2 TI2V-5B (wan22_ti2v_5b)" in text
    assert cli(["lora-info", str(run5.output_dir / "checkpoints" / "step_000000002")]) == 0
    text = capsys.readouterr().out
    assert "arch: Wan 2.2 TI2V-5B (wan22_ti2v_5b)" in text and "ss_base_model_version: wan2.2_ti2v_5b" in text
    _, run14 = runs[I2V]
    assert cli(["lora-info", str(run14.output_dir / "t_low_noise.safetensors")]) == 0
    assert "arch: Wan 2.2 I2V-A14B (wan22_i2v_a14b)" in capsys.readouterr().out
    # a file of another tool names no arch: its width tells the 5B (3072) from an A14B (5120)
    for width, said in ((3072, "Wan 2.2 TI2V-5B"), (5120, "a Wan A14B (T2V or I2V"), (128, "unknown")):
        w = lora_format.LoraWeights(layout="kohya", modules={"blocks.0.attn1.to_q": (torch.zeros(4, width), torch.zeros(width, 4))},
                                    alphas={"blocks.0.attn1.to_q": 4.0})
        assert lora_format.arch_line(w).startswith(said)


def _adapters(run, expert):
    state = lora.lora_state(run.experts[expert])
    return {k: v for k, v in state.items()}


def test_init_from_a_5b_file_and_checkpoint(runs, demo_data, tmp_path):
    model, run5 = runs[TI2V]
    want = lora_format.read_lora(run5.output_dir / "t.safetensors").state()
    for i, source in enumerate([run5.output_dir / "t.safetensors", run5.output_dir / "checkpoints" / "step_000000002"]):
        data = _profile(model, demo_data, tmp_path / f"run{i}", TI2V, init_from=str(source))
        data["plugins"] = {"enabled": []}
        run = setup(load_profile(data=data))
        load(run)
        run.data.close()
        got = _adapters(run, "full")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-8, msg=f"{source} {key}")


def test_init_from_another_arch(runs, tiny_model, demo_data, tmp_path, caplog):
    model5, run5 = runs[TI2V]
    model14, run14 = runs[I2V]
    # the 5B and the A14Bs: refused before anything loads into the adapters, one line naming both
    cases = [(model5, TI2V, run14.output_dir / "t_high_noise.safetensors", "is a Wan 2.2 I2V-A14B LoRA; this model is Wan 2.2 TI2V-5B"),
             (model14, I2V, run5.output_dir / "t.safetensors", "is a Wan 2.2 TI2V-5B LoRA; this model is Wan 2.2 I2V-A14B"),
             (model14, I2V, run5.output_dir / "checkpoints" / "step_000000002", "is a Wan 2.2 TI2V-5B LoRA")]
    for i, (model, arch, source, said) in enumerate(cases):
        data = _profile(model, demo_data, tmp_path / f"bad{i}", arch, init_from=str(source))
        data["plugins"] = {"enabled": []}
        run = setup(load_profile(data=data))
        with pytest.raises(WantrainError) as err:
            load(run)
        run.data.close()
        assert len(err.value.lines()) == 1 and said in err.value.lines()[0], err.value.lines()
    # T2V and I2V A14B share every shape: an I2V pair starts a T2V run, with a warning
    data = _profile(tiny_model, demo_data, tmp_path / "t2v_run", T2V, init_from=str(run14.output_dir / "t_high_noise.safetensors"))
    data["plugins"] = {"enabled": []}
    run = setup(load_profile(data=data))
    with caplog.at_level(logging.WARNING, logger="wantrain"):
        load(run)
    run.data.close()
    assert "is a Wan 2.2 I2V-A14B LoRA, loaded into Wan 2.2 T2V-A14B" in caplog.text
    want = lora_format.read_lora(run14.output_dir / "t_low_noise.safetensors").state()
    torch.testing.assert_close(_adapters(run, "low_noise"), want, rtol=1e-6, atol=1e-8)


def test_an_init_from_table_needs_two_experts(demo_data, tmp_path):
    data = _profile(tmp_path / "model", demo_data, tmp_path / "out", TI2V, init_from={"high_noise": "a.safetensors", "low_noise": "b.safetensors"})
    with pytest.raises(ProfileError) as err:
        load_profile(data=data)
    assert err.value.lines() == ['error: target.init_from: is a table of experts; wan22_ti2v_5b has one expert (got \'{...}\'); '
                                 'write init_from = "file.safetensors"']
