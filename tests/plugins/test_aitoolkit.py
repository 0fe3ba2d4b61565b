"""``wantrain import ai-toolkit``: realistic ai-toolkit job configs (in the
shape of ai-toolkit's own examples and of what its UI writes) become
profiles that pass ``wantrain check``; everything else is named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wantrain.commands.cli import main
from wantrain.plugins.aitoolkit import convert as C
from wantrain.plugins.aitoolkit import import_config
from wantrain.profile import load_profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = Path(__file__).parent / "aitoolkit_configs"


def _import(tmp_path, name: str, capsys) -> tuple[dict, Path, list[str]]:
    out = tmp_path / f"{name}.toml"
    assert main(["import", "ai-toolkit", str(CONFIGS / f"{name}.yaml"), "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    return tomllib.loads(out.read_text()), out, [line for line in err if line.startswith("not carried over:")]


def _check(path: Path, tiny_model, demo_data, datasets: int, capsys) -> None:
    sets = ["--set", f"model.name_or_path={tiny_model}"]
    for i in range(datasets):
        sets += ["--set", f'datasets[{i}].folder="{demo_data}"']
    assert main(["check", str(path), *sets]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("ok: ")


def test_24gb_character_with_uint4_ara(tmp_path, capsys, tiny_model, demo_data):
    data, path, dropped = _import(tmp_path, "char_24gb_uint4_ara", capsys)
    assert data["job"] == {"name": "my_first_wan22_14b_lora_v1", "output_dir": "output/my_first_wan22_14b_lora_v1",
                           "trigger_word": "p3r5on", "device": "cuda:0"}
    assert data["model"] == {"name_or_path": "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16", "arch": "wan22_t2v_a14b",
                             "dtype": "bf16", "gradient_checkpointing": True}
    assert data["target"] == {"rank": 32, "alpha": 32, "save_dtype": "fp16"}
    assert data["training"] == {"batch_size": 1, "steps": 2000, "gradient_accumulation": 1, "lr": 1e-4,
                                "optimizer": "adamw8bit", "weight_decay": 1e-4}
    assert data["datasets"] == [{"folder": "/path/to/images/or/video/folder", "caption_ext": "txt",
                                 "caption_dropout": 0.05, "resolutions": [512, 768, 1024], "num_frames": 1,
                                 "frame_sampling": "uniform"}]
    plugins = data["plugins"]
    assert plugins["quantize"] == {"transformer": "qint4+ara", "ara": "svd", "text_encoder": "qfloat8"}
    assert plugins["offload"] == {"experts": True}
    assert plugins["multistage"] == {"switch_every": 10}
    assert plugins["checkpoints"] == {"dtype": "fp16", "every": 250, "keep": 4}
    assert "text_cache" in plugins["enabled"] and plugins["timesteps"] == {"type": "linear"}
    assert plugins["sample"]["guidance_high"] == plugins["sample"]["guidance_low"] == 3.5
    assert plugins["sample"]["steps"] == 25 and len(plugins["sample"]["prompts"]) == 2
    assert any("qtype: ARA file ostris/accuracy_recovery_adapters/wan22_14b_t2i_torchao_uint4.safetensors: "
               "trained for torchao's uint4 grid" in line for line in dropped)
    assert "not carried over: config.process[0].sample.walk_seed: previews use one fixed seed so steps are comparable" in dropped
    text = path.read_text()
    assert all(f"# {line}" in text for line in dropped)  # the same lines open the profile
    _check(path, tiny_model, demo_data, 1, capsys)


def test_style_with_ema_dop_and_diff_guidance_from_the_ui(tmp_path, capsys, tiny_model, demo_data):
    data, path, dropped = _import(tmp_path, "style_ema_dop_ui", capsys)
    plugins = data["plugins"]
    assert plugins["ema"] == {"decay": 0.99}
    assert plugins["dop"] == {"multiplier": 0.5, "preservation_class": "painting"}
    assert plugins["diff_guidance"] == {"scale": 2.5}
    assert plugins["timesteps"] == {"type": "sigmoid", "bias": "low_noise"}  # ai-toolkit's "style"
    assert plugins["offload"] == {"layers": 0.3}
    assert plugins["quantize"] == {"transformer": "qfloat8", "text_encoder": "qfloat8"}
    assert plugins["sample"]["at_start"] is False and plugins["sample"]["negative_prompt"] == "blurry, low quality"
    assert plugins["sample"]["prompts"] == ["a harbour at dawn in the style of [trigger]", "a fox in a snowy forest, [trigger]"]
    assert "latent_cache" in plugins["enabled"] and data["datasets"][0]["cache_latents"] is True
    assert data["datasets"][1] == {"folder": "/workspace/datasets/paintings_reg", "caption_ext": "txt",
                                   "resolutions": [512], "num_frames": 1, "frame_sampling": "uniform",
                                   "is_regularization": True, "repeats": 2}
    assert data["target"] == {"rank": 16, "alpha": 8, "save_dtype": "bf16"}
    assert data["training"]["max_grad_norm"] == 0.5 and data["training"]["gradient_accumulation"] == 2
    paths = [line.split(": ")[1] for line in dropped]
    assert paths == ["meta", "config.process[0].network.type", "config.process[0].network.conv",
                     "config.process[0].network.lokr_full_rank", "config.process[0].save.save_format",
                     "config.process[0].train.optimizer_params.betas", "config.process[0].sample.samples[1].seed",
                     "config.process[0].performance_log_every", "config.process[0].logging"]
    assert "wantrain has no LoKr yet" in dropped[1]
    # the UI's keys at their no-op values (mask_path: null, controls: [], train_unet: true, ...) say nothing
    assert not any("mask_path" in line or "controls" in line or "train_unet" in line for line in dropped)
    _check(path, tiny_model, demo_data, 2, capsys)


def test_low_noise_only_run(tmp_path, capsys, tiny_model, demo_data):
    data, path, dropped = _import(tmp_path, "low_noise_only", capsys)
    plugins = data["plugins"]
    assert plugins["multistage"] == {"high_noise": False, "low_noise": True}
    assert plugins["text_cache"] == {"unload": True}
    assert plugins["quantize"] == {"transformer": "qfloat8"}
    assert "sample" not in plugins["enabled"] and "sample" not in plugins  # disable_sampling
    assert plugins["timesteps"] == {"type": "shift", "bias": "balanced"}
    assert data["training"]["optimizer"] == "adamw8bit" and data["training"]["lr"] == 1e-4  # not prodigy's lr 1
    assert data["training"]["gradient_accumulation"] == 4 and data["training"]["lr_scheduler"] == "cosine"
    assert data["target"] == {"rank": 64, "alpha": 32, "save_dtype": "fp16"}
    assert dropped == ["not carried over: config.process[0].train.optimizer: prodigy: wantrain has adamw8bit, adamw and "
                       "adafactor; uses adamw8bit at lr 1e-4 (the source's lr is an adaptive optimizer's multiplier)"]
    _check(path, tiny_model, demo_data, 1, capsys)
    profile = load_profile(path, [f"model.name_or_path={tiny_model}"])
    assert profile.plugin_config("multistage").high_noise is False


def test_malformed_yaml_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: extension\nconfig:\n  name: x\n  process:\n    - type: sd_trainer\n   train: [1, 2\n")
    assert main(["import", "ai-toolkit", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:6:") and "not valid YAML" in err[0]
    assert main(["import", "ai-toolkit", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.yaml'}: file not found; give the path of an ai-toolkit .yaml config"


def test_unknown_keys_are_one_error_line_each(tmp_path, capsys):
    text = (CONFIGS / "char_24gb_uint4_ara.yaml").read_text()
    text = text.replace("        steps: 2000", "        stpes: 2000").replace("          caption_ext:", "          caption_extt:")
    text = text.replace("          train_low_noise: true", "          train_low_noise: true\n          train_mid_noise: true")
    bad = tmp_path / "typos.yaml"
    bad.write_text(text)
    assert main(["import", "ai-toolkit", str(bad), "-o", str(tmp_path / "p.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: config.process[0].model.model_kwargs.train_mid_noise: unknown key (got true); not an ai-toolkit key; check the spelling",
        "error: config.process[0].train.stpes: unknown key (got 2000); not an ai-toolkit key; check the spelling",
        "error: config.process[0].datasets[0].caption_extt: unknown key (got 'txt'); not an ai-toolkit key; check the spelling",
    ]
    assert not (tmp_path / "p.toml").exists()


def _job(model: dict, datasets: list[dict], **train) -> dict:
    return {"job": "extension", "config": {"name": "x", "process": [
        {"type": "sd_trainer", "model": model, "train": train, "datasets": datasets}]}}


def test_the_i2v_and_5b_archs_map():
    i2v = C.convert(_job({"arch": "wan22_14b_i2v", "low_vram": True}, [{"folder_path": "d", "do_i2v": True}]))
    assert i2v.profile["model"]["arch"] == "wan22_i2v_a14b" and "multistage" in i2v.plugins
    assert i2v.plugins["offload"] == {"experts": True} and i2v.dropped == []
    # the 5B: one expert (no multistage, nothing to park), do_i2v per dataset -> the share of i2v samples
    five = C.convert(_job({"arch": "wan22_5b", "low_vram": True}, [{"folder_path": "a", "do_i2v": True}, {"folder_path": "b", "do_i2v": False}],
                          switch_boundary_every=10))
    assert five.profile["model"] == {"arch": "wan22_ti2v_5b", "i2v_probability": 0.5}
    assert "multistage" not in five.plugins and "offload" not in five.plugins
    assert [line.split(": ", 2)[1] for line in five.dropped] == [
        "config.process[0].model.low_vram", "config.process[0].train.switch_boundary_every", "config.process[0].datasets[*].do_i2v"]
    unset = C.convert(_job({"arch": "wan22_5b"}, [{"folder_path": "a"}]))
    assert unset.profile["model"]["i2v_probability"] == 1.0  # ai-toolkit's default: do_i2v = true
    t2v_only = C.convert(_job({"arch": "wan22_5b"}, [{"folder_path": "a", "do_i2v": False}]))
    assert t2v_only.profile["model"]["i2v_probability"] == 0.0
    t2v = C.convert(_job({"arch": "wan22_14b"}, [{"folder_path": "a", "do_i2v": True}]))
    assert t2v.dropped == ["not carried over: config.process[0].datasets[*].do_i2v: a text-to-video model has no start frame"]


def test_other_architectures_and_shapes_are_errors():
    base = _job({"arch": "flux"}, [{"folder_path": "d"}])
    with pytest.raises(C.WantrainError) as info:
        C.convert(base)
    assert info.value.lines() == ["error: config.process[0].model.arch: not a Wan 2.2 architecture (got 'flux'); "
                                  "wantrain trains wan22_14b, wan22_14b_t2v, wan22_14b_i2v, wan22_5b"]
    with pytest.raises(C.WantrainError) as info:
        C.convert({"job": "extension", "config": {"name": "x", "process": [{}, {}]}})
    assert info.value.lines()[0].startswith("error: config.process: wantrain converts one process per job (got 2)")
    with pytest.raises(C.WantrainError):
        C.convert(["not", "a", "mapping"])


@pytest.mark.parametrize("section,table", [("train", C.TRAIN_DROPPED), ("model", C.MODEL_DROPPED),
                                           ("network", C.NETWORK_DROPPED), ("save", C.SAVE_DROPPED),
                                           ("datasets[0]", C.DATASET_DROPPED), ("sample", C.SAMPLE_DROPPED)])
def test_every_dropped_key_with_a_real_value_is_named(section, table):
    """A value that changes something in ai-toolkit yields exactly one
    `not carried over: <yaml path>: <why>` line for that key."""
    keys = [k for k, (noop, _) in table.items() if C.NOOP not in noop]
    process = {"type": "sd_trainer", "datasets": [{"folder_path": "d"}], "sample": {"prompts": ["p"]}}
    for key in keys:
        target = process["datasets"][0] if section == "datasets[0]" else process.setdefault(section, {})
        target[key] = "a value ai-toolkit acts on"
    conv = C.convert({"job": "extension", "config": {"name": "x", "process": [process]}})
    named = [line for line in conv.dropped if line.startswith(f"not carried over: config.process[0].{section}.")]
    assert sorted(line.split(": ")[1].rsplit(".", 1)[1] for line in named) == sorted(keys)


def test_printed_profile_matches_the_file(tmp_path):
    text, dropped = import_config(str(CONFIGS / "low_noise_only.yaml"), None)
    assert text.startswith("# Converted from the ai-toolkit job config")
    assert "#   wantrain check profile.toml" in text
    assert tomllib.loads(text)["job"]["name"] == "skin_detail_low"


def test_listed_in_a_profile_it_does_nothing(profile_data):
    """It only adds a command: enabling it changes no run."""
    from wantrain.commands.check import check

    profile_data["plugins"] = {"enabled": ["aitoolkit"]}
    assert check(load_profile(data=profile_data)) == []


def test_alpha_defaults_like_ai_toolkit():
    def target(network):
        process = {"type": "sd_trainer", "network": network, "datasets": [{"folder_path": "d"}]}
        return C.convert({"job": "extension", "config": {"name": "x", "process": [process]}}).profile["target"]

    assert target({"type": "lora", "linear": 32}) == {"rank": 32, "alpha": 1.0}  # ai-toolkit: alpha 1.0
    assert target({"type": "lora", "rank": 8, "alpha": 4}) == {"rank": 8, "alpha": 4}
    assert target({"type": "lora", "linear": 16, "linear_alpha": 16, "alpha": 2}) == {"rank": 16, "alpha": 16}
