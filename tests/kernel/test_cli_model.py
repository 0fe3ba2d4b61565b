"""CLI commands and the model layer: the tiny model's layout, hub ids,
text encoding identical to WanPipeline's, plugin listing."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from wantrain import model
from wantrain.archs import checks


def wantrain(*args, **kw):
    return subprocess.run([sys.executable, "-m", "wantrain", *args], capture_output=True, text=True, **kw)


def test_make_tiny_model_layout_and_seed(tmp_path):
    proc = wantrain("make-tiny-model", str(tmp_path / "m"), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "m"
    index = json.loads((root / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875
    for sub in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert sub in index and (root / sub).is_dir()
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    src, idx = model.load_model_index(str(root))
    hi = model.load_expert(src, "high_noise", torch.float32)
    lo = model.load_expert(src, "low_noise", torch.float32)
    assert not any(p.requires_grad for p in hi.parameters())
    assert not torch.equal(hi.blocks[0].attn1.to_q.weight, lo.blocks[0].attn1.to_q.weight), "two distinct experts"
    assert hi.config.num_layers == 4 and hi.config.num_attention_heads == 4 and hi.config.attention_head_dim == 32


def test_model_source_parsing(tmp_path):
    s = model.ModelSource("Wan-AI/Wan2.2-T2V-A14B-Diffusers@abc123")
    assert (s.repo, s.revision, s.local) == ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "abc123", None)
    assert checks.check_model_source("Wan-AI/Wan2.2-T2V-A14B-Diffusers") == []
    (problem,) = checks.check_model_source(str(tmp_path))
    assert problem.line().startswith("error: model.name_or_path: is not a Diffusers model folder (no model_index.json)")
    (problem,) = checks.check_model_source("not a model")
    assert "neither an existing folder nor a hub id" in problem.line()


def test_text_states_match_wanpipeline(tiny_model):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_model), torch_dtype=torch.float32)
    prompts = ["a sks person  walking &amp; waving", "two shapes"]
    theirs = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=48, device=torch.device("cpu"), dtype=torch.float32)
    ours = model.encode_text(pipe.tokenizer, pipe.text_encoder, prompts, 48, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(ours, theirs)
    assert float(ours[1, 10:].abs().sum()) == 0.0, "padding is zeroed"


def test_latents_round_trip_normalisation(tiny_model):
    src, _ = model.load_model_index(str(tiny_model))
    vae = model.load_vae(src)
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latents = model.encode_pixels(vae, pixels)
    assert latents.shape == (1, 16, 2, 4, 4)
    raw = vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    assert model.decode_latents(vae, latents).shape == (1, 3, 5, 32, 32)


def test_plugins_command_lists_builtins_and_events():
    proc = wantrain("plugins")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert "select_expert" in lines["wantrain.core"] and "write_lora" in lines["wantrain.core"]
    from wantrain import registry

    for name in registry.builtin_names():
        assert name in lines, f"{name} missing from `wantrain plugins`"
        assert lines[name] != "(no events)"


def test_run_with_missing_model_is_one_line(tmp_path, demo_data):
    (tmp_path / "p.toml").write_text(
        f'[job]\nname = "x"\noutput_dir = "{tmp_path}/out"\ndevice = "cpu"\ntrigger_word = "sks"\n'
        f'[model]\nname_or_path = "{tmp_path}/missing"\n[[datasets]]\nfolder = "{demo_data}"\nresolutions = [32]\nnum_frames = 5\n'
    )
    proc = wantrain("run", str(tmp_path / "p.toml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: model.name_or_path: is neither an existing folder nor a hub id like 'org/name' (got '{tmp_path}/missing')" in proc.stderr
