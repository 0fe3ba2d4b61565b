"""Device placement without CUDA: the ``meta`` device stands in for the
accelerator and a whole run (the kernel's own loop, every plugin of the
recipe, previews and saves) goes through it for a few steps.

A cross-device op between a meta tensor and a CPU tensor raises on the CPU
exactly as a CUDA/CPU mix does (``Tensor on device meta is not on the
expected device cpu!``), so what would crash on a GPU crashes here. The
:class:`MetaIsTheDevice` mode fills in what a meta tensor cannot do and a
CUDA tensor can -- copies out of it (zeros: only placement is checked),
Python numbers from it (``float(loss)``), ``param.data = <other device>``
-- and nothing else.

Checked after the steps: the LoRA weights and optimizer state of the
active expert are on the device, a parked expert (offload ``experts``) is on
the host with its LoRA and optimizer state, the EMA shadow is where
``[plugins.ema] device`` says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import wantrain.model
from wantrain.loop import train
from wantrain.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "profiles").glob("*.toml"))
META, CPU = torch.device("meta"), torch.device("cpu")
_DATA = torch._C.TensorBase.__dict__["data"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


class MetaIsTheDevice(TorchFunctionMode):
    """What a CUDA tensor can do and a meta tensor cannot, filled in."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and _meta(args[0]):
            if func in (torch.Tensor.__float__, torch.Tensor.item):
                return 0.0
            if func in (torch.Tensor.__int__, torch.Tensor.__index__):
                return 0
            if func is torch.Tensor.__bool__:
                return True
            if func is torch.Tensor.cpu:
                return torch.zeros(args[0].shape, dtype=args[0].dtype)
            if func is torch.Tensor.to:
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                if device is not None and device.type == "cpu":
                    return torch.zeros(args[0].shape, dtype=dtype or args[0].dtype)
        if func is torch.Tensor.copy_ and not _meta(args[0]) and _meta(args[1]):
            return args[0]
        if getattr(func, "__self__", None) is _DATA and len(args) == 2 and _meta(args[0]) != _meta(args[1]):
            old, new = args  # param.data = <other device>: allowed for CUDA/CPU, not for meta/CPU
            if isinstance(old, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            torch.utils.swap_tensors(old, new)
            return None
        return func(*args, **kwargs)


@pytest.fixture
def on_meta(monkeypatch):
    """Runs opened while this is active put their modules on the meta device."""
    monkeypatch.setattr(wantrain.model, "resolve_device", lambda name: META)
    with MetaIsTheDevice():
        yield


def small(path: Path, tiny_model, demo_data, out: Path, steps: int = 3, extra=()) -> list[str]:
    """``--set`` overrides: the tiny model and demo data, a few small steps,
    small previews; nothing placement-relevant changed."""
    raw = load_profile(path)
    sets = [f'model.name_or_path="{tiny_model}"', f'job.output_dir="{out}"', f"training.steps={steps}",
            "training.warmup_steps=0", "training.num_workers=0"]
    if raw.job.trigger_word is None:
        sets.append('job.trigger_word="sks"')
    for i in range(len(raw.datasets)):
        sets += [f'datasets[{i}].folder="{demo_data}"', f"datasets[{i}].resolutions=[32]", f"datasets[{i}].num_frames=5"]
    if "sample" in raw.plugins.enabled:
        sets += ["plugins.sample.width=32", "plugins.sample.height=32", "plugins.sample.num_frames=5",
                 "plugins.sample.steps=2", f"plugins.sample.every={steps}",
                 "plugins.sample.at_start=false"]  # the base-model render places nothing the last one does not
    if "checkpoints" in raw.plugins.enabled:
        sets.append(f"plugins.checkpoints.every={steps}")
    return [*sets, *extra]


def placement_problems(run) -> list[str]:
    """Every tensor that is not where the design puts it."""
    problems = []
    offload = run.pm.get_plugin("offload")
    parked = {e for e, where in (offload.placement if offload else {}).items() if where == "host" and "." not in e}
    for expert in run.trained:
        want = CPU if expert in parked else META
        for p in run.lora_parameters[expert]:
            if p.device != want:
                problems.append(f"{expert} LoRA weight on {p.device}, expected {want}")
            for key, value in run.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.device != want:
                    problems.append(f"{expert} optimizer {key} on {value.device}, expected {want}")
        frozen = [t for t in run.experts[expert].parameters() if not t.requires_grad]
        if expert in parked and any(_meta(t) for t in frozen):
            problems.append(f"{expert} is parked but frozen weights are on the device")
    ema = run.pm.get_plugin("ema")
    if ema is not None:
        want = CPU if ema.config.device == "host" else META
        for expert, tensors in ema.shadow.tensors.items():
            if any(t.device != want for t in tensors.values()):
                problems.append(f"ema shadow of {expert} not on {want}")
    return problems


def test_ema_offload_quantize_on_a_second_device(on_meta, profile_data):
    """EMA's shadow was made on the host (offload parks the new adapters) and
    ``lerp_`` against the device weights raised at the first update."""
    profile_data["plugins"] = {"enabled": ["quantize", "offload", "ema"],
                               "quantize": {"transformer": "qint8"}, "offload": {"experts": True}}
    profile_data["training"]["steps"] = 3
    run = train(load_profile(data=profile_data))
    assert run.step == 3
    assert placement_problems(run) == []
    assert {t.device for ts in run.pm.get_plugin("ema").shadow.tensors.values() for t in ts.values()} == {CPU}


def test_ema_shadow_on_the_device(on_meta, profile_data):
    profile_data["plugins"] = {"enabled": ["offload", "ema"], "offload": {"experts": True}, "ema": {"device": "device"}}
    profile_data["training"]["steps"] = 2
    run = train(load_profile(data=profile_data))
    assert placement_problems(run) == []
    assert {t.device for ts in run.pm.get_plugin("ema").shadow.tensors.values() for t in ts.values()} == {META}


_TINY: dict = {}  # arch -> its tiny model, written once per session


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_placement(path, on_meta, tiny_model, demo_data, tmp_path, tmp_path_factory):
    """Every shipped recipe, as written, for a few steps on the stand-in
    device (on the tiny model of the recipe's arch)."""
    arch = load_profile(path).model.arch
    if arch != "wan22_t2v_a14b" and arch not in _TINY:
        from wantrain.commands.tiny import make_tiny_model

        _TINY[arch] = make_tiny_model(tmp_path_factory.mktemp(arch), seed=0, arch=arch)
    model_dir = _TINY.get(arch, tiny_model)
    run = train(load_profile(path, small(path, model_dir, demo_data, tmp_path / "out")), resume="never")
    assert run.step == 3
    assert placement_problems(run) == []


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["host", "device"])
def test_ema_offload_quantize_on_cuda(profile_data, where):
    """The same combination on a real card (skipped without CUDA)."""
    profile_data["job"]["device"] = "cuda"
    profile_data["plugins"] = {"enabled": ["quantize", "offload", "ema"], "quantize": {"transformer": "qint8"},
                               "offload": {"experts": True}, "ema": {"device": where}}
    profile_data["training"]["steps"] = 3
    run = train(load_profile(data=profile_data))
    want = "cpu" if where == "host" else "cuda"
    assert {t.device.type for ts in run.pm.get_plugin("ema").shadow.tensors.values() for t in ts.values()} == {want}
