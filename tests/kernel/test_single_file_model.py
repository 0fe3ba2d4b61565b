"""``[model]`` pointed at original-layout single files (ComfyUI's): the tiny
model written in the original Wan key layout -- fp32, bf16 and ComfyUI's
scaled fp8 -- gives the same experts, VAE latents and text states as its
Diffusers folder, streams through the quantized loader, trains the same
LoRA, and ``wantrain check`` names every wrong file in one line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wantrain import archs, model
from wantrain.commands.check import check
from wantrain.formats import sources
from wantrain.formats import wan_original as wo
from wantrain.loop import train
from wantrain.profile import load_profile

T2V = archs.get("wan22_t2v_a14b")
FIELDS = {"high_noise": "transformer", "low_noise": "transformer_2", "vae": "vae", "text_encoder": "text_encoder"}


@pytest.fixture(scope="module")
def originals(tiny_model, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The tiny model as original single files, per storage."""
    root = tmp_path_factory.mktemp("original")
    return {storage: wo.write_tiny_original(tiny_model, root / storage, storage) for storage in ("fp32", "bf16", "fp8_scaled")}


def _source(tiny_model, files: dict[str, Path], standalone=False) -> sources.SingleFileSource:
    subs = {FIELDS[k]: Path(v) for k, v in files.items()}
    return sources.SingleFileSource(str(tiny_model), subs, {s: f"model.{k}" for k, s in FIELDS.items()}, None, standalone)


def _outputs(module, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype)
    text = torch.randn(1, 8, 32, generator=g).to(dtype)
    with torch.no_grad():
        return module(x, torch.tensor([600.0]), text, return_dict=False)[0].float()


def _pixels() -> torch.Tensor:
    return torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _states(tokenizer, encoder) -> torch.Tensor:
    return model.encode_text(tokenizer, encoder, ["a red circle moves", "a cat"], 16, "cpu", torch.float32)


# ---------------------------------------------------------------- names


