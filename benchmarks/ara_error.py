"""Per-layer relative output error of qint4 against bf16, without and with
the SVD accuracy-recovery adapter, on the tiny model and on a random
mid-size Wan expert (the one ``load_memory.py`` writes).

For each block linear layer W (bf16): Q = quanto qint4 (group 128), the ARA
= rank-r truncated SVD of W - dequant(Q); on random inputs x ~ N(0, 1)
(256 tokens), error = ||y - x W^T|| / ||x W^T|| with y = Q(x) or Q(x) +
ARA(x). Reported per layer kind: mean over blocks. Random weights have a
flat residual spectrum, so the gain here is a floor; real checkpoints have
structured residuals (outlier rows/columns) where a rank-16 SVD recovers more.

    .venv/bin/python benchmarks/ara_error.py [--mid /tmp/wantrain_mid_expert] [--rank 16]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from wantrain.plugins.quantize import ara, loader
from wantrain.formats.lora import DIFFUSERS_TO_COMFY
from wantrain.model import ModelSource


def layer_errors(source: ModelSource, subfolder: str, rank: int, blocks: int | None, tokens: int = 256) -> dict[str, list[tuple[float, float]]]:
    files = loader.weight_map(source, subfolder)
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in files if k.startswith("blocks."))
    for i in range(n_blocks if blocks is None else min(blocks, n_blocks)):
        keys = [f"blocks.{i}.{m}.weight" for m in DIFFUSERS_TO_COMFY]
        weights = loader.read_tensors(keys, files)
        for m in DIFFUSERS_TO_COMFY:
            w = weights[f"blocks.{i}.{m}.weight"].to(torch.bfloat16)
            holder = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16))
            with torch.no_grad():
                holder[0].weight.copy_(w)
            loader.quantize_linears(holder, "qint4", ())
            layer = holder[0]
            down, up = ara.svd_ara(w, ara.dequantized_weight(layer), rank, torch.bfloat16)
            x = torch.randn(tokens, w.shape[1], generator=g).to(torch.bfloat16)
            with torch.no_grad():
                ref = x.float() @ w.float().T
                yq = layer(x).float()
                ya = yq + (x @ down.T @ up.T).float()
            norm = ref.norm()
            out[m].append((float((yq - ref).norm() / norm), float((ya - ref).norm() / norm)))
    return out


def print_table(title: str, errors: dict[str, list[tuple[float, float]]], rank: int) -> None:
    print(f"\n{title}")
    print(f"{'layer':<18} {'qint4':>8} {f'+ARA r{rank}':>10} {'error left':>11}")
    allq, alla = [], []
    for m, pairs in errors.items():
        q = sum(p[0] for p in pairs) / len(pairs)
        a = sum(p[1] for p in pairs) / len(pairs)
        allq += [p[0] for p in pairs]
        alla += [p[1] for p in pairs]
        print(f"{m:<18} {q:>8.4f} {a:>10.4f} {a / q:>10.1%}")
    q, a = sum(allq) / len(allq), sum(alla) / len(alla)
    print(f"{'all layers':<18} {q:>8.4f} {a:>10.4f} {a / q:>10.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mid", default="/tmp/wantrain_mid_expert", help="mid-size expert folder (written by load_memory.py if missing)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mid-blocks", type=int, default=4, help="blocks of the mid-size model to measure")
    args = ap.parse_args()
    torch.set_num_threads(min(4, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        from wantrain.commands.tiny import make_tiny_model

        tiny = make_tiny_model(Path(tmp) / "tiny")
        print_table("tiny model (dim 128, ffn 256, 4 blocks), all blocks", layer_errors(ModelSource(str(tiny)), "transformer", args.rank, None), args.rank)
    mid = Path(args.mid)
    if not (mid / "transformer" / "config.json").is_file():
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from load_memory import MID, write_random_expert

        write_random_expert(mid, MID)
    print_table(f"mid-size model (dim 2048, ffn 8192), first {args.mid_blocks} blocks",
                layer_errors(ModelSource(str(mid)), "transformer", args.rank, args.mid_blocks), args.rank)


if __name__ == "__main__":
    main()
