"""The newcomer docs stay true: every ``wantrain ...`` command line they show
parses with the real command line (plugins' commands included), and every
profile key they show -- in TOML blocks, ``--set`` overrides and inline
``section.key`` references -- exists in the profile classes or the plugin's
``Config``.

Pages kept honest here: README.md, docs/quickstart.md, docs/plugins.md,
docs/troubleshooting.md, docs/import.md, docs/models.md (commands); docs/quickstart.md,
docs/plugins.md, docs/troubleshooting.md, docs/models.md (profile keys).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import attrs
import pytest

from wantrain import profile as P
from wantrain import registry
from wantrain.commands.cli import build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
COMMAND_PAGES = ["README.md", "docs/quickstart.md", "docs/plugins.md", "docs/troubleshooting.md", "docs/import.md",
                 "docs/models.md"]
KEY_PAGES = ["docs/quickstart.md", "docs/plugins.md", "docs/troubleshooting.md", "docs/models.md"]
SECTIONS = {"job": P.JobConfig, "model": P.ModelConfig, "target": P.TargetConfig, "training": P.TrainingConfig,
            "datasets": P.DatasetConfig}
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
KEY_REF = re.compile(r"^((?:job|model|target|training|plugins)\.[\w.]+|datasets\[\d+\]\.\w+)")


def _blocks(page: str) -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / page).read_text())


def _prose(page: str) -> str:
    return BLOCK.sub("", (ROOT / page).read_text())


def command_lines(page: str) -> list[str]:
    lines = []
    for _, body in _blocks(page):
        joined = re.sub(r"\\\n\s*", " ", body)
        lines += [line.strip() for line in joined.splitlines() if line.strip().startswith("wantrain")]
    for code in INLINE.findall(_prose(page)):
        if code.startswith("wantrain") and "<" not in code and "..." not in code:
            lines.append(code)
    return lines


def _names_a_command(parser, argv: list[str]) -> bool:
    """Prose may name a command alone (`wantrain lora-info`)."""
    sub = next(a for a in parser._actions if a.dest == "command")
    return len(argv) == 1 and argv[0] in sub.choices


def _plugin_config(name: str) -> type | None:
    """The Config of a plugin named in the docs: built-in, an example file, or
    an example package's entry point."""
    if name in registry.builtin_names():
        return registry.config_class(registry.resolve(name))
    if (ROOT / name).is_file():
        return registry.config_class(registry.resolve(name, ROOT))
    for project in (ROOT / "examples" / "plugins").glob("*/pyproject.toml"):
        points = tomllib.loads(project.read_text()).get("project", {}).get("entry-points", {}).get("wantrain.plugins", {})
        if name in points:
            sys.path.insert(0, str(project.parent))
            try:
                return registry.config_class(importlib.import_module(points[name]))
            finally:  # leave no trace: tests/test_examples.py installs the real package
                sys.path.remove(str(project.parent))
                sys.modules.pop(points[name], None)
    return None


def key_problem(path: list[str]) -> str | None:
    """None when ``path`` (e.g. ["plugins", "offload", "layers"]) is a profile key."""
    head, rest = path[0], path[1:]
    if head == "extends" and not rest:
        return None
    if head in SECTIONS:
        if not rest or rest[0] in attrs.fields_dict(SECTIONS[head]):
            return None
        return f"{head} has no key {rest[0]!r}"
    if head == "plugins":
        if not rest or rest == ["enabled"]:
            return None
        cls = _plugin_config(rest[0])
        if cls is None:
            return None if rest[0].startswith("my_plugins/") else f"no plugin {rest[0]!r}"  # the tutorial's own file
        if len(rest) == 1 or rest[1] in attrs.fields_dict(cls):
            return None
        return f"plugins.{rest[0]} has no key {rest[1]!r}"
    return f"no section {head!r}"


def _toml_keys(data: dict) -> list[list[str]]:
    out: list[list[str]] = []
    for key, value in data.items():
        if key == "plugins" and isinstance(value, dict):
            for name, table in value.items():
                out += [["plugins", name, k] for k in table] or [["plugins", name]] if isinstance(table, dict) else [["plugins", name]]
        elif isinstance(value, dict):
            out += [[key, k] for k in value]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out += [[key, k] for item in value for k in item]
        else:
            out.append([key])
    return out


def profile_keys(page: str) -> list[list[str]]:
    keys: list[list[str]] = []
    for lang, body in _blocks(page):
        if lang != "toml":
            continue
        data = tomllib.loads(body)
        if "project" in data or "build-system" in data:  # a pyproject.toml, not a profile
            continue
        keys += _toml_keys(data)
    for line in command_lines(page):
        argv = shlex.split(line, comments=True)
        keys += [_split(argv[i + 1].split("=", 1)[0]) for i, a in enumerate(argv) if a == "--set"]
    for code in INLINE.findall(_prose(page)):
        match = KEY_REF.match(code)
        if match:
            keys.append(_split(match.group(1).rstrip(".")))
    return keys


def _split(key: str) -> list[str]:
    """``datasets[0].folder`` -> [datasets, folder]; TOML-quoted plugin names stay whole."""
    if key.startswith("plugins.") and ".py." in key:
        name, _, rest = key[len("plugins."):].rpartition(".py.")
        return ["plugins", name.strip('"') + ".py", rest]
    return re.sub(r"\[\d+\]", "", key).split(".")[:3]


@pytest.mark.parametrize("page", COMMAND_PAGES)
def test_every_command_line_parses(page):
    parser = build_parser()
    lines = command_lines(page)
    assert lines, f"{page} shows no wantrain command"
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        if _names_a_command(parser, argv):
            continue
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                assert exc.code == 0 and argv == ["--version"], f"{page}: `{line}` does not parse: {err.getvalue()}"


@pytest.mark.parametrize("page", KEY_PAGES)
def test_every_profile_key_exists(page):
    keys = profile_keys(page)
    assert keys, f"{page} shows no profile key"
    problems = [f"{'.'.join(key)}: {p}" for key in keys if (p := key_problem(key))]
    assert not problems, f"{page}: " + "; ".join(problems)


def test_the_checker_catches_made_up_keys_and_commands():
    assert key_problem(["training", "stpes"]) == "training has no key 'stpes'"
    assert key_problem(["plugins", "offload", "layer"]) == "plugins.offload has no key 'layer'"
    assert key_problem(["plugins", "examples/plugins/loss_spike_alarm.py", "factor"]) is None
    assert key_problem(["plugins", "stratified_timesteps", "slices"]) is None
    assert key_problem(["plugins", "stratified_timesteps", "slice"]) is not None
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["estimate", "x.toml", "--vram", "24", "--bogus"])
