"""The file layouts (wantrain.formats): every LoRA layout read back with the
same weights, other tools' files loading into the right experts through
init_from and ``wantrain sample --lora``, one-line errors for files that are
not for this model, ARA files of both experts, and the one writer's bytes."""

from __future__ import annotations

import copy
import json

import pytest
import tomli_w
import torch
from safetensors.torch import load_file, save_file

from wantrain import lora
from wantrain.commands import export
from wantrain.commands.cli import main as cli
from wantrain.errors import WantrainError
from wantrain.formats import ara as ara_format
from wantrain.formats import lora as lora_format
from wantrain.formats import safetensors as st
from wantrain.formats import state as state_files
from wantrain.loop import load, setup
from wantrain.profile import load_profile

RANK, ALPHA = 4, 8.0  # the files' LoRA: scale 2
EXPECTED = "expected keys like diffusion_model.blocks.0.self_attn.q.lora_A.weight (ComfyUI), " \
           "transformer.blocks.0.attn1.to_q.lora_A.weight (diffusers), lora_unet_blocks_0_self_attn_q.lora_down.weight (kohya)"


@pytest.fixture(scope="module")
def shapes(tiny_model) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of every trainable layer of the tiny model."""
    weights = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    return {k.removesuffix(".weight"): tuple(t.shape) for k, t in weights.items()
            if k.startswith("blocks.") and k.removesuffix(".weight").split(".", 2)[2] in lora_format.DIFFUSERS_TO_COMFY}


def _weights(shapes, seed: int) -> lora_format.LoraWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {n: (torch.randn(RANK, i, generator=g), 0.05 * torch.randn(o, RANK, generator=g)) for n, (o, i) in sorted(shapes.items())}
    return lora_format.LoraWeights(layout="comfyui", modules=modules, alphas={n: ALPHA for n in modules})


def _deltas(w: lora_format.LoraWeights) -> dict[str, torch.Tensor]:
    return {n: (w.alphas[n] / a.shape[0]) * b.double() @ a.double() for n, (a, b) in w.modules.items()}


def _assert_same(got: lora_format.LoraWeights, want: lora_format.LoraWeights, what: str) -> None:
    assert set(got.modules) == set(want.modules) and not got.skipped, what
    g, w = _deltas(got), _deltas(want)
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=1e-6, atol=1e-9, msg=f"{what} {name}")


# ---------------------------------------------------------------- other tools' files, written by hand


def _comfy(name: str) -> str:
    return lora_format.comfy_name(name)


def _down_up(w):
    out = {}
    for n, (a, b) in w.modules.items():
        k = f"diffusion_model.{_comfy(n)}"
        out |= {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(ALPHA)}
    return out


def _kohya(w, diffusers_names=False):
    """kohya / musubi-tuner: underscored names, alpha halved and lora_up doubled (same product)."""
    out = {}
    for n, (a, b) in w.modules.items():
        k = "lora_unet_" + (n if diffusers_names else _comfy(n)).replace(".", "_")
        out |= {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": 2 * b, f"{k}.alpha": torch.tensor(ALPHA / 2)}
    return out


def _peft(w, prefix, default=""):
    return {f"{prefix}{n}.lora_{p}{default}.weight": t for n, (a, b) in w.modules.items() for p, t in (("A", a), ("B", b))}


def _diffusion_pipe(w):
    """tdrussell/diffusion-pipe models/wan: PEFT names of the original Wan model, ``diffusion_model.`` in front, no alpha."""
    return {f"diffusion_model.{_comfy(n)}.lora_{p}.weight": t for n, (a, b) in w.modules.items() for p, t in (("A", a), ("B", b))}


def _ai_toolkit(high, low, outer="diffusion_model."):
    """ostris/ai-toolkit Wan 2.2 14B: both experts in one file, original Wan names, no alpha (scale 1: B pre-scaled)."""
    out = {}
    for tag, w in (("transformer_1", high), ("transformer_2", low)):
        for n, (a, b) in w.modules.items():
            k = f"{outer}{tag}.{_comfy(n)}"
            out |= {f"{k}.lora_A.weight": a, f"{k}.lora_B.weight": b * (w.alphas[n] / RANK)}
    return out


def _write(folder, name, tensors, metadata=None, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(folder / name), metadata=metadata)
    return folder / name


def test_every_layout_reads_back_with_the_same_weights(shapes, tmp_path):
    high, low = _weights(shapes, 1), _weights(shapes, 2)
    peft_config = {"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA", "target_modules": ["q", "k", "v", "o", "0", "2"]}
    ours = lora_format.write(high, "comfyui", tmp_path / "ours" / "x_high_noise.safetensors")
    diffusers = lora_format.write(high, "diffusers", tmp_path / "ours" / "x_diffusers.safetensors")
    files = {
        "comfyui": ours,
        "diffusers (ours, alpha folded)": diffusers,
        "comfyui-down-up": _write(tmp_path / "du", "x.safetensors", _down_up(high)),
        "kohya": _write(tmp_path / "k1", "x.safetensors", _kohya(high)),
        "kohya (diffusers names)": _write(tmp_path / "k2", "x.safetensors", _kohya(high, diffusers_names=True)),
        "diffusers (metadata)": _write(tmp_path / "d1", "x.safetensors", _peft(high, "transformer."),
                                       {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}),
        "diffusers (adapter_config)": _write(tmp_path / "d2", "adapter_model.safetensors", _peft(high, "base_model.model.", ".default"),
                                             config=peft_config),
        "diffusion-pipe": _write(tmp_path / "dp" / "epoch5", "adapter_model.safetensors", _diffusion_pipe(high), {"format": "pt"},
                                 config=peft_config),
    }
    for what, path in files.items():
        (got,) = lora_format.read_file(path).values()
        assert got.layout == what.split(" ")[0], what
        _assert_same(got, high, what)
    assert lora_format.read_lora(ours).expert == "high_noise"
    for outer in ("diffusion_model.", ""):  # ai-toolkit's combined file, with and without diffusion_model.
        path = _write(tmp_path / f"ai{outer}", "combined.safetensors", _ai_toolkit(high, low, outer))
        found = lora_format.read_file(path)
        assert sorted(found) == ["high_noise", "low_noise"] and all(w.layout == "ai-toolkit" for w in found.values())
        _assert_same(found["high_noise"], high, f"ai-toolkit {outer} high")
        _assert_same(found["low_noise"], low, f"ai-toolkit {outer} low")
        assert lora_format.read_lora(path, "low_noise").modules.keys() == low.modules.keys()


def test_a_combined_file_exports_and_describes_per_expert(shapes, tmp_path, capsys):
    high, low = _weights(shapes, 1), _weights(shapes, 2)
    path = _write(tmp_path, "combined.safetensors", _ai_toolkit(high, low))
    written = export.export(path, "comfyui", tmp_path / "out.safetensors")
    assert [p.name for p in written] == ["out_high_noise.safetensors", "out_low_noise.safetensors"]
    _assert_same(lora_format.read_lora(written[1]), low, "exported low half")
    assert lora_format.read_lora(written[1]).expert == "low_noise"
    assert cli(["lora-info", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{path}: both experts in one file" in text and "expert: high_noise" in text and "expert: low_noise" in text
    assert "layout: ai-toolkit" in text and "alpha: 4 (scale alpha/rank = 1)" in text


# ---------------------------------------------------------------- init_from


def _adapter_deltas(run, expert, alpha):
    state = lora.lora_state(run.experts[expert])
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    return {n: (alpha / RANK) * state[f"{n}.lora_B.weight"].double() @ state[f"{n}.lora_A.weight"].double() for n in names}


def _start_from(profile_data, init_from):
    data = copy.deepcopy(profile_data)
    data["target"] = {**data["target"], "init_from": str(init_from)}
    run = setup(load_profile(data=data))
    try:
        load(run)
    finally:
        run.data.close()
    return run


@pytest.mark.parametrize("tool", ["diffusion-pipe", "ai-toolkit"])
def test_other_tools_files_start_the_right_experts(profile_data, shapes, tmp_path, tool):
    high, low = _weights(shapes, 3), _weights(shapes, 4)
    if tool == "ai-toolkit":
        path = _write(tmp_path, "wan22_lora.safetensors", _ai_toolkit(high, low))
        want = {"high_noise": high, "low_noise": low}
    else:  # one expert per run; alpha only in the adapter_config.json beside it
        path = _write(tmp_path / "step500", "adapter_model.safetensors", _diffusion_pipe(high), {"format": "pt"},
                      config={"r": RANK, "lora_alpha": ALPHA})
        want = {"high_noise": high, "low_noise": high}  # the file names no expert: both start from it
    run = _start_from(profile_data, path)
    alpha = profile_data["target"]["alpha"]
    for expert, w in want.items():
        got = _adapter_deltas(run, expert, alpha)
        for name, delta in _deltas(w).items():
            torch.testing.assert_close(got[name], delta, rtol=1e-6, atol=1e-9, msg=f"{tool} {expert} {name}")


def test_a_file_not_for_this_model_is_one_error_line(profile_data, shapes, tmp_path):
    beyond = _weights(shapes, 5)
    beyond.modules = {n.replace(f"blocks.{n.split('.')[1]}.", f"blocks.{40 + int(n.split('.')[1])}."): t
                      for n, t in beyond.modules.items()}
    beyond.alphas = {n: ALPHA for n in beyond.modules}
    path = lora_format.write(beyond, "comfyui", tmp_path / "big_high_noise.safetensors")
    with pytest.raises(WantrainError) as err:
        _start_from(profile_data, path)
    assert err.value.lines() == [
        f"error: {path}: not a LoRA wantrain can read: its modules apply to none of this model's layers "
        f"(got 'blocks.40.attn1.to_k'); {lora_format.EXPECTED}"]

    unrelated = _write(tmp_path, "model.safetensors", {"conv.weight": torch.zeros(2, 2), "norm.bias": torch.zeros(2)})
    with pytest.raises(WantrainError) as err:
        lora_format.read_lora_sources(unrelated, ["high_noise", "low_noise"], where="target.init_from")
    (line,) = err.value.lines()
    assert line.startswith(f"error: {unrelated}: not a LoRA wantrain can read: no LoRA tensors of a Wan transformer "
                           "(got 'conv.weight, norm.bias'); " + EXPECTED)


# ---------------------------------------------------------------- wantrain sample --lora


def test_sample_renders_a_kohya_file_like_our_file(profile_data, shapes, tmp_path, capsys):
    profile_data["plugins"] = {"enabled": ["sample"], "sample": {
        "prompts": ["a [trigger] clip"], "width": 48, "height": 32, "num_frames": 5, "steps": 2, "seed": 3}}
    profile = tmp_path / "p.toml"
    profile.write_text(tomli_w.dumps(profile_data))
    w = _weights(shapes, 6)
    w.modules = {n: (a, 20 * b) for n, (a, b) in w.modules.items()}  # visibly changes the render
    kohya = _write(tmp_path / "kohya", "style.safetensors", _kohya(w))  # names no expert: both experts
    ours = tmp_path / "ours" / "style"
    for expert in ("high_noise", "low_noise"):
        lora_format.write(w, "comfyui", tmp_path / "ours" / f"style_{expert}.safetensors")
    zero = _write(tmp_path / "zero", "zero.safetensors", _kohya(lora_format.LoraWeights(
        layout="", modules={n: (a, 0 * b) for n, (a, b) in w.modules.items()}, alphas=w.alphas)))
    videos = {}
    for name, source in {"kohya": kohya, "ours": ours, "zero": zero}.items():
        assert cli(["sample", str(profile), "--lora", str(source), "-o", str(tmp_path / name)]) == 0, name
        videos[name] = (tmp_path / name / "0.mp4").read_bytes()
    assert videos["kohya"] == videos["ours"]
    assert videos["kohya"] != videos["zero"]
    capsys.readouterr()
    unrelated = _write(tmp_path, "other.safetensors", {"weight": torch.zeros(2, 2)})
    assert cli(["sample", str(profile), "--lora", str(unrelated)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert err == [f"error: {unrelated}: not a LoRA wantrain can read: no LoRA tensors of a Wan transformer "
                   f"(got 'weight'); {lora_format.EXPECTED}"]


# ---------------------------------------------------------------- ARA files


def test_an_ara_file_of_both_experts_gives_each_its_half(tmp_path):
    g = torch.Generator().manual_seed(0)
    halves = {}
    tensors = {}
    for tag, expert in (("transformer_1", "high_noise"), ("transformer_2", "low_noise")):
        down, up = torch.randn(8, 128, generator=g), torch.randn(128, 8, generator=g)
        halves[expert] = (down, up)
        tensors |= {f"{tag}.blocks.0.attn1.to_q.lora_A.weight": down, f"{tag}.blocks.0.attn1.to_q.lora_B.weight": up,
                    f"{tag}.proj_out.lora_A.weight": down[:, :128], f"{tag}.proj_out.lora_B.weight": up[:64]}
    path = _write(tmp_path, "ara_both.safetensors", tensors)
    for expert, (down, up) in halves.items():
        layers, _ = ara_format.read_ara_file(path, expert)
        assert sorted(layers) == ["blocks.0.attn1.to_q", "proj_out"], expert
        got_down, got_up, scale = layers["blocks.0.attn1.to_q"]
        assert torch.equal(got_down, down) and torch.equal(got_up, up) and scale == 1.0
    with pytest.raises(ValueError, match="holds both experts"):
        ara_format.read_ara_file(path)
    comfy = ara_format.ara_to_state(ara_format.read_ara_file(path, "low_noise")[0], "comfy")
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in comfy and "diffusion_model.head.head.alpha" in comfy


# ---------------------------------------------------------------- the writer


def test_the_writer_is_canonical_and_state_tensors_round_trip_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "fp16": torch.randn(7, generator=g).half(),
        "fp32": torch.tensor([float("nan"), -0.0, 1e-40]), "fp64": torch.randn(2, generator=g).double(),
        "i64": torch.tensor([2**62, -1]), "u8": torch.get_rng_state(), "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "strided": torch.arange(12.0).reshape(3, 4).T,
    }
    assert st.serialize(tensors, {"b": "1", "a": "2"}) == st.serialize(dict(reversed(tensors.items())), {"a": "2", "b": "1"})
    doc = {"format": state_files.FORMAT, "version": state_files.VERSION, "step": 1, "experts": ["high_noise"], "tree": {}}
    state_files.write_files(tmp_path, doc, tensors, {"high_noise.blocks.0.attn1.to_q.lora_A.weight": tensors["fp32"]}, {"format": "pt"})
    back = load_file(str(tmp_path / state_files.TENSORS_FILE))
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape, key
        assert torch.equal(back[key].reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), key
    assert state_files.read_doc(tmp_path) == doc
    assert not list(tmp_path.glob(".*")), "no temporary file left"
    with pytest.raises(WantrainError, match=r"error: --lora: file not found \(got '.*nope.safetensors'\); check the path"):
        st.read(tmp_path / "nope.safetensors", "--lora")
