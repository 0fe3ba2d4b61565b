"""Figures for the training-feature plugins (CPU, a few minutes):

1. per-expert step counts of a demo-model run (``profiles/demo_cpu.toml``,
   tiny model, 40 steps) with ``[plugins.multistage] switch_every`` 1 and 10,
   plus the timestep range each expert actually trained on;
2. text histograms of 20,000 draws per ``[plugins.timesteps]`` type x bias
   over t in [0, 1000] (10 bins, % of draws), each distribution's share of
   the high-noise range, and the draws *inside* the high-noise expert's range
   (875-1000, 5 bins) to show the shape is kept there (no pile-up at 875).

    python benchmarks/timestep_histograms.py [--steps 40] [--draws 20000] [--skip-run]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import textwrap
from pathlib import Path

import torch

from wantrain.data.demo import write_demo_data
from wantrain.loop import train
from wantrain.plugins import timesteps as ts
from wantrain.profile import load_profile, read_toml
from wantrain.commands.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
COUNTER = textwrap.dedent("""
    from wantrain import hookimpl
    class Plugin:
        def __init__(self):
            self.steps, self.t = [], {}
        @hookimpl
        def compute_extra_losses(self, run, batch, ctx):
            self.t.setdefault(ctx.expert, []).extend(ctx.timesteps.tolist())
        @hookimpl
        def on_step(self, run, step, metrics):
            self.steps.append(metrics["expert"])
""")


def runs(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tiny_model(tmp / "model", seed=0)
        write_demo_data(tmp / "data", seed=0, num_frames=9)
        (tmp / "counter.py").write_text(COUNTER)
        print(f"== multistage on the demo model: {steps} optimizer steps, gradient_accumulation 1, timesteps type 'linear' ==")
        for every in (1, 10):
            data = read_toml(ROOT / "profiles" / "demo_cpu.toml")
            data["model"]["name_or_path"] = str(tmp / "model")
            data["datasets"][0]["folder"] = str(tmp / "data")
            data["job"]["output_dir"] = str(tmp / f"out_{every}")
            data["training"]["steps"] = steps
            data["plugins"] = {"enabled": ["multistage", "timesteps", str(tmp / "counter.py")],
                               "multistage": {"switch_every": every}, "timesteps": {"type": "linear"}}
            run = train(load_profile(data=data))
            rec = run.pm.get_plugin(str(tmp / "counter.py"))
            order = "".join("H" if e == "high_noise" else "L" for e in rec.steps)
            print(f"switch_every = {every:>2}: " + ", ".join(
                f"{e} {rec.steps.count(e)} steps (t {min(rec.t[e]):.1f}..{max(rec.t[e]):.1f})" for e in run.trained))
            print(f"   order (H = high noise, L = low noise): {order}")


def histograms(draws: int) -> None:
    print(f"\n== timesteps: {draws} draws per type x bias, % of draws per bin of t ==")
    edges = list(range(0, 1001, 100))
    head = " ".join(f"{lo:>4}-" for lo in edges[:-1])
    print(f"{'type':<15}{'bias':<11}{head}  high-noise share")
    for cfg in configs():
        dist = ts.distribution(cfg)
        t = ts.draw(dist, 0.0, 1000.0, draws, torch.Generator().manual_seed(0))
        counts = torch.histc(t, bins=10, min=0, max=1000) / draws * 100
        share = ts.mass_between(dist, 875, 1000) * 100
        print(f"{label(cfg):<15}{cfg.bias:<11}" + " ".join(f"{c:5.1f}" for c in counts.tolist()) + f"  {share:5.1f}%")
    print(f"\n== inside the high-noise expert's range (875-1000), {draws} draws, % per 25-wide bin ==")
    print(f"{'type':<15}{'bias':<11} 875-  900-  925-  950-  975-")
    for cfg in configs():
        t = ts.draw(ts.distribution(cfg), 875.0, 1000.0, draws, torch.Generator().manual_seed(1))
        counts = (torch.histc(t, bins=5, min=875, max=1000) / draws).tolist()
        print(f"{label(cfg):<15}{cfg.bias:<11}" + " ".join(f"{100 * c:5.1f}" for c in counts))


def configs():
    for kind, bias in itertools.product(ts.TYPES, ts.BIASES):
        yield ts.Config(type=kind, bias=bias)
    yield ts.Config(type="shift", shift=12.0)
    yield ts.Config(type="logit_normal", mean=1.0, std=0.8)


def label(cfg: ts.Config) -> str:
    if cfg.type == "shift":
        return f"shift({cfg.get('shift'):g})"
    if cfg.type == "logit_normal":
        return f"logitN({cfg.get('mean'):g},{cfg.get('std'):g})"
    return cfg.type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--draws", type=int, default=20_000)
    parser.add_argument("--skip-run", action="store_true", help="only the histograms")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_run:
        runs(args.steps)
    histograms(args.draws)


if __name__ == "__main__":
    main()