def test_names_agree_with_diffusers_converters_on_the_real_layouts():
    """Our VAE table gives diffusers' own converter's names for the real Wan
    2.1 VAE; the expert names we write go back through diffusers' converter
    to where they came from (A14B widths, I2V-2.1 image layers included)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with init_empty_weights():
        vae = AutoencoderKLWan()
        expert = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=2,
                                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=1280,
                                       added_kv_proj_dim=5120)
    to_original = wo.vae_to_original(vae.state_dict())
    assert "decoder.upsamples.4.shortcut.weight" in to_original.values()
    assert convert_wan_vae_to_diffusers({o: o for o in to_original.values()}) == wo.vae_names(to_original.values())
    names = {k: wo.expert_to_original(k) for k in expert.state_dict()}
    assert names["blocks.1.attn1.to_q.weight"] == "blocks.1.self_attn.q.weight"
    assert names["blocks.0.norm2.weight"] == "blocks.0.norm3.weight" and names["proj_out.weight"] == "head.head.weight"
    assert wo.expert_names(names.values()) == {k: v for k, v in names.items()}


# ---------------------------------------------------------------- same outputs


def test_full_precision_files_give_exactly_the_diffusers_outputs(tiny_model, originals):
    ref, src = model.ModelSource(str(tiny_model)), _source(tiny_model, originals["fp32"])
    for expert in ("high_noise", "low_noise"):
        a, b = model.load_expert(ref, expert, torch.float32), model.load_expert(src, expert, torch.float32)
        assert torch.equal(_outputs(a), _outputs(b))
    assert torch.equal(model.encode_pixels(model.load_vae(ref), _pixels()), model.encode_pixels(model.load_vae(src), _pixels()))
    assert torch.equal(_states(*model.load_text_encoder(ref, torch.float32)), _states(*model.load_text_encoder(src, torch.float32)))
    # bf16 files at bf16: the same bf16 weights (diffusers' fp32 modules keep the file's values)
    a = model.load_expert(ref, "high_noise", torch.bfloat16)
    b = model.load_expert(_source(tiny_model, originals["bf16"]), "high_noise", torch.bfloat16)
    assert b.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16 and b.scale_shift_table.dtype == torch.float32
    assert torch.equal(a.blocks[0].attn1.to_q.weight, b.blocks[0].attn1.to_q.weight)
    assert torch.allclose(_outputs(a, torch.bfloat16), _outputs(b, torch.bfloat16), atol=0.05, rtol=0.05)


def test_scaled_fp8_files_are_dequantized_with_their_scales(tiny_model, originals):
    path = originals["fp8_scaled"]["high_noise"]
    with safe_open(str(path), framework="pt") as fh:
        assert "scaled_fp8" in fh.keys()
        raw, scale = fh.get_tensor("blocks.0.self_attn.q.weight"), fh.get_tensor("blocks.0.self_attn.q.scale_weight")
    assert raw.dtype == torch.float8_e4m3fn and scale.numel() == 1
    ref_weight = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))["blocks.0.attn1.to_q.weight"]
    read = wo.OriginalFile(path).read(["blocks.0.self_attn.q.weight"])["blocks.0.self_attn.q.weight"]
    assert torch.equal(read, raw.float() * scale)
    # e4m3: 3 mantissa bits, so within 1/16 of each value (plus the subnormal step)
    assert ((read - ref_weight).abs() <= ref_weight.abs() / 16 + scale * 2**-9).all()
    ref, src = model.ModelSource(str(tiny_model)), _source(tiny_model, originals["fp8_scaled"])
    for expert in ("high_noise", "low_noise"):
        a, b = _outputs(model.load_expert(ref, expert, torch.float32)), _outputs(model.load_expert(src, expert, torch.float32))
        assert (a - b).norm() / a.norm() < 0.05
    # the text encoder's 2 layers of random weights carry the fp8 error further (measured: 5.5 %)
    a, b = _states(*model.load_text_encoder(ref, torch.float32)), _states(*model.load_text_encoder(src, torch.float32))
    assert (a - b).norm() / a.norm() < 0.1


def test_comfyui_prefix_and_newer_scale_spelling_are_read(tiny_model, originals, tmp_path):
    """``model.diffusion_model.`` names, and ``weight_scale`` + ``comfy_quant`` instead of ``scale_weight``."""
    state = load_file(str(originals["fp8_scaled"]["high_noise"]))
    renamed = {}
    for key, value in state.items():
        if key == "scaled_fp8":
            continue
        if key.endswith(".scale_weight"):
            base = key[: -len(".scale_weight")]
            renamed[f"model.diffusion_model.{base}.weight_scale"] = value
            renamed[f"model.diffusion_model.{base}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            renamed["model.diffusion_model." + key] = value
    path = tmp_path / "comfy_newer.safetensors"
    save_file(renamed, str(path), metadata={"num_heads": "4"})
    a = model.load_expert(_source(tiny_model, {"high_noise": originals["fp8_scaled"]["high_noise"]}), "high_noise", torch.float32)
    b = model.load_expert(_source(tiny_model, {"high_noise": path}), "high_noise", torch.float32)
    assert torch.equal(_outputs(a), _outputs(b))


def test_quantized_loader_streams_a_single_file(tiny_model, originals, one_thread):
    from wantrain.plugins.quantize import loader

    ref = loader.load_quantized_expert(model.ModelSource(str(tiny_model)), "transformer", dtype=torch.float32, qtype="qint8")
    src = _source(tiny_model, originals["fp32"])
    got = loader.load_quantized_expert(src, "transformer", dtype=torch.float32, qtype="qint8")
    assert len(loader.quantized_linears(got)) == len(loader.quantized_linears(ref)) > 0
    assert torch.equal(_outputs(ref), _outputs(got))


# ---------------------------------------------------------------- profiles and runs


def _single_file_profile(profile_data, files: dict[str, Path], **extra) -> dict:
    data = copy.deepcopy(profile_data)
    data["model"].update({k: str(v) for k, v in files.items()}, **extra)
    return data


def test_training_from_single_files_gives_the_diffusers_lora(profile_data, tiny_model, originals, tmp_path):
    """Every component a single file, the tokenizer from the Diffusers folder
    named as ``tokenizer``: the same LoRA, tensor for tensor."""
    profile_data["training"]["steps"] = 2
    ref = train(load_profile(data=profile_data))
    data = _single_file_profile(profile_data, originals["fp32"], tokenizer=str(tiny_model / "tokenizer"))
    del data["model"]["name_or_path"]
    data["job"]["output_dir"] = str(tmp_path / "single")
    run = train(load_profile(data=data))
    assert isinstance(run.source, sources.SingleFileSource) and run.source.standalone
    for expert in ("high_noise", "low_noise"):
        a = load_file(str(Path(ref.output_dir, f"t_{expert}.safetensors")))
        b = load_file(str(Path(run.output_dir, f"t_{expert}.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_check_names_each_wrong_file_in_one_line(profile_data, tiny_model, originals, tmp_path):
    diffusers_file = tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"
    data = _single_file_profile(profile_data, {"high_noise": originals["bf16"]["vae"], "low_noise": tmp_path / "missing.safetensors",
                                               "vae": diffusers_file, "text_encoder": originals["bf16"]["text_encoder"]})
    lines = [p.line() for p in check(load_profile(data=data))]
    assert any(line.startswith("error: model.high_noise: is a Wan VAE, not a Wan transformer (expert)") for line in lines), lines
    assert any(line.startswith("error: model.low_noise: not found") for line in lines), lines
    assert any(line.startswith("error: model.vae: is a Wan transformer (expert) in Diffusers layout") for line in lines), lines
    assert not any("model.text_encoder" in line for line in lines) and all("\n" not in line for line in lines)
    # every component a file, no tokenizer and no name_or_path written: the tokenizer has no source
    data = _single_file_profile(profile_data, originals["bf16"])
    del data["model"]["name_or_path"]
    lines = [p.line() for p in check(load_profile(data=data))]
    assert [line for line in lines if "model." in line] == [
        'error: model.tokenizer: is needed: every component is a single file and none holds UMT5\'s tokenizer; add '
        'tokenizer = "google/umt5-xxl" (or a folder), or name_or_path = a Wan 2.2 Diffusers folder or hub id']
    # the same with name_or_path written out: accepted (its tokenizer/ is used)
    data["model"]["name_or_path"] = str(tiny_model)
    assert not [p for p in check(load_profile(data=data)) if p.where.startswith("model.")]


def test_an_expert_of_another_arch_is_named(profile_data, tiny_model, tmp_path):
    state = load_file(str(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    state["patch_embedding.weight"] = torch.zeros(128, 36, 1, 2, 2)
    path = wo.write_original("expert", state, tmp_path / "i2v.safetensors", metadata={"num_heads": "4"})
    problems = sources.single_file_problems(load_profile(data=_single_file_profile(profile_data, {"high_noise": path})), T2V)
    assert [p.line() for p in problems] == [
        f"error: model.high_noise: is an expert with 36 input channels; Wan 2.2 T2V-A14B takes 16 (got '{path}'); "
        "give a Wan 2.2 T2V-A14B file, or set [model] arch to match"]


def test_caches_key_a_single_file_vae_by_its_content(tiny_model, originals, tmp_path):
    """The latent cache of a run whose VAE is a single file follows that file
    (moved: the same key; another file: another key), not name_or_path."""
    import shutil
    from types import SimpleNamespace

    from wantrain.plugins import latent_cache

    def identity(vae_file):
        source = _source(tiny_model, {"vae": vae_file}) if vae_file else model.ModelSource(str(tiny_model))
        return latent_cache.vae_identity(SimpleNamespace(vae=SimpleNamespace(config={"z_dim": 16}), source=source,
                                                         profile=SimpleNamespace(model=SimpleNamespace(name_or_path=str(tiny_model)))))

    moved = tmp_path / "moved.safetensors"
    shutil.copy(originals["fp32"]["vae"], moved)
    assert identity(originals["fp32"]["vae"]) == identity(moved)
    assert len({identity(originals["fp32"]["vae"]), identity(originals["bf16"]["vae"]), identity(None)}) == 3


def test_a_computed_ara_is_cached_beside_the_expert_file(tiny_model, originals):
    from wantrain.plugins.quantize import ara

    source = _source(tiny_model, originals["bf16"])
    path = ara.ara_cache_path(source, "transformer_2", "qint4+ara", 16)
    assert path.parent == originals["bf16"]["low_noise"].parent and path.name.startswith("low_noise.wantrain_ara_svd_qint4_r16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_single_file_text_encoder_keeps_the_dtypes_from_pretrained_keeps(tmp_path, dtype):
    """transformers keeps UMT5's ``wo`` in fp32 under fp16 only (a bf16 run kept
    it fp32 from a single file: ~2 GiB more than from the Diffusers folder)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from wantrain.formats.sources import _target_dtype

    UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1)).save_pretrained(tmp_path)
    ref = UMT5EncoderModel.from_pretrained(tmp_path, torch_dtype=dtype)
    for name, p in ref.named_parameters():
        assert _target_dtype(ref, name, dtype) == p.dtype, name
