"""The original Wan single-file layout (what ComfyUI, musubi-tuner and the Wan
repository load), read as Diffusers names -- and written, for tests and tools.

One file per component:

============  ==========================================================  =====================================
component     original names (examples)                                   Diffusers names
============  ==========================================================  =====================================
expert        ``blocks.{i}.self_attn.q.weight``, ``blocks.{i}.ffn.0``,     ``blocks.{i}.attn1.to_q.weight``,
              ``blocks.{i}.modulation``, ``head.head``, ``time_embedding``  ``ffn.net.0.proj``, ``scale_shift_table``,
              (``model.diffusion_model.`` / ``diffusion_model.`` prefix     ``proj_out``, ``condition_embedder...``
              accepted)                                                   (diffusers' own converter)
VAE           ``encoder.downsamples.{i}.residual.2``, ``decoder.upsamples``  ``encoder.down_blocks.{i}.conv1``,
              (flat), ``encoder.middle.1``, ``conv1`` / ``conv2``          ``decoder.up_blocks.{b}.resnets.{j}``, ...
text encoder  ``encoder.block.{i}.layer.0.SelfAttention.q.weight``,       the same (transformers' UMT5EncoderModel)
              ``shared.weight`` (ComfyUI's UMT5 file)
============  ==========================================================  =====================================

Weights may be stored as fp32/fp16/bf16, as plain ``float8_e4m3fn`` /
``float8_e5m2``, or as ComfyUI's scaled fp8: a ``scaled_fp8`` marker tensor
and a per-tensor ``<layer>.scale_weight`` (its newer spelling:
``<layer>.weight_scale`` with a ``<layer>.comfy_quant`` JSON tensor). Reading
dequantizes ``weight.float() * scale``; input scales are ignored (they only
serve fp8 matmuls).

The expert's key conversion is diffusers' own
(``convert_wan_transformer_to_diffusers``, applied to names only, so a file
is never read whole). Diffusers' VAE converter hard-codes the real VAE's
2 residual blocks per stage; the table here (:func:`vae_names`) walks the
flat original lists, gives the same names for the real VAE (a test holds
it to diffusers' converter) and also serves smaller VAEs (the tiny model).

Configs are inferred from tensor shapes (blocks, widths, channels, patch);
the one thing shapes cannot tell -- attention heads -- follows ComfyUI's
rule (head size 128, as every Wan model) unless the file's metadata has
``num_heads`` (files written by :func:`write_original` do).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

#: prefixes ComfyUI checkpoints put before the original names
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.")
#: tensors that carry quantization data, never model weights
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
MARKERS = ("scaled_fp8", "spiece_model")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
#: keys that say which component a file holds (after the prefix is removed)
SIGNATURES = {
    "expert": ("patch_embedding.weight", "head.modulation"),
    "vae": ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight"),
    "text_encoder": ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"),
}
DIFFUSERS_SIGNATURES = {
    "expert": "blocks.0.attn1.to_q.weight",
    "vae": "decoder.up_blocks.0.resnets.0.conv1.weight",
}
COMPONENT_NAMES = {"expert": "a Wan transformer (expert)", "vae": "a Wan VAE", "text_encoder": "a UMT5 text encoder"}


class FormatError(ValueError):
    """A file that is not the component it should be, or in a layout we cannot read."""


# ---------------------------------------------------------------- reading one file


class OriginalFile:
    """One original-layout safetensors file: its names (prefix removed),
    shapes, metadata and quantization scales; tensors read on demand, each
    dequantized to a float dtype in memory of its own (no file mapping kept)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as fh:
            raw = list(fh.keys())
            self.metadata = dict(fh.metadata() or {})
            self.shapes = {}
            self.dtypes = {}
            for key in raw:
                part = fh.get_slice(key)
                self.shapes[key] = tuple(part.get_shape())
                self.dtypes[key] = part.get_dtype()
        self.raw_name = {_strip(k): k for k in raw}
        self.scaled = any(_strip(k) == "scaled_fp8" for k in raw)
        #: weight name -> name of its scale tensor
        self.scales = {}
        for name in self.raw_name:
            for suffix in (".scale_weight", ".weight_scale"):
                if name.endswith(suffix) and name != suffix[1:]:
                    self.scales[name[: -len(suffix)] + ".weight"] = name
        self.names = [n for n in self.raw_name if n not in MARKERS and not n.endswith(SCALE_SUFFIXES)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.raw_name[name]]

    def kind(self) -> str | None:
        """"expert" | "vae" | "text_encoder", or None."""
        names = set(self.names)
        for kind, keys in SIGNATURES.items():
            if all(k in names for k in keys):
                return kind
        return None

    def diffusers_kind(self) -> str | None:
        """The component, when the file is in Diffusers layout instead."""
        names = set(self.names)
        return next((kind for kind, key in DIFFUSERS_SIGNATURES.items() if key in names), None)

    @property
    def storage(self) -> str:
        """How the weights are stored: "fp8_scaled", "fp8", or the float dtype (e.g. "BF16")."""
        fp8 = [self.dtypes[self.raw_name[n]] for n in self.names if self.dtypes[self.raw_name[n]].startswith("F8")]
        if fp8:
            return "fp8_scaled" if self.scales else "fp8"
        counts: dict[str, int] = {}
        for n in self.names:
            counts[self.dtypes[self.raw_name[n]]] = counts.get(self.dtypes[self.raw_name[n]], 0) + 1
        return max(counts, key=counts.get) if counts else "empty"

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """``{original name: tensor}``; fp8 tensors come back as fp32 with
        their scale applied."""
        from safetensors import safe_open

        out = {}
        with safe_open(str(self.path), framework="pt") as fh:
            for name in names:
                tensor = fh.get_tensor(self.raw_name[name])
                if tensor.dtype in FP8:
                    tensor = tensor.to(torch.float32)
                    if name in self.scales:
                        tensor = tensor * _scale_like(fh.get_tensor(self.raw_name[self.scales[name]]), tensor)
                out[name] = tensor.clone()  # never a view of the file mapping
        return out


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _scale_like(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale, or one per output row, shaped to broadcast."""
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:
        return scale.reshape(-1, *([1] * (weight.dim() - 1)))
    raise FormatError(f"a scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(weight.shape)}")


# ---------------------------------------------------------------- the expert


def expert_names(names: Iterable[str]) -> dict[str, str]:
    """``{diffusers name: original name}`` by diffusers' own converter, run on
    the names only (values are the names themselves, never tensors)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    names = list(names)
    converted = convert_wan_transformer_to_diffusers({n: n for n in names})
    return {new: old for new, old in converted.items()}


#: diffusers -> original, the inverse of diffusers' converter for the names Wan 2.x uses
_EXPERT_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
    (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # the cross-attention norm (the one with weights): norm3 in the original
    (".scale_shift_table", ".modulation"),
)


def expert_to_original(name: str) -> str:
    """One Diffusers expert name in the original layout."""
    if name == "scale_shift_table":
        return "head.modulation"
    if name.startswith("proj_out."):
        return "head.head." + name[len("proj_out."):]
    for new, old in _EXPERT_TO_ORIGINAL:
        name = name.replace(new, old)
    return name


def expert_config(file: OriginalFile) -> dict:
    """A ``WanTransformer3DModel`` config from the file's shapes."""
    dim, in_channels, *patch = file.shape("patch_embedding.weight")
    blocks = {int(m.group(1)) for n in file.names if (m := re.match(r"blocks\.(\d+)\.", n))}
    heads = int(file.metadata.get("num_heads", 0)) or dim // 128
    if dim % heads:
        raise FormatError(f"width {dim} does not split into {heads} attention heads")
    names = set(file.names)
    config = dict(
        patch_size=tuple(patch),
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=in_channels,
        out_channels=file.shape("head.head.weight")[0] // (patch[0] * patch[1] * patch[2]),
        text_dim=file.shape("text_embedding.0.weight")[1],
        freq_dim=file.shape("time_embedding.0.weight")[1],
        ffn_dim=file.shape("blocks.0.ffn.0.weight")[0],
        num_layers=max(blocks) + 1,
        cross_attn_norm="blocks.0.norm3.weight" in names,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in names else None,
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    if "img_emb.proj.0.weight" in names:
        config.update(image_dim=file.shape("img_emb.proj.0.weight")[0], added_kv_proj_dim=dim)
    return config


# ---------------------------------------------------------------- the VAE

_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_VAE_FIXED = {"encoder.conv1": "encoder.conv_in", "decoder.conv1": "decoder.conv_in", "encoder.head.0": "encoder.norm_out",
              "decoder.head.0": "decoder.norm_out", "encoder.head.2": "encoder.conv_out", "decoder.head.2": "decoder.conv_out",
              "conv1": "quant_conv", "conv2": "post_quant_conv"}


def _residual(rest: str) -> str:
    return _RESIDUAL.get(rest, rest)


def vae_names(names: Iterable[str]) -> dict[str, str]:
    """``{diffusers name: original name}`` for the Wan 2.1 VAE layout, any
    number of residual blocks per stage (see the module docstring)."""
    names = list(names)
    ups = _decoder_plan(names)
    out = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if module in _VAE_FIXED:
            out[f"{_VAE_FIXED[module]}.{leaf}"] = name
        elif m := re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.+)", name):
            part, rest = _MIDDLE[m.group(2)], m.group(3)
            out[f"{m.group(1)}.mid_block.{part}.{_residual(rest) if part.startswith('resnets') else rest}"] = name
        elif m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", name):
            out[f"encoder.down_blocks.{m.group(1)}.{_residual(m.group(2))}"] = name
        elif m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", name):
            out[f"{ups[int(m.group(1))]}.{_residual(m.group(2))}"] = name
        else:
            out[name] = name
    return out


def _decoder_plan(names: list[str]) -> dict[int, str]:
    """Flat ``decoder.upsamples.{i}`` -> ``decoder.up_blocks.{b}.resnets.{j}``
    or ``...upsamplers.0``: residual blocks fill an up block until a resample
    closes it."""
    kinds: dict[int, str] = {}
    for name in names:
        if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(\w+)\..+", name):
            kinds[int(m.group(1))] = "resample" if m.group(2) in ("resample", "time_conv") else "resnet"
    plan, block, resnet = {}, 0, 0
    for i in sorted(kinds):
        if kinds[i] == "resnet":
            plan[i], resnet = f"decoder.up_blocks.{block}.resnets.{resnet}", resnet + 1
        else:
            plan[i], block, resnet = f"decoder.up_blocks.{block}.upsamplers.0", block + 1, 0
    return plan


def vae_to_original(names: Iterable[str]) -> dict[str, str]:
    """``{diffusers name: original name}`` for a Diffusers VAE's names."""
    names = list(names)
    fixed = {v: k for k, v in _VAE_FIXED.items()}
    residual = {v: k for k, v in _RESIDUAL.items()}
    middle = {v: k for k, v in _MIDDLE.items()}
    counts: dict[int, tuple[int, int]] = {}  # up block -> (resnets, has upsampler)
    for name in names:
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers)\.", name):
            r, u = counts.get(int(m.group(1)), (0, 0))
            counts[int(m.group(1))] = (max(r, int(m.group(3)) + 1), u) if m.group(3) else (r, 1)
    start, flat = {}, 0
    for b in sorted(counts):
        start[b], flat = flat, flat + counts[b][0] + counts[b][1]
    out = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if module in fixed:
            out[name] = f"{fixed[module]}.{leaf}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.\d|attentions\.0)\.(.+)", name):
            rest = residual.get(m.group(3), m.group(3)) if m.group(2).startswith("resnets") else m.group(3)
            out[name] = f"{m.group(1)}.middle.{middle[m.group(2)]}.{rest}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", name):
            out[name] = f"encoder.downsamples.{m.group(1)}.{residual.get(m.group(2), m.group(2))}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            out[name] = f"decoder.upsamples.{start[int(m.group(1))] + int(m.group(2))}.{residual.get(m.group(3), m.group(3))}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
            b = int(m.group(1))
            out[name] = f"decoder.upsamples.{start[b] + counts[b][0]}.{m.group(2)}"
        else:
            out[name] = name
    return out


