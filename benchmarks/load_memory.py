"""Peak host RAM while loading a Wan expert quantized to qint4, against its
bf16 size on disk (target: peak <= 0.6x).

A random mid-size Wan expert (~1B parameters: dim 2048 = 16 heads x 128,
ffn 8192, 15 blocks) is written in Diffusers layout (sharded safetensors +
index, bf16), then loaded in a fresh process per loader so ``ru_maxrss`` is
that loader's peak:

- ``wantrain qint4``: :func:`wantrain.plugins.quantize.loader.load_quantized_expert` (meta
  device, layer by layer, quantize as it goes);
- ``single file bf16`` / ``single file fp8_scaled``: the same loader reading
  the expert from one original-layout file (ComfyUI's layout: original Wan
  names; bf16, or fp8 with per-tensor ``scale_weight``), names converted and
  scales applied as it streams (:mod:`wantrain.formats.sources`);
- ``diffusers bf16``: ``WanTransformer3DModel.from_pretrained(...,
  low_cpu_mem_usage=True)`` for reference (every weight page touched after
  loading, since safetensors may map the file lazily).

Reported: the peak RSS, and the growth over the process's RSS just before
loading (Python + torch + diffusers + quanto imported and warmed up) -- the
memory the loader itself needs. The target (<= 0.6x) is met by the peak
itself, the process included.

    .venv/bin/python benchmarks/load_memory.py [--dir /tmp/wan_mid] [--layers 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MID = dict(
    patch_size=[1, 2, 2], num_attention_heads=16, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8192, num_layers=15, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
SHARD_BYTES = 500 * 2**20


def write_random_expert(folder: Path, config: dict, seed: int = 0) -> int:
    """Random bf16 weights in Diffusers layout, written shard by shard (never
    the whole model in memory). Returns the bytes of weights written."""
    import torch
    from safetensors.torch import save_file

    from wantrain.model import build_empty

    sub = folder / "transformer"
    sub.mkdir(parents=True, exist_ok=True)
    module = build_empty(config)
    module.save_config(sub)
    g = torch.Generator().manual_seed(seed)
    shard, size, index, n, total = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"diffusion_pytorch_model-{n:05d}.safetensors"
            save_file(shard, str(sub / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for key, t in module.state_dict().items():
        value = (torch.randn(t.shape, generator=g) * (0.02 if t.dim() >= 2 else 0.1)).to(torch.bfloat16)
        if key.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm_q.weight", "norm_k.weight")):
            value = torch.ones(t.shape, dtype=torch.bfloat16)
        shard[key] = value
        size += value.numel() * 2
        total += value.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    # rename to the "-of-N" names Diffusers writes
    final = {}
    for old in sorted(set(index.values())):
        new = old.replace(".safetensors", f"-of-{n:05d}.safetensors")
        (sub / old).rename(sub / new)
        final[old] = new
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in index.items()}}, indent=1))
    return total


CHILD = r"""
import json, resource, sys, torch
from pathlib import Path
torch.set_num_threads(2)
from wantrain.plugins.quantize import ara, loader
from wantrain.model import ModelSource
from wantrain.formats.sources import SingleFileSource
from diffusers import WanTransformer3DModel
from optimum.quanto import qint4, quantize, freeze
warm = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(torch.bfloat16); quantize(warm, weights=qint4); freeze(warm); warm(torch.zeros(1, 256, dtype=torch.bfloat16))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field): return int(line.split()[1]) * 1024
# VmHWM, not ru_maxrss: ru_maxrss survives fork + exec, so a child would report the parent's peak
def rss(): return status("VmHWM")
def now(): return status("VmRSS")
before = now()
folder, which = sys.argv[1], sys.argv[2]
if which == "wantrain":
    m = loader.load_quantized_expert(ModelSource(folder), "transformer", dtype=torch.bfloat16, qtype="qint4")
elif which.startswith("single:"):
    src = SingleFileSource(folder, {"transformer": Path(which[len("single:"):])}, {}, None, standalone=False)
    m = loader.load_quantized_expert(src, "transformer", dtype=torch.bfloat16, qtype="qint4")
else:
    m = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
    with torch.no_grad():  # weights may still be lazy file mappings: touch every page, as training would
        for p in m.parameters():
            p.view(-1)[:: max(1, 2048 // p.element_size())].sum()
print(json.dumps({"before": before, "peak": rss(), "after": now()}))
"""


def write_single_files(folder: Path, layers: int) -> dict[str, Path]:
    """The expert as original single files (bf16 and scaled fp8), beside the folder."""
    from safetensors.torch import load_file

    from wantrain.formats import wan_original

    out = {}
    for storage in ("bf16", "fp8_scaled"):
        path = folder.parent / f"{folder.name}_{layers}blocks_{storage}.safetensors"
        if not path.is_file():
            state = {}
            for shard in sorted((folder / "transformer").glob("*.safetensors")):
                state.update(load_file(str(shard)))
            heads = json.loads((folder / "transformer" / "config.json").read_text())["num_attention_heads"]
            wan_original.write_original("expert", state, path, storage=storage, metadata={"num_heads": str(heads)})
            del state
        out[storage] = path
    return out


def measure(folder: Path, loader: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), loader], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/wantrain_mid_expert")
    ap.add_argument("--layers", type=int, default=MID["num_layers"])
    ap.add_argument("--skip-diffusers", action="store_true", help="only measure the wantrain loader")
    args = ap.parse_args()
    folder = Path(args.dir)
    config = {**MID, "num_layers": args.layers}
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    if not index.is_file() or json.loads((folder / "transformer" / "config.json").read_text())["num_layers"] != args.layers:
        write_random_expert(folder, config)
    disk = sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors"))
    params = json.loads(index.read_text())["metadata"]["total_size"] // 2
    G = 2**30
    print(f"random Wan expert: {params / 1e9:.2f}B parameters, bf16 on disk {disk / G:.2f} GiB ({folder})")
    print(f"{'loader':<24} {'RSS before':>10} {'peak RSS':>9} {'growth':>8} {'growth / bf16':>14} {'peak / bf16':>12}")
    singles = write_single_files(folder, args.layers)
    runs = [("wantrain", "wantrain qint4"), *((f"single:{p}", f"single file {s} qint4") for s, p in singles.items()),
            ("diffusers", "diffusers bf16")]
    for loader, label in runs:
        if loader == "diffusers" and args.skip_diffusers:
            continue
        r = measure(folder, loader)
        growth = r["peak"] - r["before"]
        print(f"{label:<24} {r['before'] / G:>9.2f}G {r['peak'] / G:>8.2f}G {growth / G:>7.2f}G {growth / disk:>14.2f} {r['peak'] / disk:>12.2f}")
    print("target: peak / bf16 <= 0.60 for the wantrain loaders (qint4 weights are ~0.27x of bf16, plus one layer in flight)")


if __name__ == "__main__":
    main()
