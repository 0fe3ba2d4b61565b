"""The Wan 2.2 A14B shape proven on the CPU: one random expert with the real
A14B config, in the real Diffusers layout, loaded quantized, trained one step
with a rank-16 LoRA, its LoRA written -- with peak RSS, times, file size and
``wantrain estimate``'s lines against the actual bytes. Not part of the test
suite.

    python benchmarks/real_scale_cpu.py [--dir /tmp/wantrain_a14b] [--qtypes qint4 uint4] [--tokens 4] [--keep]
    python benchmarks/real_scale_cpu.py --smoke     # the same code on a two-block, narrow expert (seconds)

Needs (full size): ~27 GiB free disk for the expert (bf16, sharded
safetensors, generated block by block so it never sits in memory whole:
~2.5 min), ~10 GiB RAM per measuring process, and time: per configuration
~2 min load + quantize (+ ~1-2 min SVD ARA) and ~12 min for the one step
(every quantized weight is dequantized three times per step on the CPU). All
four configurations take about an hour on 2 cores. The expert is deleted at
the end unless ``--keep``.

Each configuration runs in a fresh process (so its ``VmHWM`` is its own
peak): load quantized (``--qtypes``; ``uint4`` where the 4-bit plugin has it),
with and without the SVD accuracy-recovery adapter (rank 16), attach the
rank-16 LoRA to the ten usual targets, one training step with gradient
checkpointing at ``--tokens`` video tokens, write the expert's LoRA file (our
ComfyUI layout, bf16). Reported: peak RSS / bf16 size and / the loaded 4-bit
size (goal: within 5 %), load+quantize seconds, ARA seconds, step seconds,
LoRA file size and key count (1,200 tensors for rank 16 on 400 linears), and
the estimate's weight, ARA and LoRA lines against the bytes actually held.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_memory import write_random_expert  # noqa: E402  (the same block-by-block Diffusers writer)

SMOKE = {"num_attention_heads": 2, "attention_head_dim": 128, "ffn_dim": 512, "num_layers": 2}
G = 2**30

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(2)
from safetensors.torch import save_file
from wantrain.model import ModelSource
from wantrain.plugins.quantize import ara as ara_mod, loader
from wantrain.lora import attach_lora, lora_state
from wantrain.formats.lora import from_state, comfy_tensors
from wantrain.profile import LORA_MODULES
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field): return int(line.split()[1]) * 1024
folder, qtype, use_ara, tokens, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), Path(sys.argv[5])
base_rss = status("VmRSS")  # the interpreter with torch, diffusers, peft, quanto and torchao imported
ara_s = [0.0]  # time inside the SVD of each layer's residual
_svd = ara_mod.svd_ara
def timed_svd(*args, **kwargs):
    t = time.perf_counter()
    try:
        return _svd(*args, **kwargs)
    finally:
        ara_s[0] += time.perf_counter() - t
ara_mod.svd_ara = timed_svd
t0 = time.perf_counter()
plan = ara_mod.AraPlan(qtype + "+ara", 16) if use_ara else None
m = loader.load_quantized_expert(ModelSource(folder), "transformer", dtype=torch.bfloat16, qtype=qtype, ara=plan)
load_s = time.perf_counter() - t0
loaded_rss = status("VmRSS")
def stored(t, seen):  # bytes t holds: a quantized tensor's inner tensors (packed data, scales), each storage once
    if hasattr(t, "__tensor_flatten__"):
        return sum(stored(getattr(t, name), seen) for name in t.__tensor_flatten__()[0])
    key = t.untyped_storage().data_ptr()
    if key in seen:
        return 0
    seen.add(key)
    return t.untyped_storage().nbytes()
seen = set()  # each storage counted once: the ARA's buffers, the quantized layers' own tensors, then the rest
ara_bytes = sum(stored(a.down, seen) + stored(a.up, seen) for a in ara_mod.ara_layers(m).values())
quant = sum(stored(t, seen) for _, layer in loader.quantized_linears(m)
            for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)])
held = sum(stored(t, seen) for t in [*m.parameters(), *m.buffers()])
params = attach_lora(m, 16, 16.0, LORA_MODULES, seed=0)
lora_bytes = sum(stored(p, seen) for p in params)  # the fp32 LoRA as it is held
m.enable_gradient_checkpointing(); m.train()
side = 2 * max(1, round(tokens ** 0.5))
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 16, 1, side, side, generator=g, dtype=torch.bfloat16)
text = torch.randn(1, 16, m.config.text_dim, generator=g, dtype=torch.bfloat16)
t1 = time.perf_counter()
pred = m(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text, return_dict=False)[0]
torch.nn.functional.mse_loss(pred.float(), torch.randn(pred.shape, generator=g)).backward()
opt = torch.optim.AdamW(params, lr=1e-4); opt.step()
step_s = time.perf_counter() - t1
tensors = comfy_tensors(from_state(lora_state(m), 16.0), torch.bfloat16)
save_file(tensors, str(out))
print(json.dumps({"peak": status("VmHWM"), "loaded_rss": loaded_rss, "base": base_rss, "load_s": load_s, "ara_s": ara_s[0], "step_s": step_s,
                  "tokens": (side // 2) ** 2, "file": out.stat().st_size, "keys": len(tensors), "quant": quant,
                  "ara": ara_bytes, "lora": lora_bytes, "other": held, "ara_layers": len(ara_mod.ara_layers(m))}))
"""