def vae_config(file: OriginalFile) -> dict:
    """An ``AutoencoderKLWan`` config (Wan 2.1 VAE family) from the file's shapes."""
    names = set(file.names)
    base = file.shape("encoder.conv1.weight")[0]
    z_dim = file.shape("conv2.weight")[0]
    items = sorted({int(m.group(1)) for n in names if (m := re.match(r"encoder\.downsamples\.(\d+)\.", n))})
    stages, temporal, count = [[]], [], 0
    for i in items:
        if f"encoder.downsamples.{i}.residual.6.weight" in names:
            stages[-1].append(file.shape(f"encoder.downsamples.{i}.residual.6.weight")[0])
        elif f"encoder.downsamples.{i}.resample.1.weight" in names:
            temporal.append(f"encoder.downsamples.{i}.time_conv.weight" in names)
            stages.append([])
        else:
            raise FormatError(f"encoder.downsamples.{i} is neither a residual block nor a resample (attention in the "
                              "encoder stages is not a Wan 2.1 VAE)")
    if any(len(s) != len(stages[0]) or not s for s in stages):
        raise FormatError("the encoder stages have different numbers of residual blocks")
    return dict(base_dim=base, z_dim=z_dim, dim_mult=[s[-1] // base for s in stages], num_res_blocks=len(stages[0]),
                attn_scales=[], temperal_downsample=temporal)


# ---------------------------------------------------------------- the text encoder


def text_encoder_names(names: Iterable[str]) -> dict[str, str]:
    """``{transformers name: file name}``: the same names; the tied token
    embedding answers to both ``shared`` and ``encoder.embed_tokens``."""
    names = list(names)
    out = {n: n for n in names}
    embedding = next((n for n in ("shared.weight", "encoder.embed_tokens.weight") if n in out), None)
    if embedding:
        out["shared.weight"] = out["encoder.embed_tokens.weight"] = embedding
    return out


def text_encoder_config(file: OriginalFile) -> dict:
    """A ``UMT5Config`` (encoder) from the file's shapes."""
    names = set(file.names)
    embedding = "shared.weight" if "shared.weight" in names else "encoder.embed_tokens.weight"
    vocab, d_model = file.shape(embedding)
    buckets, heads = file.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in names
    ff = "wi_0" if gated else "wi"
    layers = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.block\.(\d+)\.", n))}
    return dict(vocab_size=vocab, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
                d_kv=file.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
                d_ff=file.shape(f"encoder.block.0.layer.1.DenseReluDense.{ff}.weight")[0], num_layers=max(layers) + 1,
                feed_forward_proj="gated-gelu" if gated else "relu", pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


# ---------------------------------------------------------------- one entry point per component

NAMES = {"expert": expert_names, "vae": vae_names, "text_encoder": text_encoder_names}
CONFIGS = {"expert": expert_config, "vae": vae_config, "text_encoder": text_encoder_config}


def open_component(path: str | Path, kind: str) -> tuple[OriginalFile, dict[str, str], dict]:
    """The file, its ``{diffusers name: original name}`` map and its config;
    FormatError (one line) when the file is not ``kind`` in the original layout."""
    file = OriginalFile(path)
    found = file.kind()
    if found != kind:
        diffusers = file.diffusers_kind()
        if diffusers:
            raise FormatError(f"is {COMPONENT_NAMES[diffusers]} in Diffusers layout, not a single file in the original "
                              "layout (point name_or_path at its Diffusers folder instead)")
        what = COMPONENT_NAMES[found] if found else "none of the Wan components (no key like " + SIGNATURES[kind][0] + ")"
        raise FormatError(f"is {what}, not {COMPONENT_NAMES[kind]}")
    try:
        return file, NAMES[kind](file.names), CONFIGS[kind](file)
    except KeyError as exc:
        raise FormatError(f"lacks {exc.args[0]} ({COMPONENT_NAMES[kind]} in the original layout has it)") from None


# ---------------------------------------------------------------- writing (tests, tools)


def to_original(kind: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Diffusers-named state dict in the original names."""
    if kind == "expert":
        return {expert_to_original(k): v for k, v in state.items()}
    if kind == "vae":
        names = vae_to_original(state)
        return {names[k]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def quantize_fp8(state: Mapping[str, torch.Tensor], scaled: bool) -> dict[str, torch.Tensor]:
    """fp8 (e4m3fn) the way ComfyUI's files are: every 2-D weight of a linear
    layer (``*.weight``, not embeddings) in fp8; ``scaled``: with a
    per-tensor ``scale_weight`` (absmax / 448) and the ``scaled_fp8`` marker."""
    out = {}
    for name, value in state.items():
        if value.dim() == 2 and name.endswith(".weight") and "relative_attention_bias" not in name \
                and not name.startswith(("shared.", "encoder.embed_tokens.")):
            value = value.to(torch.float32)
            if scaled:
                scale = (value.abs().max() / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
                out[name[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
                value = value / scale
            out[name] = value.to(torch.float8_e4m3fn)
        else:
            out[name] = value
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_original(kind: str, state: Mapping[str, torch.Tensor], path: str | Path, *, storage: str = "bf16",
                   prefix: str = "", metadata: Mapping[str, str] | None = None) -> Path:
    """Write one component in the original layout. ``storage``: "fp32",
    "fp16", "bf16", "fp8" or "fp8_scaled" (linear weights in fp8, the rest
    in bf16). ``prefix``: e.g. ``"model.diffusion_model."`` as some
    ComfyUI files have."""
    from safetensors.torch import save_file

    float_dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(storage, torch.bfloat16)
    original = {k: v.detach().to(float_dtype).contiguous() for k, v in to_original(kind, state).items()}
    if storage.startswith("fp8"):
        original = quantize_fp8(original, scaled=storage == "fp8_scaled")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in original.items()}, str(path), metadata=dict(metadata or {}))
    return path


def write_tiny_original(diffusers_folder: str | Path, out: str | Path, storage: str = "bf16") -> dict[str, Path]:
    """Every component of a Diffusers Wan folder (e.g. the tiny model) as
    original single files in ``out``: ``high_noise.safetensors``,
    ``low_noise.safetensors`` (or ``full.safetensors``), ``vae.safetensors``
    (not for the Wan 2.2 VAE), ``text_encoder.safetensors``. Loads each
    component whole: for small models."""
    from safetensors.torch import load_file

    folder, out = Path(diffusers_folder), Path(out)
    parts = {"high_noise": "transformer", "low_noise": "transformer_2", "vae": "vae", "text_encoder": "text_encoder"}
    if not (folder / "transformer_2").is_dir():
        parts = {"full": "transformer", "vae": "vae", "text_encoder": "text_encoder"}
    if json.loads((folder / "vae" / "config.json").read_text()).get("is_residual"):
        parts.pop("vae")  # the Wan 2.2 VAE (TI2V-5B) has no original-layout table here yet
    written = {}
    for name, sub in parts.items():
        state = {}
        for file in sorted((folder / sub).glob("*.safetensors")):
            state.update(load_file(str(file)))
        kind = "expert" if sub.startswith("transformer") else sub
        meta = {}
        if kind == "expert":
            meta["num_heads"] = str(json.loads((folder / sub / "config.json").read_text())["num_attention_heads"])
        # the VAE stays in full precision (as ComfyUI ships it: fp32/bf16, never fp8)
        written[name] = write_original(kind, state, out / f"{name}.safetensors",
                                       storage="fp32" if kind == "vae" and storage.startswith("fp8") else storage,
                                       metadata=meta)
    return written
