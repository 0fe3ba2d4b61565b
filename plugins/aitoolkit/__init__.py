"""``wantrain import ai-toolkit CONFIG.yaml [-o profile.toml]``: bring an AI
Toolkit (ostris/ai-toolkit) job config for Wan 2.2 over as a wantrain
profile.

Every key of the YAML is mapped to a profile key, is a no-op (its value is
what wantrain does anyway), or is named in one line ``not carried over:
<yaml path>: <why>`` -- printed to stderr and written as comments at the
top of the profile. Malformed YAML, a key ai-toolkit does not know, or a job
wantrain cannot train (another architecture) is an ``error:`` line each,
exit code 2. The mapping is in :mod:`.convert` and ``docs/import.md``.

This plugin only adds a command: it implements the module-level
``add_commands`` event and nothing a run uses, so it is harmless whether or
not a profile lists it. It has no config keys.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from wantrain import hookimpl
from wantrain.errors import ProfileProblem, WantrainError

log = logging.getLogger("wantrain.import")
SOURCES = ("ai-toolkit",)


def read_yaml(path: str):
    """Parse ``path``; a missing file or bad YAML is one ``error:`` line."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise WantrainError(ProfileProblem(path, "file not found", fix="give the path of an ai-toolkit .yaml config"))
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise WantrainError(ProfileProblem(path, "not UTF-8 text", fix="save the config as UTF-8")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise WantrainError(ProfileProblem(where, f"not valid YAML: {what}", fix="fix the syntax at that line")) from None


def import_config(path: str, out: str | None) -> tuple[str, list[str]]:
    """The profile text and the not-carried-over lines for the config at ``path``."""
    from .convert import convert, render

    conv = convert(read_yaml(path), name_hint=Path(path).stem)
    return render(conv, path, out), conv.dropped


def run_command(args) -> int:
    text, dropped = import_config(args.config, args.out)
    for line in dropped:
        print(line, file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out} ({len(dropped)} setting(s) not carried over); check it: wantrain check {args.out}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


@hookimpl
def add_commands(subparsers):
    """``wantrain import ai-toolkit CONFIG.yaml [-o profile.toml]``."""
    p = subparsers.add_parser("import", help="convert an ai-toolkit job config (YAML) into a wantrain profile")
    p.add_argument("source", choices=SOURCES, help="the trainer the config comes from")
    p.add_argument("config", help="the job config, e.g. config/my_wan22_lora.yaml")
    p.add_argument("-o", "--out", metavar="PROFILE", help="write the profile here (default: print it)")
    p.set_defaults(handler=run_command)
