"""Training steps of the real-size Wan 2.2 A14B expert on one GPU: seconds per
step, peak VRAM, the fraction of the card's FLOP limit, and ``wantrain
estimate``'s peak for the same run -- with torch.compile off and on (regional:
each block compiled, one graph reused by all 40) and with each attention
backend that trains on this machine (``[model] attention``, wantrain.attention).

    python benchmarks/gpu_step.py [--wheels DIR] [--steps 2] [--budget 540]
    python benchmarks/gpu_step.py --smoke        # the same code on the CPU, tiny shapes (no GPU needed)

The expert has the A14B architecture (dim 5120, 40 blocks, 40 heads x 128,
ffn 13824) with random bf16 weights made block by block on the GPU (no
download), quantized to qint4 with an SVD accuracy-recovery adapter (rank
16), a rank-16 LoRA on the ten usual targets (fp32 masters, bf16 compute),
gradient checkpointing, AdamW; 512 cached text tokens. Sizes: 512x512x33
(9,216 video tokens); 1024x1024x81 (86,016) too on cards of 80 GB or more.

One script, within ten minutes on an H100/H200: ``--wheels DIR`` first
installs, from local wheel files only (``pip --no-index --find-links``),
whatever of wantrain's needs and the optional kernels (flash-attn, xformers)
is missing and present there; each configuration runs one warm-up step and
``--steps`` timed steps; configurations left when ``--budget`` seconds have
passed are listed as skipped. The 1024 size runs the ``auto`` backend only.

FLOP per step: counted from the shapes (linears, self- and cross-attention;
forward + recompute + 2x backward with checkpointing). Fraction = FLOP /
(seconds x the card's dense bf16 peak: 989e12 for H100/H200, or
``--peak-tflops``). Estimate = the training phase of ``wantrain estimate`` for
the same settings, without its 1.5 GiB CUDA-context allowance
(``max_memory_allocated`` does not see the context).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

NEEDS = {"diffusers": "diffusers", "peft": "peft", "optimum.quanto": "optimum-quanto", "accelerate": "accelerate"}
OPTIONAL = {"flash_attn": "flash-attn", "xformers": "xformers"}
SMOKE = {"num_attention_heads": 2, "attention_head_dim": 128, "ffn_dim": 512, "num_layers": 2}


def _importable(module: str) -> bool:
    """``module`` can be imported (a dotted name whose parent package is missing: no)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def install_from_wheels(wheels: Path) -> None:
    """pip-install, from ``wheels`` only, what is missing (needed, then optional kernels)."""
    for names, required in ((NEEDS, True), (OPTIONAL, False)):
        missing = [pkg for mod, pkg in names.items() if not _importable(mod)]
        for pkg in missing:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), pkg]
            ok = subprocess.run(cmd, capture_output=True, text=True).returncode == 0
            print(f"install {pkg} from {wheels}: {'ok' if ok else 'not there' + (' (required)' if required else '')}")
    importlib.invalidate_caches()


def build_expert(config: dict, device: torch.device, ara_rank: int, seed: int = 0) -> torch.nn.Module:
    """The expert of ``config``, random bf16 weights made block by block on ``device``, each block quantized
    to qint4 with an SVD ARA as it is made (the whole bf16 expert never exists)."""
    from accelerate.utils import set_module_tensor_to_device

    from wantrain import model
    from wantrain.plugins.quantize import ara, loader

    module = model.build_empty(config)
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


def flop_per_step(tokens: int, text: int, checkpointing: bool, dim: int, ffn: int, blocks: int) -> float:
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 2 * text * 2 * dim * dim
    attention = 4 * tokens * tokens * dim + 4 * tokens * text * dim
    return blocks * (linear + attention) * (4 if checkpointing else 3)


def peak_flops(name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    return 989e12 if any(k in name for k in ("H100", "H200", "H800", "GH200")) else float("nan")


def estimate_gib(size: int, frames: int, rank: int, config: dict) -> float:
    """``wantrain estimate``'s training-phase GPU peak for this run, less the CUDA-context allowance."""
    from wantrain.commands import estimate as est
    from wantrain.plugins.quantize import WEIGHT_BYTES, loader
    from wantrain.profile import LORA_MODULES

    s = est.Settings(dtype="bf16", weight_bytes=WEIGHT_BYTES["qint4+ara"], weight_format="qint4+ara",
                     quantize_exclude=loader.DEFAULT_EXCLUDE, ara_rank=rank, rank=rank, modules=LORA_MODULES,
                     frames=frames, height=size, width=size, experts=1, experts_trained=1, checkpointing=True,
                     text_states_cached=True, text_encoder_unloaded=True, latents_cached=True)
    e = est.estimate(s, config)
    training = ("transformer weights", "ARA", "streamed", "LoRA", "activations", "text encoder", "VAE")
    return sum(gpu for item, gpu, _, _ in e.rows if item.startswith(training))


def inputs(size: int, frames: int, device: torch.device, text_dim: int = 4096):
    lat_f, lat = (frames - 1) // 4 + 1, size // 8
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 16, lat_f, lat, lat, generator=g, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, text_dim, generator=g, device=device, dtype=torch.bfloat16)
    target = torch.randn(x.shape, generator=g, device=device)
    return (x, torch.tensor([700.0], device=device), text, target), lat_f * lat * lat // 4


