"""``wantrain sample``: render a finished (or checkpointed) LoRA pair with a
profile's ``[plugins.sample]`` settings -- the sample plugin's own command,
added to the CLI through ``add_commands``.

It opens the run like training does (:func:`wantrain.run.open_run`: the
profile's plugins, their checks) and loads the frozen parts the same way
(:func:`wantrain.run.load_frozen`: a quantized text encoder is quantized on
the host before it moves); experts load on first use with the LoRA attached
right after the profile's plugins have changed them (quantize, ARA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from wantrain.errors import ProfileProblem, WantrainError
from wantrain.profile import _Invalid
from wantrain.run import Run, load_frozen, open_run

from .render import _LoraFiles, image_problems, lora_paths, render, settings_from


def load_for_sampling(profile, lora_files) -> Run:
    """A run with the profile's plugins, the text encoder and the VAE loaded;
    experts load on first use, each with its LoRA attached."""
    run = open_run(profile, purpose="sample", extra_plugins={"wantrain.sample_lora": _LoraFiles(lora_files)})
    load_frozen(run)
    return run


def sample_command(profile, prefix: str, prompts: Sequence[str], out: str | None) -> list[str]:
    """Render ``prompts`` (default: the profile's sample prompts) with the
    LoRA pair at ``prefix``; return the written files."""
    config = profile.plugin_config("sample")
    if not prompts and not (config and getattr(config, "prompts", None)):
        raise WantrainError(ProfileProblem("--prompt", "no prompt to render", fix='give --prompt "..." (repeatable)'))
    try:
        settings = settings_from(config, **({"prompts": tuple(prompts)} if prompts else {}))
    except _Invalid as exc:
        raise WantrainError(ProfileProblem(f"plugins.sample.{exc.field}", str(exc), exc.got, exc.fix)) from None
    from wantrain import archs

    arch = archs.get(profile.model.arch)
    problems = image_problems(settings, arch, "--prompt" if prompts else "plugins.sample")
    if problems:
        raise WantrainError(problems)
    files = lora_paths(prefix, arch.experts, arch)
    folder = Path(out) if out else Path(prefix).parent / "samples" / Path(prefix).name
    return render(load_for_sampling(profile, files), settings, folder)


def add_parser(subparsers) -> None:
    from wantrain.commands.cli import profile_args

    p = subparsers.add_parser("sample", help="render preview videos from a LoRA pair with the profile's [plugins.sample] settings")
    profile_args(p)
    p.add_argument("--lora", required=True, metavar="PREFIX",
                   help="LoRA pair prefix, e.g. output/demo/demo for output/demo/demo_{high,low}_noise.safetensors "
                        "(or one file of any layout init_from reads, or a checkpoints/step_N folder)")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="prompt to render ([trigger] is substituted); repeatable; default: the profile's sample prompts")
    p.add_argument("-o", "--out", metavar="DIR", help="output folder (default: <prefix folder>/samples/<prefix name>)")
    p.set_defaults(handler=run_command)


def run_command(args) -> int:
    from wantrain.profile import load_profile

    profile = load_profile(args.profile, args.overrides)
    for path in sample_command(profile, args.lora, args.prompts, args.out):
        print(path)
    return 0
