"""Plugin resolution and the plugin manager.

Each name in ``[plugins] enabled`` is resolved, in order, as

1. a built-in: ``wantrain.plugins.<name>``;
2. an entry point of that name in group ``wantrain.plugins``;
3. a dotted module path (``my_pkg.my_plugin``);
4. a path to a ``.py`` file (relative to the profile's folder).

A plugin module has a ``Plugin`` class (instantiated with its ``Config`` when
the module defines one, else with no argument) or, for a quick tinkerer's
plugin, plain ``@hookimpl`` functions at module level. Its settings come from
``[plugins.<name>]`` structured into ``Config`` by the strict converter.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import pkgutil
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from . import PROJECT, hookspecs
from .errors import PluginError, ProfileProblem
from .profile import resolve_beside, structure_section

log = logging.getLogger("wantrain")
ENTRY_POINT_GROUP = "wantrain.plugins"


def builtin_names() -> list[str]:
    import wantrain.plugins as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def entry_point_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def resolve(name: str, base_dir: Path | None = None) -> ModuleType:
    """Find the module for plugin ``name``; raise PluginError if none."""
    if name in builtin_names():
        return importlib.import_module(f"wantrain.plugins.{name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            loaded = ep.load()
            return loaded if isinstance(loaded, ModuleType) else _wrap(name, loaded)
    if name.endswith(".py"):
        return _load_file(name, base_dir)
    if "." in name:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                raise _unknown(name) from None
            raise
    raise _unknown(name)


def _wrap(name: str, obj: Any) -> ModuleType:
    """An entry point may name a class instead of a module."""
    mod = ModuleType(f"wantrain_ep_{name}")
    mod.Plugin = obj
    if hasattr(obj, "Config"):
        mod.Config = obj.Config
    return mod


def _load_file(name: str, base_dir: Path | None) -> ModuleType:
    path = resolve_beside(name, base_dir)
    if not path.is_file():
        raise PluginError(ProfileProblem("plugins.enabled", "plugin file not found", str(path), "check the path (relative to the profile)"))
    mod_name = f"wantrain_user_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: say where it broke, in one line
        del sys.modules[mod_name]
        raise PluginError(ProfileProblem(f"plugins.{_key(name)}", f"the plugin file failed to import: {_import_failure(exc, path)}",
                                         fix="fix the file, or remove it from plugins.enabled")) from None
    return module


def _import_failure(exc: Exception, path: Path) -> str:
    """``SyntaxError at line 1: invalid syntax`` / ``ModuleNotFoundError at line 3: No module named 'x'``."""
    lines = [exc.lineno] if isinstance(exc, SyntaxError) else [
        f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    text = exc.msg if isinstance(exc, SyntaxError) else (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}{f' at line {lines[-1]}' if lines else ''}: {text}"


def _unknown(name: str) -> PluginError:
    known = builtin_names() + entry_point_names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return PluginError(
        ProfileProblem(
            "plugins.enabled",
            "unknown plugin",
            name,
            f"{hint}known: {', '.join(known)}; or give a dotted module path or a .py file",
        )
    )


def config_class(module: ModuleType) -> type | None:
    return getattr(module, "Config", None)


def structure_plugins(table: Any, base_dir: Path) -> tuple[tuple[str, ...], dict[str, Any], list[ProfileProblem]]:
    """Resolve ``[plugins] enabled`` and structure each ``[plugins.<name>]``."""
    if not isinstance(table, dict):
        return (), {}, [ProfileProblem("plugins", "must be a table", table, "write [plugins] enabled = [...]")]
    problems: list[ProfileProblem] = []
    enabled = table.get("enabled", [])
    if not isinstance(enabled, list) or not all(isinstance(n, str) for n in enabled):
        return (), {}, [ProfileProblem("plugins.enabled", "must be an array of strings", enabled, 'write enabled = ["my_plugin.py"]')]
    dupes = sorted({n for n in enabled if enabled.count(n) > 1})
    problems += [ProfileProblem("plugins.enabled", "listed twice", n, "list each plugin once") for n in dupes]
    configs: dict[str, Any] = {}
    unresolved: set[str] = set()
    for name in dict.fromkeys(enabled):
        try:
            module = resolve(name, base_dir)
        except PluginError as exc:
            problems += exc.problems
            unresolved.add(name)
            continue
        cls = config_class(module)
        settings = table.get(name, {})
        where = f"plugins.{_key(name)}"
        if cls is None:
            if settings:
                problems.append(ProfileProblem(where, "this plugin takes no settings", settings, f"remove [{where}]"))
            configs[name] = None
            continue
        obj, found = structure_section(settings, cls, where)
        problems += found
        configs[name] = obj
    for key, value in table.items():
        if key == "enabled" or key in enabled:
            continue
        if isinstance(value, dict):
            problems.append(ProfileProblem(f"plugins.{_key(key)}", "table for a plugin that is not enabled",
                                           fix=_table_hint(key, enabled, unresolved)))
        else:
            problems.append(ProfileProblem(f"plugins.{_key(key)}", "unknown key", value, "only 'enabled' and [plugins.<name>] tables go here"))
    return tuple(dict.fromkeys(enabled)), configs, problems


def _table_hint(key: str, enabled: list[str], unresolved: set[str]) -> str:
    """Fix for a table of a plugin not enabled: near a name that failed to resolve, that name is the typo."""
    close = difflib.get_close_matches(key, enabled, n=1)
    if close and close[0] in unresolved:
        return f"plugins.enabled lists {close[0]!r}, which is not a plugin: did you mean {key!r} there?"
    if close:
        return f"did you mean [plugins.{_key(close[0])}]?"
    return f'add "{key}" to plugins.enabled or remove the table'


def _key(name: str) -> str:
    return name if name.replace("_", "").isalnum() else f'"{name}"'


def instantiate(name: str, config: Any, base_dir: Path | None = None) -> Any:
    module = resolve(name, base_dir)
    cls = getattr(module, "Plugin", None)
    if cls is None:
        return module
    return cls(config) if config_class(module) is not None else cls()


def make_plugin_manager(profile, core: Any | None = None, extra: dict[str, Any] | None = None) -> pluggy.PluginManager:
    """A plugin manager with the kernel's fallbacks and the profile's plugins
    registered (each under its profile name), then ``extra`` (name -> plugin),
    checked for misspelled hooks."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    if core is not None:
        pm.register(core, name="wantrain.core")
    base_dir = profile.base_dir
    for name in profile.plugins.enabled:
        plugin = instantiate(name, profile.plugins.configs.get(name), base_dir)
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError:
            raise PluginError(_signature_problems(pm, plugin, name)) from None
    for name, plugin in (extra or {}).items():
        pm.register(plugin, name=name)
    check(pm)
    if os.environ.get("WANTRAIN_TRACE_HOOKS") == "1":
        trace_hooks(pm)
    return pm