def set_compiled(module: torch.nn.Module, on: bool) -> None:
    """``[training] compile`` as training does it (:func:`wantrain.compilation.compile_blocks`), or back to eager."""
    from wantrain import compilation

    if on:
        compilation.compile_blocks(module, True)
        return
    for block in module.blocks:
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None


def timed_steps(module, params, data, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step after one warm-up, peak GiB allocated)."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, text, target = data
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        pred = module(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return sum(times) / len(times), peak


def plan(device: torch.device, smoke: bool, big: bool) -> list[tuple[int, int, str, bool]]:
    """(size, frames, attention, compile) configurations, the most informative first."""
    from wantrain import attention

    dtype = torch.bfloat16
    backends = [n for n in attention.BACKENDS if attention.unusable(n, device, dtype, training=True) is None]
    auto = attention.resolve("auto", device, dtype)
    size, frames = (64, 5) if smoke else (512, 33)
    configs = [(size, frames, auto, False), (size, frames, auto, True)]
    configs += [(size, frames, b, c) for b in backends if b != auto for c in (False, True)]
    if big:
        configs += [(1024, 81, auto, False), (1024, 81, auto, True)]
    return configs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, help="a folder of wheel files to install missing packages from (no index)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up step)")
    ap.add_argument("--budget", type=float, default=540, help="seconds after which remaining configurations are skipped")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not an H100/H200")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing real")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.wheels:
        install_from_wheels(args.wheels)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU (none found); nothing measured. `--smoke` runs the script on the CPU; "
              "`wantrain estimate PROFILE --vram-gb N` gives memory figures without a GPU.")
        return 1
    from wantrain import attention
    from wantrain.commands.estimate import A14B_TRANSFORMER
    from wantrain.lora import attach_lora
    from wantrain.profile import LORA_MODULES

    config = {**A14B_TRANSFORMER, **SMOKE} if args.smoke else A14B_TRANSFORMER
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(device)
    big = not args.smoke and torch.cuda.get_device_properties(device).total_memory >= 79 * 2**30
    module = build_expert(config, device, args.rank)
    params = attach_lora(module, args.rank, float(args.rank), LORA_MODULES, seed=0)
    module.enable_gradient_checkpointing()
    module.train()
    dim, ffn, blocks = (config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"],
                        config["num_layers"])
    limit = peak_flops(name, args.peak_tflops)
    print(f"device: {name}; expert built (random A14B shape, qint4 + SVD ARA r{args.rank}, LoRA r{args.rank}) "
          f"in {time.perf_counter() - start:.0f} s")
    print(f"{'size':>14} {'attention':>14} {'compile':>7} {'s/step':>8} {'peak GiB':>9} {'estimate GiB':>13} "
          f"{'FLOP frac':>9}")
    for size, frames, backend, compiled in plan(device, args.smoke, big):
        label = f"{size}x{size}x{frames}"
        if time.perf_counter() - start > args.budget:
            print(f"{label:>14} {backend:>14} {str(compiled):>7}  skipped (budget of {args.budget:.0f} s spent)")
            continue
        data, tokens = inputs(size, frames, device, config.get("text_dim", 4096))
        try:
            attention.apply(module, backend, device, torch.bfloat16)
            set_compiled(module, compiled)
            seconds, peak = timed_steps(module, params, data, args.steps, device)
        except Exception as exc:  # a backend or compile failing on this card is a result, not the end
            print(f"{label:>14} {backend:>14} {str(compiled):>7}  failed: {str(exc).strip().splitlines()[0][:120]}")
            continue
        finally:
            set_compiled(module, False)
        flop = flop_per_step(tokens, 512, True, dim, ffn, blocks)
        predicted = estimate_gib(size, frames, args.rank, config)
        print(f"{label:>14} {backend:>14} {str(compiled):>7} {seconds:>8.2f} {peak:>9.2f} {predicted:>13.2f} "
              f"{flop / seconds / limit:>9.1%}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
