"""What training learned is what inference produces: a LoRA trained on one
clip pulls the preview sampler's output (same Euler/shift schedule as the
previews, both experts routed at the boundary) towards that clip's latents.

This checks the conventions training and inference must share -- the
velocity's sign, t = sigma * 1000, the expert boundary, the scheduler shift,
the text states -- end to end: any mismatch leaves the samples as far from
the clip as the base model's."""

from __future__ import annotations

import contextlib

import pytest
import torch

from wantrain import flow
from wantrain.data.demo import moving_shapes
from wantrain.data.media import write_video
from wantrain.plugins.sample import render as sampling
from wantrain.loop import train
from wantrain.profile import load_profile

PROMPT = "sks shapes moving"


def _sample(run, use_lora: bool, seed: int) -> torch.Tensor:
    settings = sampling.SampleSettings(prompts=(PROMPT,), num_frames=9, width=64, height=64, steps=30,
                                       shift=3.0, guidance_high=1.0, guidance_low=1.0, seed=seed)
    scheduler = sampling.make_scheduler(settings)
    routes = [flow.expert_for(float(t), run.boundary) for t in scheduler.timesteps]
    cond = run.encode_prompts([PROMPT])
    x = sampling.initial_noise(settings, 1)[0]
    with torch.no_grad():
        for expert in ("high_noise", "low_noise"):
            steps = [i for i, r in enumerate(routes) if r == expert]
            with contextlib.nullcontext() if use_lora else run.lora_disabled(expert):
                x = sampling.denoise(run, expert, scheduler, steps, x, cond, None, 1.0)
    return x


@pytest.mark.slow
def test_one_clip_lora_pulls_samples_to_the_clip(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_video(data / "clip.mp4", moving_shapes(9, 64, 64, seed=3), fps=16)
    (data / "clip.txt").write_text(PROMPT)
    profile = load_profile(data={
        "job": {"name": "one", "output_dir": str(tmp_path / "out"), "device": "cpu", "seed": 1, "trigger_word": "sks"},
        "model": {"name_or_path": str(tiny_model), "dtype": "fp32", "gradient_checkpointing": False, "max_sequence_length": 32},
        "target": {"rank": 32, "alpha": 32},
        "training": {"steps": 600, "lr": 1e-3, "lr_scheduler": "constant", "num_workers": 0},
        "datasets": [{"folder": str(data), "resolutions": [64], "num_frames": 9, "cache_latents": True}],
        "plugins": {"enabled": ["latent_cache", "text_cache"]},
    })
    run = train(profile)
    clip = run.encode_videos(run.data.next_batch(1)).cpu()
    for seed in (0, 1):
        base = float(((_sample(run, False, seed) - clip) ** 2).mean())
        tuned = float(((_sample(run, True, seed) - clip) ** 2).mean())
        assert tuned < 0.6 * base, (seed, tuned, base)
