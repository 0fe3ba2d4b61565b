"""quantize, ARA files: one file serves both experts in every key form
ai-toolkit writes the published ``wan22_14b_t2i_torchao_uint4`` adapter in
(``transformer_1`` = high noise, ``transformer_2`` = low noise, no alpha);
a file that leaves a quantized layer uncovered, or was made for another
grid, is an error naming the count and the fix; ``wantrain check`` needs
no network; ``hf://`` paths go through huggingface_hub at load time.
Files are synthesized here (no hub access)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wantrain.errors import ProfileError
from wantrain.formats.lora import comfy_name
from wantrain.model import ModelSource
from wantrain.plugins.quantize import ara, loader
from wantrain.profile import load_profile

pytestmark = pytest.mark.usefixtures("one_thread")

PUBLISHED = "wan22_14b_t2i_torchao_uint4.safetensors"
TAGS = {"high_noise": "transformer_1", "low_noise": "transformer_2"}


def _key(form: str, tag: str, name: str, part: str) -> str:
    """One tensor name of a two-expert ARA file, in ``form``."""
    a_b = {"A": "lora_A", "B": "lora_B"}[part]
    if form == "comfy":  # ai-toolkit's saved file (convert_to_original)
        return f"diffusion_model.{tag}.{comfy_name(name)}.{a_b}.weight"
    if form == "peft_transformer":  # ai-toolkit's in-memory PEFT names
        return f"transformer.{tag}.{name}.{a_b}.weight"
    if form == "bare":
        return f"{tag}.{name}.{a_b}.weight"
    if form == "peft_base_model":
        return f"base_model.model.{tag}.{name}.{a_b}.default.weight"
    if form == "diffusion_model_diffusers":
        return f"diffusion_model.{tag}.{name}.{'lora_down' if part == 'A' else 'lora_up'}.weight"
    if form == "kohya":
        flat = f"{tag}_{name}".replace(".", "_")
        return f"lora_transformer_{flat}.{'lora_down' if part == 'A' else 'lora_up'}.weight"
    raise ValueError(form)


@pytest.fixture(scope="module")
def adapters(tiny_model):
    """Per expert ``{layer: (down, up)}`` of rank 8 for every quantized layer
    (seeded random: only names and shapes matter here), different per expert."""
    from wantrain.model import build_empty

    out = {}
    for seed, (expert, sub) in enumerate((("high_noise", "transformer"), ("low_noise", "transformer_2"))):
        meta = build_empty(loader.read_config(ModelSource(str(tiny_model)), sub))
        g = torch.Generator().manual_seed(seed)
        out[expert] = {}
        for name in loader.planned_linears(meta, loader.DEFAULT_EXCLUDE):
            layer = meta.get_submodule(name)
            out[expert][name] = (0.01 * torch.randn(8, layer.in_features, generator=g),
                                 0.01 * torch.randn(layer.out_features, 8, generator=g))
    return out


def _write(path, adapters, form, drop=(), meta=None):
    state = {}
    for expert, layers in adapters.items():
        for name, (down, up) in layers.items():
            if name in drop:
                continue
            state[_key(form, TAGS[expert], name, "A")] = down
            state[_key(form, TAGS[expert], name, "B")] = up
    save_file(state, str(path), metadata=meta)
    return path


def _load(tiny_model, path, expert, qtype="uint4+ara", shared=True):
    plan = ara.AraPlan(qtype, 16, file=path, expert=expert, shared=shared)
    sub = {"high_noise": "transformer", "low_noise": "transformer_2"}[expert]
    module = loader.load_quantized_expert(ModelSource(str(tiny_model)), sub, dtype=torch.float32, qtype=qtype, ara=plan)
    return module, plan


@pytest.mark.parametrize("form", ["comfy", "peft_transformer", "bare", "peft_base_model", "diffusion_model_diffusers", "kohya"])
def test_one_file_serves_both_experts_in_every_key_form(tiny_model, adapters, tmp_path, form):
    path = _write(tmp_path / PUBLISHED, adapters, form)
    for expert in ("high_noise", "low_noise"):
        module, plan = _load(tiny_model, path, expert)
        assert plan.attached == 40  # every quantized block linear of the tiny model (400 at A14B)
        attached = ara.ara_layers(module)
        assert set(attached) == set(adapters[expert])
        for name, (down, up) in adapters[expert].items():
            # transformer_1 -> high noise, transformer_2 -> low noise; no alpha: scale 1
            assert torch.equal(attached[name].down, down) and torch.equal(attached[name].up, up)
            assert attached[name].scale == 1.0


def test_a_training_run_takes_the_file_as_is(profile_data, adapters, tmp_path):
    path = _write(tmp_path / PUBLISHED, adapters, "comfy")
    profile_data["plugins"] = {"enabled": ["quantize"], "quantize": {"transformer": "uint4+ara", "ara": str(path)}}
    from wantrain.commands.check import check
    from wantrain.loop import load, setup

    profile = load_profile(data=profile_data)
    assert check(profile) == []
    run = setup(profile)
    load(run)  # what a training run does before its first step
    plans = run.pm.get_plugin("quantize").ara_plans
    assert plans["high_noise"].attached == plans["low_noise"].attached == 40


def test_a_file_missing_layers_is_an_error_with_the_count(tiny_model, adapters, tmp_path):
    some = sorted(adapters["high_noise"])[:3]
    path = _write(tmp_path / PUBLISHED, adapters, "comfy", drop=some)
    with pytest.raises(ProfileError) as err:
        _load(tiny_model, path, "high_noise")
    line = str(err.value)
    assert line.startswith("error: plugins.quantize.ara:")
    assert "has no adapter for 3 of the 40 quantized layers" in line and any(name in line for name in some)
    assert "exclude" in line and 'ara = "calibrated"' in line
    # a file of other names entirely: nothing matches, all 40 are named
    save_file({"transformer_1.foo.lora_A.weight": torch.zeros(2, 2), "transformer_1.foo.lora_B.weight": torch.zeros(2, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(ProfileError, match="no adapter for 40 of the 40"):
        _load(tiny_model, tmp_path / "other.safetensors", "high_noise")


def test_a_file_made_for_another_grid_is_an_error(profile_data, tiny_model, adapters, tmp_path):
    ours = _write(tmp_path / "ara.safetensors", adapters, "bare", meta={"wantrain.ara.grid": "quanto-qint4-g128"})
    with pytest.raises(ProfileError, match="made for the quanto-qint4-g128 grid.*uint4"):
        _load(tiny_model, ours, "high_noise")
    published = _write(tmp_path / PUBLISHED, adapters, "comfy")
    with pytest.raises(ProfileError, match='torchao-uint4-g64 grid.*transformer = "uint4\\+ara"'):
        _load(tiny_model, published, "high_noise", qtype="qint4+ara")
    # and wantrain check says so before any weight loads
    from wantrain.commands.check import check

    profile_data["plugins"] = {"enabled": ["quantize"], "quantize": {"transformer": "qint4+ara", "ara": str(published)}}
    lines = [p.line() for p in check(load_profile(data=profile_data))]
    assert any("made for the torchao-uint4-g64 grid, not quanto-qint4-g128" in line for line in lines), lines


def test_files_we_write_record_their_grid(tiny_model, tmp_path):
    from safetensors import safe_open

    for qtype, grid in (("qint4+ara", "quanto-qint4-g128"), ("uint4+ara", "torchao-uint4-g64")):
        cache = tmp_path / f"{qtype}.safetensors"
        loader.load_quantized_expert(ModelSource(str(tiny_model)), "transformer", dtype=torch.float32, qtype=qtype,
                                     exclude=(*loader.DEFAULT_EXCLUDE, "blocks.[123].*"), ara=ara.AraPlan(qtype, 4, cache=cache))
        with safe_open(str(cache), "pt") as fh:
            assert fh.metadata()["wantrain.ara.grid"] == grid


def test_check_rules_without_network(profile_data, adapters, tmp_path):
    from wantrain.commands.check import check

    def lines(spec):
        profile_data["plugins"] = {"enabled": ["quantize"], "quantize": {"transformer": "uint4+ara", "ara": spec}}
        return [p.line() for p in check(load_profile(data=profile_data))]

    # hub files are fetched at load, never by check
    assert lines("hf://ostris/accuracy_recovery_adapters/" + PUBLISHED) == []
    # one expert's file (no transformer_1./transformer_2. names) cannot serve both
    single = {n: t for n, t in adapters.items() if n == "high_noise"}
    state = {f"{name}.lora_{p}.weight": t for name, (d, u) in single["high_noise"].items() for p, t in (("A", d), ("B", u))}
    save_file(state, str(tmp_path / "one.safetensors"))
    assert any("cannot serve both experts" in line for line in lines(str(tmp_path / "one.safetensors")))
    # a file with one half only
    _write(tmp_path / "half.safetensors", single, "comfy")
    assert any("no low_noise half" in line for line in lines(str(tmp_path / "half.safetensors")))
    assert any("ARA file not found" in line for line in lines(str(tmp_path / "missing.safetensors")))
    # the {expert} form still works, per file
    save_file(state, str(tmp_path / "ara_high_noise.safetensors"))
    found = lines(str(tmp_path / "ara_{expert}.safetensors"))
    assert len(found) == 1 and "ARA file for low_noise not found" in found[0]


def test_hub_paths_resolve_through_huggingface_hub_at_load(monkeypatch, adapters, tmp_path, tiny_model):
    """The hub itself is out of reach here: huggingface_hub's download is
    replaced by one that serves a local file and records what was asked."""
    import huggingface_hub

    local = _write(tmp_path / PUBLISHED, adapters, "comfy")
    asked = []

    def download(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    path = ara.resolve_ara_path("hf://ostris/accuracy_recovery_adapters/" + PUBLISHED, "high_noise")
    assert asked == [("ostris/accuracy_recovery_adapters", PUBLISHED, None)] and path == local
    ara.resolve_ara_path("hf://ostris/accuracy_recovery_adapters@abc123/sub/" + PUBLISHED, "low_noise")
    assert asked[-1] == ("ostris/accuracy_recovery_adapters", "sub/" + PUBLISHED, "abc123")
    _, plan = _load(tiny_model, path, "low_noise")
    assert plan.attached == 40