def _signature_problems(pm: pluggy.PluginManager, plugin: Any, name: str) -> list[ProfileProblem]:
    """Why pluggy refused ``plugin``: hook implementations taking arguments their event does not pass."""
    problems = []
    for attr in (a for a in dir(plugin) if pm.parse_hookimpl_opts(plugin, a) is not None):
        spec = getattr(getattr(pm.hook, attr, None), "spec", None)
        extra = [n for n in inspect.signature(getattr(plugin, attr)).parameters if spec and n not in ("self", *spec.argnames)]
        if extra:
            problems.append(ProfileProblem(f"plugins.{_key(name)}", f"{attr}() takes arguments the event does not pass",
                                           ", ".join(extra), f"{attr} passes {', '.join(spec.argnames)} (any subset); see docs/hooks.md"))
    return problems or [ProfileProblem(f"plugins.{_key(name)}", "pluggy refused to register the plugin", fix="see docs/hooks.md")]


def check(pm: pluggy.PluginManager) -> None:
    """``pm.check_pending()`` as a user-facing error: a misspelled hook impl."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or str(exc.plugin)
        hooks = [h for h in dir(exc.plugin) if not h.startswith("_") and pm.parse_hookimpl_opts(exc.plugin, h)]
        unknown = [h for h in hooks if not hasattr(pm.hook, h) or pm.hook.__dict__.get(h) is None or not getattr(pm.hook, h).has_spec()]
        known = sorted(n for n in dir(hookspecs) if not n.startswith("_") and hasattr(getattr(hookspecs, n), "wantrain_spec"))
        probs = []
        for h in unknown or ["?"]:
            close = difflib.get_close_matches(h, known, n=1)
            fix = f"did you mean {close[0]!r}?" if close else "see docs/hooks.md for the events"
            probs.append(ProfileProblem(f"plugins.{_key(name)}", "implements an unknown event", h, fix))
        raise PluginError(probs) from None


def trace_hooks(pm: pluggy.PluginManager) -> None:
    """``WANTRAIN_TRACE_HOOKS=1``: log every event call and its result."""
    tracer = logging.getLogger("wantrain.hooks")

    def before(hook_name, hook_impls, kwargs):
        tracer.info("event %s(%s) -> %s", hook_name, ", ".join(sorted(kwargs)), [i.plugin_name for i in hook_impls])

    def after(outcome, hook_name, hook_impls, kwargs):
        pass

    pm.add_hookcall_monitoring(before, after)


def call_each(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> dict[str, Any]:
    """Call one event on each plugin separately: ``{registered name: result}``
    (None answers left out), in registration order (the profile's order). For
    events whose answers belong to the plugin that gave them -- resume state,
    estimate notes -- so that the kernel, not the plugin, keys them by name.
    Each call goes through pluggy (tracing included)."""
    out: dict[str, Any] = {}
    names = [i.plugin_name for i in getattr(pm.hook, hook_name).get_hookimpls() if not (i.wrapper or i.hookwrapper)]
    for name in dict.fromkeys(names):
        others = [plugin for other, plugin in pm.list_name_plugin() if other != name]
        found = [r for r in pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs) if r is not None]
        if found:
            out[name] = found[0]
    return out


def catalogue(profile=None) -> pluggy.PluginManager:
    """Every available plugin module (built-in, entry points, and the
    profile's own), registered as a module: its module-level hook functions
    answer events that concern plugins whether or not a profile enables them
    -- commands they add to the CLI (``add_commands``), remedies for a run
    that does not fit (``memory_remedies``), weights they keep in a
    checkpoint (``checkpoint_weights``). Nothing is instantiated."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    base_dir = profile.base_dir if profile is not None else None
    names = builtin_names() + entry_point_names() + list(profile.plugins.enabled if profile is not None else ())
    for name in dict.fromkeys(names):
        try:
            module = resolve(name, base_dir)
        except Exception as exc:  # noqa: BLE001 - a broken third-party plugin must not take the CLI down
            log.warning("plugin %s could not be imported (%s); its commands and remedies are missing", name, exc)
            continue
        if isinstance(module, ModuleType) and pm.get_plugin(name) is None and not pm.is_registered(module):
            pm.register(module, name=name)
    return pm


def implemented_events(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
