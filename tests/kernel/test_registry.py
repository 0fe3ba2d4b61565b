"""Plugin resolution: built-in, entry point, dotted module, .py file; unknown
names and misspelled hooks are one-line errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from wantrain import registry
from wantrain.run import CoreHooks
from wantrain.errors import PluginError, ProfileError
from wantrain.profile import load_profile

PLUGIN_SRC = textwrap.dedent(
    """
    import attrs
    from wantrain import hookimpl

    @attrs.frozen(kw_only=True)
    class Config:
        greeting: str = "hi"

    class Plugin:
        def __init__(self, config):
            self.config = config

        @hookimpl
        def on_step(self, run, step, metrics):
            pass
    """
)


def profile_with(plugins: dict, tmp_path):
    return load_profile(data={"job": {"name": "x"}, "datasets": [{"folder": "d"}], "plugins": plugins}) if tmp_path is None else _load(plugins, tmp_path)


def _load(plugins, tmp_path):
    import tomli_w

    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps({"job": {"name": "x"}, "datasets": [{"folder": "d"}], "plugins": plugins}))
    return load_profile(path)


def test_builtin(tmp_path):
    name = registry.builtin_names()[0]
    mod = registry.resolve(name)
    assert mod.__name__ == f"wantrain.plugins.{name}"


def test_py_file_relative_to_profile(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN_SRC)
    p = _load({"enabled": ["my_plugin.py"], "my_plugin.py": {"greeting": "hello"}}, tmp_path)
    assert p.plugins.configs["my_plugin.py"].greeting == "hello"
    pm = registry.make_plugin_manager(p, core=CoreHooks())
    assert registry.implemented_events(pm, pm.get_plugin("my_plugin.py")) == ["on_step"]


def test_dotted_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plug.py").write_text(PLUGIN_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    p = _load({"enabled": ["mypkg.plug"]}, tmp_path)
    assert p.plugins.configs["mypkg.plug"].greeting == "hi"
    pm = registry.make_plugin_manager(p)
    assert pm.get_plugin("mypkg.plug").config.greeting == "hi"


def test_entry_point(tmp_path, monkeypatch):
    """A real installed distribution (dist-info on sys.path) exposing the
    plugin under group ``wantrain.plugins``."""
    (tmp_path / "ep_plug_mod.py").write_text(PLUGIN_SRC)
    dist = tmp_path / "ep_plug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[wantrain.plugins]\nfancy = ep_plug_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fancy" in registry.entry_point_names()
    p = _load({"enabled": ["fancy"], "fancy": {"greeting": "yo"}}, tmp_path)
    pm = registry.make_plugin_manager(p)
    assert pm.get_plugin("fancy").config.greeting == "yo"


def test_unknown_plugin_lists_what_exists(tmp_path):
    with pytest.raises(ProfileError) as info:
        _load({"enabled": ["tensorbord"]}, tmp_path)
    (line,) = info.value.lines()
    assert line.startswith("error: plugins.enabled: unknown plugin (got 'tensorbord'); ")
    for name in registry.builtin_names():
        assert name in line


def test_plugin_settings_are_strict(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN_SRC)
    with pytest.raises(ProfileError) as info:
        _load({"enabled": ["my_plugin.py"], "my_plugin.py": {"greting": 3}}, tmp_path)
    assert info.value.lines() == ['error: plugins."my_plugin.py".greting: unknown key (got 3); did you mean \'greeting\'?']


def test_misspelled_hook_is_an_error_before_weights(tmp_path):
    (tmp_path / "typo.py").write_text(PLUGIN_SRC.replace("def on_step", "def on_stepp"))
    p = _load({"enabled": ["typo.py"]}, tmp_path)
    with pytest.raises(PluginError) as info:
        registry.make_plugin_manager(p, core=CoreHooks())
    assert info.value.lines() == ["error: plugins.\"typo.py\": implements an unknown event (got 'on_stepp'); did you mean 'on_step'?"]


def test_module_level_hookimpls(tmp_path):
    """A tinkerer's plugin: one @hookimpl function, no class."""
    (tmp_path / "tiny_plug.py").write_text("from wantrain import hookimpl\n\n@hookimpl\ndef on_run_end(run):\n    run.extras['done'] = True\n")
    p = _load({"enabled": ["tiny_plug.py"]}, tmp_path)
    pm = registry.make_plugin_manager(p)
    assert registry.implemented_events(pm, pm.get_plugin("tiny_plug.py")) == ["on_run_end"]


def test_trace_hooks_logs_every_event(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANTRAIN_TRACE_HOOKS", "1")
    p = _load({"enabled": []}, tmp_path)
    pm = registry.make_plugin_manager(p, core=CoreHooks())
    with caplog.at_level("INFO", logger="wantrain.hooks"):
        assert pm.hook.trained_experts(profile=p) == ["high_noise", "low_noise"]
    assert any("event trained_experts(profile) -> ['wantrain.core']" in r.getMessage() for r in caplog.records)


def test_kernel_imports_no_plugin():
    import subprocess

    code = "import sys, wantrain.loop, wantrain.commands.cli, wantrain.run; print([m for m in sys.modules if m.startswith('wantrain.plugins.')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
