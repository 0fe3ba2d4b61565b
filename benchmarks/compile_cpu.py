"""``[training] compile`` on the CPU: eager vs regionally compiled blocks
(``torch.compile`` per block, inductor), one training step at a time on a
Wan expert of reduced depth, rank-16 LoRA on the ten usual linears (attached as
training attaches it: adapter computed in the model dtype), gradient checkpointing on --
plain weights and each quantized format. Not part of the test suite.

    python benchmarks/compile_cpu.py [--dim 1536 --heads 12 --ffn 8960 --blocks 2]
                                     [--frames 4 --side 32] [--steps 4] [--dtype fp32|bf16]
                                     [--weights none qint8 qint4 uint4] [--backend inductor]

Per weight format it prints: the first compiled step (compile included) and
the steady seconds per step, eager and compiled, their ratio, the largest
relative difference of the loss and of the LoRA gradients against eager, and
whether the count of compiled graphs stayed at its first value over the
steps (no recompiles). Each format runs in a fresh process (dynamo's caches
and counters are per process). Defaults: Wan 2.1-1.3B width (1536, 12 heads,
ffn 8960), 2 blocks, 1,024 video tokens, fp32 (the CPU's training dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from diffusers import WanTransformer3DModel
from wantrain import compilation
from wantrain.lora import attach_lora
from wantrain.profile import LORA_MODULES
from wantrain.plugins.quantize import loader
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a["dtype"]]
config = dict(patch_size=[1, 2, 2], num_attention_heads=a["heads"], attention_head_dim=a["dim"] // a["heads"], in_channels=16,
              out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=a["ffn"], num_layers=a["blocks"], cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

def expert(compiled):
    torch.manual_seed(0)
    m = WanTransformer3DModel(**config).to(dtype)
    if a["weights"] != "none":
        loader.quantize_linears(m, a["weights"], exclude=loader.DEFAULT_EXCLUDE)
    params = attach_lora(m, 16, 16.0, LORA_MODULES, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:  # B non-zero: every LoRA weight gets a gradient
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    m.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    m.enable_gradient_checkpointing()
    m.train()
    compilation.compile_blocks(m, compiled, backend=a["backend"])
    return m, params

def step(m, params, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, a["frames"], a["side"], a["side"], generator=g).to(dtype)
    text = torch.randn(1, 64, 4096, generator=g).to(dtype)
    t0 = time.perf_counter()
    pred = m(hidden_states=x, timestep=torch.tensor([300.0 + seed]), encoder_hidden_states=text, return_dict=False)[0]
    loss = pred.float().square().mean()
    loss.backward()
    took = time.perf_counter() - t0
    grads = torch.cat([p.grad.float().flatten() for p in params])
    for p in params:
        p.grad = None
    return took, loss.detach(), grads

out = {}
for name, compiled in (("eager", False), ("compiled", True)):
    m, params = expert(compiled)
    times, losses, grads, counts = [], [], [], []
    for s in range(a["steps"]):
        took, loss, grad = step(m, params, s)
        times.append(took); losses.append(loss); grads.append(grad); counts.append(compilation.graph_count())
    out[name] = {"times": times, "losses": losses, "grads": grads, "counts": counts}
    del m, params
e, c = out["eager"], out["compiled"]
rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
print(json.dumps({"first": c["times"][0], "eager": e["times"][1:], "compiled": c["times"][1:],
                  "loss": max(rel(x, y) for x, y in zip(c["losses"], e["losses"])),
                  "grad": max(rel(x, y) for x, y in zip(c["grads"], e["grads"])),
                  "graphs": c["counts"], "tokens": a["frames"] * (a["side"] // 2) ** 2}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--side", type=int, default=32, help="latent height = width (patch 2: side/2 squared tokens a frame)")
    ap.add_argument("--steps", type=int, default=4, help="steps per variant; the first is the compile")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--weights", nargs="+", default=["none", "qint8", "qint4", "uint4"])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    print(f"{args.blocks} blocks, dim {args.dim}, {args.heads} heads, ffn {args.ffn}, {args.dtype}, "
          f"{args.frames}x{args.side}x{args.side} latent, {args.threads} threads, backend {args.backend}")
    print(f"{'weights':<8} {'compile s':>9} {'eager s/step':>12} {'compiled':>9} {'speed-up':>8} "
          f"{'loss rel':>9} {'grad rel':>9}  graphs over the steps")
    for weights in args.weights:
        spec = {**vars(args), "weights": weights}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            err = [line for line in proc.stderr.strip().splitlines() if "Error" in line or "error" in line]
            print(f"{weights:<8} failed: {(err or proc.stderr.strip().splitlines() or ['?'])[-1][:160]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        eager, comp = statistics.median(r["eager"]), statistics.median(r["compiled"])
        steady = "no recompiles" if len(set(r["graphs"])) == 1 else f"recompiled: {r['graphs']}"
        print(f"{weights:<8} {r['first']:>9.1f} {eager:>12.2f} {comp:>9.2f} {eager / comp:>7.2f}x "
              f"{r['loss']:>9.1e} {r['grad']:>9.1e}  {steady} ({r['tokens']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