def estimate_lines(config: dict, qtype: str, ara: bool) -> dict:
    """``wantrain estimate``'s weight, ARA and LoRA figures (bytes) for one expert of ``config``."""
    from wantrain.commands import estimate as est
    from wantrain.plugins.quantize import WEIGHT_BYTES, loader
    from wantrain.profile import LORA_MODULES

    name = qtype + ("+ara" if ara else "")
    s = est.Settings(dtype="bf16", weight_bytes=WEIGHT_BYTES[name], weight_format=name, ara_rank=16 if ara else 0,
                     quantize_exclude=loader.DEFAULT_EXCLUDE, rank=16, modules=LORA_MODULES)
    weights, ara, lora = est.expert_bytes(s, est.count_transformer(config, True, s.quantize_exclude, s.modules))
    return {"weights": weights, "ara": ara, "lora": lora}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wantrain_a14b"))
    ap.add_argument("--qtypes", nargs="+", default=["qint4"], help="qint4, and uint4 once the 4-bit plugin has it")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the generated expert")
    ap.add_argument("--smoke", action="store_true", help="a two-block narrow expert: checks the script in seconds")
    ap.add_argument("--layers", type=int, help="full A14B width with this many blocks (the real 40 by default)")
    args = ap.parse_args(argv)
    from wantrain.commands.estimate import A14B_TRANSFORMER

    config = {**A14B_TRANSFORMER, **SMOKE} if args.smoke else dict(A14B_TRANSFORMER)
    if args.layers:
        config["num_layers"] = args.layers
    folder = args.dir.with_name(args.dir.name + ("_smoke" if args.smoke else f"_{args.layers}blocks" if args.layers else ""))
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path("/")).free / G
    print(f"expert: {folder} ({'smoke' if args.smoke else 'A14B'} config); free disk {free:.0f} GiB "
          f"(full size needs ~27 GiB)")
    t0 = time.perf_counter()
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    if not index.is_file():
        write_random_expert(folder, config)
    bf16 = sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors"))
    print(f"bf16 expert on disk: {bf16 / G:.2f} GiB (written / found in {time.perf_counter() - t0:.0f} s)")
    print(f"{'config':<12} {'load s':>7} {'ARA s':>6} {'step s':>7} {'peak GiB':>9} {'/bf16':>6} {'/loaded':>8} "
          f"{'-base':>6} {'load':>6} {'+state':>7} {'LoRA MiB':>9} {'keys':>5}  estimate vs held (weights, ARA, LoRA)")
    print("  /loaded: peak RSS / the loaded expert's bytes; -base: with the interpreter's RSS before loading taken "
          "off;\n  load: RSS after loading (less the base) / loaded; +state: peak less the base / (loaded + the "
          "LoRA's fp32 weights, gradients and two AdamW moments)")
    try:
        for qtype in args.qtypes:
            for ara in (False, True):
                out = folder / f"lora_{qtype}{'_ara' if ara else ''}.safetensors"
                proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), qtype, "1" if ara else "0",
                                       str(args.tokens), str(out)], capture_output=True, text=True,
                                      env={**os.environ, "MALLOC_ARENA_MAX": "2"})
                label = qtype + ("+ara" if ara else "")
                if proc.returncode != 0:
                    print(f"{label:<12} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:150]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                loaded = r["quant"] + r["ara"] + r["other"]
                e = estimate_lines(config, qtype, ara)
                held_w = r["quant"] + r["other"]
                print(f"{label:<12} {r['load_s']:>7.0f} {r['ara_s']:>6.0f} {r['step_s']:>7.0f} {r['peak'] / G:>9.2f} "
                      f"{r['peak'] / bf16:>6.3f} {r['peak'] / loaded:>8.3f} {(r['peak'] - r['base']) / loaded:>6.3f} "
                      f"{(r['loaded_rss'] - r['base']) / loaded:>6.3f} {(r['peak'] - r['base']) / (loaded + 4 * r['lora']):>7.3f} "
                      f"{r['file'] / 2**20:>9.2f} {r['keys']:>5}  "
                      f"{e['weights'] / held_w - 1:+.1%}, {(e['ara'] / r['ara'] - 1) if r['ara'] else 0:+.1%}, "
                      f"{e['lora'] / r['lora'] - 1:+.1%}  ({r['tokens']} tokens, {r['ara_layers']} ARA layers)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
