"""Kernel overhead: wantrain's loop vs a hand-written PyTorch loop doing the
same math on the same small Wan-shaped model (same batch, same LoRA, same
optimizer). Prints both step times and the ratio (target <= 1.03).

    python benchmarks/kernel_overhead.py [--steps 60] [--repeats 3]

Both loops get the same pre-encoded latents and text states and the same
pre-decoded batch, so the figure measures the kernel (events, routing,
bookkeeping, metrics), not the VAE, UMT5 or video decoding.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from wantrain import hookimpl
from wantrain.loop import load, setup, train_step
from wantrain.profile import load_profile
from wantrain.commands.tiny import make_tiny_model


class FixedInputs:
    """Answers encode_videos / encode_prompts with fixed tensors (both loops
    then do identical model work)."""

    def __init__(self, latents, text):
        self.latents, self.text = latents, text

    @hookimpl
    def encode_videos(self, run, batch):
        return self.latents

    @hookimpl
    def encode_prompts(self, run, prompts):
        return self.text


class FixedData:
    """One pre-decoded batch, served every step (decoding is the data
    pipeline's cost, overlapped by its workers; not the kernel's)."""

    def __init__(self, batch):
        self.batch = batch

    def next_batch(self, batch_size):
        return self.batch

    def close(self):
        pass


def build(model_dir: Path, media_dir: Path, out: Path, size: int):
    from wantrain.data.demo import write_demo_data

    if not any(media_dir.iterdir()):
        write_demo_data(media_dir, seed=0)
    data = {
        "job": {"name": "bench", "output_dir": str(out), "device": "cpu", "seed": 0, "trigger_word": "sks"},
        "model": {"name_or_path": str(model_dir), "dtype": "fp32", "gradient_checkpointing": False, "max_sequence_length": 64},
        "target": {"rank": 16, "alpha": 16},
        "training": {"steps": 100000, "lr": 1e-4},
        "datasets": [{"folder": str(media_dir), "resolutions": [size], "num_frames": 9, "default_caption": "a clip"}],
    }
    run = setup(load_profile(data=data))
    load(run)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, size // 8, size // 8, generator=g)
    text = torch.randn(1, 64, 32, generator=g)
    run.pm.register(FixedInputs(latents, text), name="fixed_inputs")
    batch = run.data.next_batch(1)
    run.data.close()
    run.data = FixedData(batch)
    return run, latents, text


def kernel_steps(run, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run)
    return (time.perf_counter() - t0) / steps


def handwritten_steps(run, latents, text, steps: int) -> float:
    """The same math with no kernel: alternate experts, uniform t in range,
    flow-matching MSE, clip, AdamW + schedule."""
    experts = [run.experts["high_noise"], run.experts["low_noise"]]
    params = [run.lora_parameters["high_noise"], run.lora_parameters["low_noise"]]
    opt, sched, g = run.optimizer, run.lr_scheduler, torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        i = step % 2
        lo, hi = (875.0, 1000.0) if i == 0 else (0.0, 875.0)
        t = lo + (hi - lo) * torch.rand(1, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        pred = experts[i](hidden_states=noisy, timestep=t, encoder_hidden_states=text, return_dict=False)[0].float()
        loss = torch.nn.functional.mse_loss(pred, noise - latents)
        loss.backward()
        float(torch.nn.utils.clip_grad_norm_(params[i], 1.0))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
    return (time.perf_counter() - t0) / steps


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "media").mkdir()
        make_tiny_model(tmp / "model")
        run, latents, text = build(tmp / "model", tmp / "media", tmp / "out", args.size)
        kernel_steps(run, 10)  # warm-up both paths
        handwritten_steps(run, latents, text, 10)
        ours, theirs = [], []
        for i in range(args.repeats):  # ABBA order: drift in machine speed cancels out
            if i % 2:
                theirs.append(handwritten_steps(run, latents, text, args.steps))
                ours.append(kernel_steps(run, args.steps))
            else:
                ours.append(kernel_steps(run, args.steps))
                theirs.append(handwritten_steps(run, latents, text, args.steps))
    k, h = statistics.median(ours), statistics.median(theirs)
    print(f"model: tiny Wan 2.2 expert (4 blocks, dim 128), latents {tuple(latents.shape)}, rank 16, CPU")
    print(f"wantrain loop   : {k * 1000:8.2f} ms/step (median of {args.repeats} x {args.steps} steps)")
    print(f"hand-written    : {h * 1000:8.2f} ms/step")
    print(f"ratio           : {k / h:8.3f}  (target <= 1.03)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
