"""Data-parallel throughput: 1 process against N processes (torchrun), same
per-process batch, samples per second of the training loop and the scaling
efficiency ``(samples/s with N) / (N x samples/s with 1)``.

    python benchmarks/distributed.py                       # CPU: 1 vs 2 processes, the tiny model
    python benchmarks/distributed.py --nproc 1 2 4 8       # a multi-GPU machine: unchanged (device "auto")
    python benchmarks/distributed.py --model PATH --resolution 480 --frames 33 --steps 20

Each setting is a real ``wantrain run`` (``torchrun --nproc-per-node N`` for
N > 1) on generated demo clips; a small plugin on rank 0 times the steps after
``--warmup`` (model loading, caches and the first steps are not counted).
On a CPU the processes share the cores, so 2 processes cannot be 2x: the
figure there shows the cost of the gradient all-reduce and the data split,
not the speed-up a second GPU gives.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w

TIMER = '''
"""Benchmark plugin: rank 0 writes the loop's throughput after the warm-up steps."""
import json, os, time
from wantrain import hookimpl

class Plugin:
    def __init__(self):
        self.t0 = None

    @hookimpl
    def on_step(self, run, step):
        warmup = int(os.environ["BENCH_WARMUP"])
        if step == warmup:
            self.t0 = time.perf_counter()
        if step == run.profile.training.steps and run.rank == 0 and self.t0 is not None:
            t = run.profile.training
            samples = (step - warmup) * t.batch_size * t.gradient_accumulation * run.world_size
            seconds = time.perf_counter() - self.t0
            (run.output_dir / "bench.json").write_text(json.dumps({"samples_per_second": samples / seconds,
                                                                   "world_size": run.world_size}))
'''


def profile(root: Path, args, nproc: int) -> Path:
    data = {
        "job": {"name": "bench", "output_dir": str(root / f"out{nproc}"), "device": "auto", "seed": 0, "trigger_word": "sks"},
        "model": {"name_or_path": str(args.model), "dtype": args.dtype, "gradient_checkpointing": False,
                  "max_sequence_length": 32},
        "target": {"rank": 16, "alpha": 16},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4, "num_workers": 0},
        "datasets": [{"folder": str(args.data), "resolutions": [args.resolution], "num_frames": args.frames,
                      "default_caption": "a clip"}],
        "plugins": {"enabled": [str(root / "timer.py")]},
    }
    path = root / f"bench{nproc}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def measure(root: Path, args, nproc: int) -> float:
    path = profile(root, args, nproc)
    command = [sys.executable, "-m", "wantrain", "run", str(path)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "wantrain", "run", str(path)]
    env = {**os.environ, "BENCH_WARMUP": str(args.warmup)}
    if nproc == 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it for each of its processes: the same threads per process
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{nproc} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads((root / f"out{nproc}" / "bench.json").read_text())["samples_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to compare (first is the base)")
    p.add_argument("--model", type=Path, help="a Wan 2.2 Diffusers folder (default: a tiny random one)")
    p.add_argument("--data", type=Path, help="a dataset folder (default: generated demo clips)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1, help="per process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "timer.py").write_text(TIMER)
        if args.model is None:
            from wantrain.commands.tiny import make_tiny_model

            args.model = make_tiny_model(root / "model", seed=0)
        if args.data is None:
            from wantrain.data.demo import write_demo_data

            args.data = root / "data"
            write_demo_data(args.data, seed=0)
        rates = {n: measure(root, args, n) for n in args.nproc}
    base_n = args.nproc[0]
    base = rates[base_n] / base_n
    print(f"{'processes':>9}  {'samples/s':>10}  {'scaling efficiency':>18}")
    for n, rate in rates.items():
        print(f"{n:>9}  {rate:>10.2f}  {rate / (n * base):>18.2f}")


if __name__ == "__main__":
    main()
