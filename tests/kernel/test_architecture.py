"""The kernel's edges: it names no plugin, its top level stays small, every
command opens a run the same way, and plugin state is keyed by the kernel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from wantrain import registry
from wantrain.errors import ProfileError
from wantrain.profile import load_profile
from wantrain.run import open_run

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "kernel"
#: the resume folder ``<output_dir>/checkpoints/`` is the kernel's (DESIGN's
#: file layout), not the ``checkpoints`` plugin
ALLOWED = {("state.py", "checkpoints")}


def _string_literals(path: Path):
    """(line, value) of every string literal that is not a docstring."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_the_kernel_names_no_builtin_plugin():
    names = registry.builtin_names()
    assert {"quantize", "sample", "offload", "ema", "text_cache", "latent_cache"} <= set(names)
    found = []
    for path in sorted(KERNEL.rglob("*.py")):
        for line, value in _string_literals(path):
            for name in names:
                named = value == name or f"plugins.{name}" in value or f'"{name}"' in value or f"'{name}'" in value
                if named and (path.name, value) not in ALLOWED:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {value!r} names the plugin {name!r}")
    assert found == []


def test_the_kernel_top_level_is_small_and_subpackages_show_the_architecture():
    top = sum(len(p.read_text().splitlines()) for p in KERNEL.glob("*.py"))
    assert top <= 3000, f"kernel/*.py holds {top} lines"
    assert {p.name for p in KERNEL.iterdir() if (p / "__init__.py").is_file()} >= {"data", "formats", "commands"}


def test_check_plugins_estimate_and_sample_open_the_run_like_training(profile_data, tmp_path, capsys):
    """A plugin's check_profile stops every command that opens a run --
    `wantrain sample` included, which used to skip the checks."""
    from wantrain.commands.cli import main

    (tmp_path / "picky.py").write_text(
        "from wantrain import hookimpl\n"
        "from wantrain.errors import ProfileProblem\n\n"
        "@hookimpl\n"
        "def check_profile(profile):\n"
        "    return [ProfileProblem('plugins.picky', 'refuses this profile', fix='remove picky.py')]\n")
    import tomli_w

    profile_data["plugins"] = {"enabled": [str(tmp_path / "picky.py")]}
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(profile_data))
    with pytest.raises(ProfileError):
        open_run(load_profile(path), purpose="inspect")
    lora = tmp_path / "l_high_noise.safetensors"
    from safetensors.torch import save_file

    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 128),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(128, 4)}, str(lora))
    for argv in (["check", str(path)], ["plugins", str(path)], ["estimate", str(path)],
                 ["sample", str(path), "--lora", str(tmp_path / "l"), "--prompt", "x"]):
        assert main(argv) == 2, argv
        assert "error: plugins.picky: refuses this profile; remove picky.py" in capsys.readouterr().err, argv


def test_sample_quantizes_the_text_encoder_on_the_host_before_it_moves(profile_data, tmp_path, monkeypatch):
    """`wantrain sample` loads the frozen parts through the same path as
    training: the text encoder reaches the device only after quantize has
    made it 8-bit. The device is the `meta` stand-in, so a move is visible."""
    from optimum.quanto.nn import QLinear

    from wantrain import model
    from wantrain.plugins.sample.command import load_for_sampling

    seen = []
    (tmp_path / "spy.py").write_text(
        "from wantrain import hookimpl\n\n"
        "@hookimpl(trylast=True)\n"
        "def after_text_encoder_load(run, module):\n"
        "    import spy_log\n"
        "    spy_log.seen.append(({p.device.type for p in module.parameters()},\n"
        "                         sum(type(m).__name__ == 'QLinear' for m in module.modules())))\n")
    spy_log = type(__import__("sys"))("spy_log")
    spy_log.seen = seen
    monkeypatch.setitem(__import__("sys").modules, "spy_log", spy_log)
    monkeypatch.setattr(model, "resolve_device", lambda name: torch.device("meta"))
    profile_data["plugins"] = {"enabled": ["quantize", str(tmp_path / "spy.py")],
                               "quantize": {"transformer": "none", "text_encoder": "qint8"}}
    run = load_for_sampling(load_profile(data=profile_data), {})
    (devices, quantized), = seen
    assert devices == {"cpu"} and quantized > 0  # quantized while still on the host
    assert {p.device.type for p in run.text_encoder.parameters()} == {"meta"}  # then moved
    assert any(isinstance(m, QLinear) for m in run.text_encoder.modules())


def test_plugin_state_is_keyed_by_the_registered_name(profile_data, tmp_path):
    """Two copies of one plugin under two names keep two states; each gets
    back exactly what it returned."""
    import json

    from wantrain.loop import train

    src = ("from wantrain import hookimpl\n\n"
           "class Plugin:\n"
           "    restored = None\n"
           "    @hookimpl\n"
           "    def state_dict(self):\n"
           "        return {'who': __name__, 'n': 7}\n"
           "    @hookimpl\n"
           "    def load_state_dict(self, state):\n"
           "        self.restored = dict(state)\n")
    for name in ("alpha.py", "beta.py"):
        (tmp_path / name).write_text(src)
    profile_data["training"]["steps"] = 2
    profile_data["plugins"] = {"enabled": ["checkpoints", str(tmp_path / "alpha.py"), str(tmp_path / "beta.py")],
                               "checkpoints": {"every": 1}}
    first = train(load_profile(data=profile_data))
    state = json.loads((first.output_dir / "checkpoints" / "step_000000002" / "state.json").read_text())
    plugins = state["tree"]["plugins"]
    assert plugins[str(tmp_path / "alpha.py")] == {"who": "wantrain_user_plugin_alpha", "n": 7}
    assert plugins[str(tmp_path / "beta.py")] == {"who": "wantrain_user_plugin_beta", "n": 7}
    profile_data["training"]["steps"] = 3
    again = train(load_profile(data=profile_data))
    assert again.pm.get_plugin(str(tmp_path / "beta.py")).restored == {"who": "wantrain_user_plugin_beta", "n": 7}
