"""``wantrain`` command line. User mistakes print one ``error: ...`` line each
and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import unicodedata
import warnings

from .. import __version__
from ..errors import WantrainError


def profile_args(p: argparse.ArgumentParser) -> None:
    """The ``PROFILE [--set KEY=VALUE ...]`` arguments (also for plugins' commands)."""
    p.add_argument("profile", help="path to a TOML profile")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile value (TOML syntax), e.g. --set training.steps=200; repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The kernel's commands, then whatever the available plugins add
    (``add_commands``, asked of the plugin catalogue)."""
    from .. import registry

    parser = argparse.ArgumentParser(prog="wantrain", description="LoRA trainer for Wan 2.2 T2V A14B")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"wantrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # none given: main() lists them, exit 0

    p = sub.add_parser("run", help="train a LoRA pair from a profile")
    profile_args(p)
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto (default): continue from the newest complete checkpoint in the output folder; "
                        "never: start at step 0 (refused when the folder holds checkpoints); "
                        "PATH: continue from that checkpoints/step_N folder")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (one per GPU): starts torchrun; see docs/distributed.md")
    p = sub.add_parser("check", help="validate a profile, resolve plugins, check paths (loads no weights)")
    profile_args(p)
    p = sub.add_parser("plugins", help="list plugins and the events each implements")
    p.add_argument("profile", nargs="?", help="only the plugins this profile enables")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("make-tiny-model", help="write a tiny random Wan-2.2-shaped model (Diffusers layout)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="wan22_t2v_a14b", choices=("wan22_t2v_a14b", "wan22_i2v_a14b", "wan22_ti2v_5b"),
                   help="which Wan 2.2 model to imitate (default: text-to-video A14B)")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p.add_argument("--original", choices=("fp32", "bf16", "fp16", "fp8", "fp8_scaled"), metavar="STORAGE",
                   help="also write each component as an original-layout single file (ComfyUI's) in DIR/original: "
                        "fp32, bf16, fp16, fp8 or fp8_scaled")
    p = sub.add_parser("make-demo-data", help="write a few short H.264 clips and PNGs with captions")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p = sub.add_parser("estimate", help="predict peak GPU memory and host RAM of a profile (model config only, no weights)")
    profile_args(p)
    p.add_argument("--vram-gb", type=float, metavar="N", help="the card's memory in GiB: says whether it fits and what to change")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes of a torchrun job: with [distributed] strategy = \"fsdp\" the weights are split N ways")
    p = sub.add_parser("dataset", help="inspect the datasets of a profile: items, buckets, frames, warnings")
    profile_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p = sub.add_parser("export", help="convert a LoRA file or a checkpoint folder to the ComfyUI or diffusers layout")
    p.add_argument("source", metavar="FILE_OR_CHECKPOINT", help="a LoRA .safetensors file or a checkpoints/step_N folder")
    p.add_argument("--format", required=True, choices=("comfyui", "diffusers"),
                   help="comfyui: ComfyUI and diffusers (our files' layout); diffusers: diffusers/PEFT only, not ComfyUI")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="tensor dtype (default: the source's; fp32 for checkpoints)")
    p.add_argument("-o", "--out", required=True, help="output file (folder for a checkpoint: one file per expert)")
    p.set_defaults(variant=None)  # plugins add options that pick a variant of a checkpoint's weights
    p = sub.add_parser("lora-info", help="print a LoRA file's layout, expert, modules, rank, alpha and metadata")
    p.add_argument("file", help="a LoRA .safetensors file (any supported layout) or a checkpoints/step_N folder")
    registry.catalogue().hook.add_commands(subparsers=sub, commands=dict(sub.choices))
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("diffusers", "transformers", "peft", "urllib3", "huggingface_hub", "PIL", "libav", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())  # an optional CPU kernel, meaningless to users
    # torchao (the uint4 grid's math) announces optional compiled kernels it cannot load, and diffusers
    # torchao checkpoint classes it does not need: neither concerns training
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(diffusers|transformers|peft|torch)")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def cmd_run(args) -> int:
    import shlex

    from ..loop import train
    from ..profile import load_profile
    from ..resume import checkpoint_dir

    from ..distributed import launch, launched_world_size

    profile = load_profile(args.profile, args.overrides)
    if args.nproc > 1 and launched_world_size() == 1:  # errors in the profile are found before torchrun starts
        launch.exec_torchrun(args.nproc, [*(["-v"] if args.verbose else []), "run", args.profile,
                                          *[a for o in args.overrides for a in ("--set", o)], "--resume", args.resume])
    with launch.session(profile):
        run = train(profile, resume=args.resume)
    if run.step < profile.training.steps:  # stopped gracefully (SIGINT / SIGTERM)
        again = ["wantrain", "run", *(["--nproc", str(run.world_size)] if run.world_size > 1 else []), args.profile,
                 *[a for o in args.overrides for a in ("--set", o)]]
        if args.resume != "auto":  # never / PATH again would refuse or fork anew: name the stop checkpoint
            again += ["--resume", str(checkpoint_dir(run.output_dir, run.step, run.lineage.tag))]
        logging.getLogger("wantrain").info("resume with: %s", shlex.join(again))
    return 0


def cmd_export(args) -> int:
    from .export import export

    for path in export(args.source, args.format, args.out, variant=args.variant, dtype=args.dtype):
        print(f"wrote {path}")
    return 0


def cmd_lora_info(args) -> int:
    from .export import describe

    print("\n".join(printable(line) for line in describe(args.file)))
    return 0


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (``\\x1b``,
    ``\\n``): file metadata is shown, never obeyed by the terminal."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c)[0] == "C" else c for c in text)


def cmd_check(args) -> int:
    from .check import check
    from ..profile import load_profile

    profile = load_profile(args.profile, args.overrides)
    problems = check(profile)
    if problems:
        raise WantrainError(problems)
    print(f"ok: {args.profile} ({len(profile.datasets)} dataset(s), plugins: {', '.join(profile.plugins.enabled) or 'none'})")
    return 0


def cmd_plugins(args) -> int:
    from .. import registry
    from ..profile import load_profile
    from ..run import CORE, CoreHooks, open_run

    if args.profile:
        profile = load_profile(args.profile, args.overrides)
        pm = open_run(profile, purpose="inspect").pm
        names = [CORE, *profile.plugins.enabled]
    else:
        import pluggy

        from .. import PROJECT, hookspecs

        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(CoreHooks(), name=CORE)
        names = [CORE]
        for name in registry.builtin_names() + registry.entry_point_names():
            module = registry.resolve(name)
            cfg_cls = registry.config_class(module)
            pm.register(registry.instantiate(name, cfg_cls() if cfg_cls and _defaults_ok(cfg_cls) else None), name=name)
            names.append(name)
    for name in names:
        plugin = pm.get_plugin(name)
        events = registry.implemented_events(pm, plugin)
        print(f"{name}: {', '.join(events) or '(no events)'}")
    return 0


def _defaults_ok(cls) -> bool:
    import attrs

    return all(f.default is not attrs.NOTHING for f in attrs.fields(cls))


def cmd_make_tiny_model(args) -> int:
    from .tiny import make_tiny_model

    refuse_non_empty(args.dir, args.force)
    path = make_tiny_model(args.dir, seed=args.seed, arch=args.arch)
    print(f"wrote tiny Wan 2.2 model ({args.arch}) to {path}")
    if args.original:
        from ..formats.wan_original import OriginalFile, write_tiny_original

        for name, file in write_tiny_original(path, path / "original", args.original).items():
            print(f"wrote {name} as an original single file ({OriginalFile(file).storage}): {file}")
    return 0


def cmd_make_demo_data(args) -> int:
    from wantrain.data.demo import write_demo_data

    refuse_non_empty(args.dir, args.force)
    files = write_demo_data(args.dir, seed=args.seed)
    print(f"wrote {len(files)} demo media files to {args.dir}")
    return 0


def refuse_non_empty(folder: str, force: bool) -> None:
    """Tools that fill a folder never overwrite a user's files without ``--force``."""
    from pathlib import Path

    from ..errors import ProfileProblem

    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise WantrainError(ProfileProblem(folder, "is a file, not a folder", fix="give a new or empty folder"))
    if not force and path.is_dir() and any(path.iterdir()):
        raise WantrainError(ProfileProblem(folder, "is not empty; refusing to overwrite what is in it",
                                           fix="give a new or empty folder, or add --force"))


def cmd_estimate(args) -> int:
    from ..profile import load_profile
    from ..run import open_run
    from .estimate import report

    profile = load_profile(args.profile, args.overrides)
    print(report(profile, open_run(profile, purpose="inspect").pm, args.vram_gb, args.nproc))
    return 0


def cmd_dataset(args) -> int:
    from .dataset import dataset_command

    return dataset_command(args.profile, args.overrides, args.json)


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "plugins": cmd_plugins,
    "make-tiny-model": cmd_make_tiny_model,
    "make-demo-data": cmd_make_demo_data,
    "dataset": cmd_dataset,
    "estimate": cmd_estimate,
    "export": cmd_export,
    "lora-info": cmd_lora_info,
}


def command_list(parser: argparse.ArgumentParser) -> str:
    """``wantrain`` alone: every command (plugins' included) with its one-line help."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = [(a.dest, a.help or "") for a in sub._choices_actions]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {text}" for name, text in rows]
    return "\n".join(["usage: wantrain COMMAND ... (wantrain COMMAND -h for its options)", "", "commands:", *lines])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print(command_list(parser))
        return 0
    setup_logging(args.verbose)
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except WantrainError as exc:
        for line in exc.lines():
            print(printable(line), file=sys.stderr)  # paths and values from files may hold escape codes
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `wantrain dataset ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
