"""The profile snapshot a checkpoint keeps (``state.json``'s ``"profile"``):
the effective profile as ``{"dotted.key": value}``, and the comparison that
decides whether a changed profile may resume it (docs/checkpoints.md)."""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from ..errors import ProfileProblem

#: profile keys whose change makes a checkpoint unusable (prefix match)
BREAKING = ("target.type", "target.rank", "target.alpha", "target.modules", "target.lokr_factor", "target.lokr_full_rank", "target.experts", "model.arch",
            "model.name_or_path", "training.optimizer", "datasets")
#: profile keys that do not matter to a resumed run
IGNORED = ("job.output_dir", "job.device", "target.init_from")


def profile_snapshot(profile, targets: dict | None = None) -> dict[str, Any]:
    """The effective profile (defaults filled in) as ``{"dotted.key": value}``;
    ``targets`` (expert -> its ``run.target``) adds ``target.experts.<e>.rank`` /
    ``.alpha`` where they differ from ``[target]``'s."""
    data: dict[str, Any] = {n: attrs.asdict(getattr(profile, n)) for n in ("job", "model", "target", "training")}
    data["datasets"] = [attrs.asdict(d) for d in profile.datasets]
    plugins: dict[str, Any] = {"enabled": list(profile.plugins.enabled)}
    for name, cfg in profile.plugins.configs.items():
        plugins[name] = attrs.asdict(cfg) if attrs.has(type(cfg)) else cfg
    data["plugins"] = plugins
    own = {e: {k: getattr(t, k) for k in ("rank", "alpha") if getattr(t, k) != getattr(profile.target, k)}
           for e, t in (targets or {}).items()}
    data["target"]["experts"] = {e: v for e, v in own.items() if v}
    return _flatten(data, "")


def _flatten(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{where}.{k}" if where else str(k)))
        return out
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        out = {f"{where}.count": len(value)}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{where}[{i}]"))
        return out
    return {where: list(value) if isinstance(value, tuple) else value}


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith((p + ".", p + "[")) for p in prefixes)


def compare_profiles(old: dict[str, Any], new: dict[str, Any], where: str,
                     profile=None) -> tuple[list[ProfileProblem], list[str]]:
    """Problems (keys that break resume) and warnings (safe changes). A key
    the old snapshot lacks (written before the key existed) counts as its
    default in ``profile``'s classes, so an older checkpoint still resumes."""
    problems, warnings = [], []
    missing = object()
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing and profile is not None:
            a = default_of(profile, key, missing)
        if a == b or _matches(key, IGNORED):
            continue
        was = "unset" if a is missing else json.dumps(a)
        if _matches(key, BREAKING):
            problems.append(ProfileProblem(
                key, f"differs from the checkpoint being resumed ({where} has {was})",
                None if b is missing else b,
                "set it back to resume, or start a new run in another job.output_dir"))
        else:
            now = "unset" if b is missing else json.dumps(b)
            warnings.append(f"{key} changed since {where} (was {was}, now {now}); continuing with the new value")
    return problems, warnings




def default_of(profile, key: str, missing: Any) -> Any:
    """The default value of a plain profile field (``target.lokr_factor``,
    ``datasets[0].role``) as it would appear in a snapshot; ``missing`` for
    anything else (plugin settings, nested keys)."""
    section, _, name = re.sub(r"\[\d+\]", "", key).partition(".")
    owner = (profile.datasets[0] if profile.datasets else None) if section == "datasets" else getattr(profile, section, None)
    field = attrs.fields_dict(type(owner)).get(name) if attrs.has(type(owner)) else None
    if field is None or field.default is attrs.NOTHING:
        return missing
    value = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default  # type: ignore[union-attr]
    return list(value) if isinstance(value, tuple) else value
