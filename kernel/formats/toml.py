"""Profile files: TOML read with its ``extends = "base.toml"`` chain
(deep-merged tables, arrays replaced), ``--set a.b=value`` overrides (values
parsed as TOML) and the TOML written back (``profile.toml`` of a run).
:mod:`wantrain.profile` turns the merged tables into the typed profile."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from ..errors import ProfileError, ProfileProblem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



def read_toml(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` and merge the chain of ``extends`` bases below it."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ProfileError(ProfileProblem("extends", "circular extends", chain, "remove one of the links"))
    if not path.is_file():
        where = "extends" if _seen else "profile"
        raise ProfileError(ProfileProblem(where, "file not found", str(path), "check the path"))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(ProfileProblem(path.name, f"not valid TOML: {exc}", fix="fix the syntax at that line")) from None
    except UnicodeDecodeError:
        raise ProfileError(ProfileProblem(path.name, "not UTF-8 text", fix="save the profile as UTF-8")) from None
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ProfileError(ProfileProblem("extends", "expected a path string", base_name, 'write extends = "base.toml"'))
    base = read_toml(path.parent / base_name, (*_seen, path))
    return merge(base, data)


def merge(base: dict, over: dict) -> dict:
    """Deep-merge tables; arrays (``datasets`` included) replace, not append."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``--set training.steps=200``: values are TOML (strings need quotes,
    but a bare word that is not TOML is taken as a string)."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(ProfileProblem("--set", "expected KEY=VALUE", item, "write --set training.steps=200"))
            continue
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = data
        parts = _split_key(key)
        for part in parts[:-1]:
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
                continue
            if not isinstance(node, dict) or isinstance(part, int):  # an index into a table, a key into an array
                problems.append(_bad_set_key(key))
                break
            node = node.setdefault(part, {})
        else:
            last = parts[-1]
            if isinstance(node, list) and isinstance(last, int) and last < len(node):
                node[last] = value
            elif isinstance(node, dict) and not isinstance(last, int):
                node[last] = value
            else:
                problems.append(_bad_set_key(key))
    if problems:
        raise ProfileError(problems)
    return data


def _bad_set_key(key: str) -> ProfileProblem:
    return ProfileProblem(f"--set {key}", "does not name a value of the profile",
                          fix="name table keys with dots (training.steps) and index only arrays, "
                              "within their length (datasets[0].folder)")


def _split_key(key: str) -> list:
    parts: list = []
    for piece in key.split("."):
        if "[" in piece and piece.endswith("]"):
            name, _, idx = piece[:-1].partition("[")
            parts += [name, int(idx)] if idx.isdigit() else [piece]
        else:
            parts.append(piece)
    return parts


def dump_toml(data: Mapping[str, Any]) -> str:
    return tomli_w.dumps(_drop_none(data))


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value
