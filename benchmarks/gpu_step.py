"""One training step of the real-size Wan 2.2 A14B expert on a GPU: seconds
per step, peak VRAM, and the fraction of the card's FLOP limit.

The expert has the A14B architecture (dim 5120, 40 blocks, 40 heads x 128,
ffn 13824) with random bf16 weights made block by block on the GPU (no
download), quantized to qint4 with an SVD accuracy-recovery adapter (rank
16), a rank-16 fp32 LoRA on the ten usual targets, gradient checkpointing,
AdamW; input 512x512x33 frames (9216 video tokens) and 512 text tokens.
Configurations: all blocks resident, and layer offloading (a fraction of the
blocks streamed from pinned host memory with prefetch, ``--layers``).

FLOP per step: counted from the shapes (linear layers, self- and
cross-attention; forward + recompute + 2x backward with checkpointing), next
to the ~1.0e15 the design assumes. Fraction = FLOP / (seconds x the card's
dense bf16 peak: 989e12 for H100/H200 SXM, or ``--peak-tflops``).

    .venv/bin/python benchmarks/gpu_step.py [--steps 3] [--layers 0.0 0.5] [--rank 16]

Needs CUDA; exits with a message otherwise. About 3-5 minutes on one H100.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def build_expert(device: torch.device, ara_rank: int, seed: int = 0) -> torch.nn.Module:
    """A14B expert, random weights, each block made on the GPU then quantized."""
    from accelerate.utils import set_module_tensor_to_device

    from wantrain import model
    from wantrain.commands.estimate import A14B_TRANSFORMER
    from wantrain.plugins.quantize import ara, loader

    module = model.build_empty(A14B_TRANSFORMER)
    g = torch.Generator(device).manual_seed(seed)

    def fill(sub: torch.nn.Module, prefix: str, recurse: bool = True) -> None:
        for name, p in list(sub.named_parameters(recurse=recurse)):
            if p.device.type != "meta":
                continue
            std = 0.02 if p.dim() >= 2 else 0.0
            value = torch.randn(p.shape, generator=g, device=device) * std + (1.0 if "norm" in name and p.dim() == 1 else 0.0)
            keep32 = any(k in (prefix + name).split(".") for k in module._keep_in_fp32_modules)
            dtype = torch.float32 if keep32 else torch.bfloat16
            set_module_tensor_to_device(sub, name, device, value=value.to(dtype), dtype=dtype)

    fill(module, "", recurse=False)  # scale_shift_table
    for name, child in module.named_children():
        if name != "blocks":
            fill(child, name + ".")
    for i, block in enumerate(module.blocks):
        fill(block, f"blocks.{i}.")
        originals = loader.quantize_linears(block, "qint4", loader.DEFAULT_EXCLUDE, prefix=f"blocks.{i}.")
        for full, weight in originals.items():
            layer = block.get_submodule(full[len(f"blocks.{i}."):])
            down, up = ara.svd_ara(weight, ara.dequantized_weight(layer), ara_rank, torch.bfloat16)
            ara.attach_ara(layer, down, up)
        del originals
    return module.to(device).requires_grad_(False)


def flop_per_step(tokens: int, text: int, checkpointing: bool, dim=5120, ffn=13824, blocks=40) -> float:
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 2 * text * 2 * dim * dim
    attention = 4 * tokens * tokens * dim + 4 * tokens * text * dim
    forward = blocks * (linear + attention)
    return forward * (4 if checkpointing else 3)


def peak_flops(name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    return 989e12 if any(k in name for k in ("H100", "H200", "H800", "GH200")) else float("nan")


def run_config(module, params, layers: float, steps: int, device, inputs) -> tuple[float, float]:
    sys.path.insert(0, ".")
    from wantrain.plugins.offload import streamed_blocks
    from wantrain.plugins.offload.moves import BlockStreamer, ExpertHome

    streamer = None
    if layers > 0:
        home = ExpertHome("high_noise", module, pin=True, real=True)
        home.streamed = set(streamed_blocks(len(module.blocks), layers))
        home.index_blocks()
        placement: dict = {}
        for i in home.streamed:  # the streamed blocks' frozen weights go to pinned host memory
            for owner, slot, kind in home.block_slots(i):
                from wantrain.plugins.offload.moves import put

                put(owner, slot, kind, home.host(owner, slot))
        streamer = BlockStreamer(home, device, placement, prefetch=True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, text, target = inputs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        pred = module(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        if streamer is not None:
            streamer.reset()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step > 0:  # the first step warms up kernels and allocator
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if streamer is not None:
        streamer.reset()
        for i in streamer.order:  # back on the device for the next configuration
            for owner, slot, kind in streamer.home.block_slots(i):
                from wantrain.plugins.offload.moves import put, to_device

                put(owner, slot, kind, to_device(streamer.home.host(owner, slot), device))
        streamer.remove()
    del opt
    return sum(times) / len(times), peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="measured steps per configuration (after one warm-up step)")
    ap.add_argument("--layers", type=float, nargs="+", default=[0.0, 0.5], help="layer offloading fractions to measure")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not an H100/H200")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU (none found); nothing measured. "
              "Use `wantrain estimate PROFILE --vram-gb N` for memory figures without a GPU.")
        return 1
    from wantrain import estimate as est
    from wantrain.lora import attach_lora
    from wantrain.profile import LORA_MODULES

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    module = build_expert(device, args.rank)
    params = attach_lora(module, args.rank, float(args.rank), LORA_MODULES, seed=0)
    module.enable_gradient_checkpointing()
    module.train()
    build_s = time.perf_counter() - t0
    lat_f, lat = (args.frames - 1) // 4 + 1, args.size // 8
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 16, lat_f, lat, lat, generator=g, device=device, dtype=torch.bfloat16)
    inputs = (x, torch.tensor([700.0], device=device),
              torch.randn(1, 512, 4096, generator=g, device=device, dtype=torch.bfloat16),
              torch.randn(x.shape, generator=g, device=device))
    tokens = lat_f * lat * lat // 4
    flop = flop_per_step(tokens, 512, True)
    limit = peak_flops(name, args.peak_tflops)
    settings = est.Settings(transformer="qint4+ara", rank=args.rank, modules=LORA_MODULES, frames=args.frames,
                            height=args.size, width=args.size, experts=1, text_cache=True, latent_cache=True)
    print(f"device: {name}; expert built (random A14B, qint4 + SVD ARA r{args.rank}) in {build_s:.0f} s; "
          f"{tokens} video tokens; FLOP/step {flop:.3g} (design: ~1.0e15)")
    print(f"{'layers offloaded':>16} {'s/step':>8} {'peak VRAM GiB':>14} {'estimate GiB':>13} {'FLOP fraction':>14}")
    for layers in args.layers:
        seconds, peak = run_config(module, params, layers, args.steps, device, inputs)
        e = est.estimate(attrs_evolve(settings, offload_layers=layers), est.A14B_TRANSFORMER, suggest=False)
        predicted = e.gpu_peak - est.CUDA_OVERHEAD_GIB
        print(f"{layers:>16.2f} {seconds:>8.2f} {peak:>14.2f} {predicted:>13.2f} {flop / seconds / limit:>14.1%}")
    print("estimate = wantrain estimate's training peak without its 1.5 GiB CUDA context allowance "
          "(max_memory_allocated does not see the context)")
    return 0


def attrs_evolve(obj, **changes):
    import attrs

    return attrs.evolve(obj, **changes)


if __name__ == "__main__":
    sys.exit(main())
