"""``wantrain estimate``: peak GPU memory and host RAM of a run, from the
model's config alone (no weights are read; the transformer is instantiated on
the ``meta`` device to count its layers).

The model and every assumption are written up in ``docs/memory.md``. In short:

- weights: each transformer linear layer at its quantized size (qint4 = 4 bits
  + a bf16 scale and shift per group of 128 = 0.53 bytes per weight; qint8 and
  qfloat8 1 byte + a per-row scale), everything else in the model dtype (fp32
  for the modules diffusers keeps in fp32);
- ARA: rank x (in + out) per quantized linear, in the model dtype;
- LoRA: rank x (in + out) per targeted linear, fp32 weights + fp32 gradients +
  the optimizer's state (AdamW 8 bytes, 8-bit AdamW 2, Adafactor ~0);
- activations per video token and block, counted from the operations of
  diffusers' ``WanTransformerBlock`` and what autograd saves for each (see the
  docs), with and without gradient checkpointing;
- phases: start (text encoder loads on the host in the model dtype, is quantized there, then moves),
  caching (text encoder and VAE working), training; the peak is the largest.

Every ``[model] arch`` has its shipped configs (a hub id needs no download):
the arch decides the experts (two, or the TI2V-5B's one), the VAE's
compression (tokens per frame) and its size, and whether timesteps are per
token (the TI2V-5B's ``expand_timesteps``: per-token modulation tensors).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import attrs

from .. import archs, model
from ..errors import ProfileProblem, WantrainError

GiB = 2**30

#: ``transformer/config.json`` of Wan 2.2 T2V A14B (both experts share it)
A14B_TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
#: Wan 2.2 I2V A14B: the same, with 36 input channels (16 noisy + 4 mask + 16 condition)
I2V_A14B_TRANSFORMER = {**A14B_TRANSFORMER, "in_channels": 36}
#: Wan 2.2 TI2V-5B: one transformer, 24 heads x 128 = 3072, 30 blocks, 48 channels (the Wan 2.2 VAE's)
TI2V_5B_TRANSFORMER = {**A14B_TRANSFORMER, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                       "in_channels": 48, "out_channels": 48}
#: ``transformer/config.json`` of each arch's Diffusers model (scripts/convert_wan_to_diffusers.py)
TRANSFORMERS = {"wan22_t2v_a14b": A14B_TRANSFORMER, "wan22_i2v_a14b": I2V_A14B_TRANSFORMER,
                "wan22_ti2v_5b": TI2V_5B_TRANSFORMER}
#: UMT5-XXL encoder (``text_encoder/config.json`` of the same model)
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240,
            "num_layers": 24, "relative_attention_num_buckets": 32}
WAN_VAE_PARAMS = 126_892_531  # AutoencoderKLWan (Wan 2.1 VAE), kept in fp32
#: the Wan 2.2 VAE of the TI2V-5B (z_dim 48, base_dim 160, decoder_base_dim 256, residual): 2.6 GiB in fp32
WAN22_VAE_PARAMS = 704_688_668
VAE_PARAMS = {"wan22_t2v_a14b": WAN_VAE_PARAMS, "wan22_i2v_a14b": WAN_VAE_PARAMS, "wan22_ti2v_5b": WAN22_VAE_PARAMS}

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: optimizer state per fp32 LoRA weight, bytes (prodigy: two moments + s + p0; came: one moment + factored rows;
#: schedule-free AdamW: z + the second moment); a "module:Class" optimizer is counted as AdamW
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0, "prodigy": 16, "came": 4, "adamw_schedulefree": 8}
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, cuBLAS workspace, allocator slack
HOST_BASELINE_GIB = 3.0  # Python, torch, CUDA libraries
VAE_BYTES_PER_PIXEL = 10_000  # VAE encode working set per pixel of a frame (4-frame chunks)


@attrs.frozen(kw_only=True)
class Settings:
    """Everything about a run that changes its memory, in the estimate's own
    words. The kernel fills in its sections (:func:`kernel_settings`);
    plugins change the rest through the ``estimate_memory`` event."""

    dtype: str = "bf16"
    #: ``[model] arch`` (the report's model line; the fields below follow from it)
    arch: str = archs.DEFAULT
    #: VAE compression: pixels per latent, frames per latent (TI2V-5B: 16, 4)
    vae_spatial: int = 8
    vae_temporal: int = 4
    #: timesteps per token (TI2V-5B's expand_timesteps): each block makes fp32 modulation tensors per token
    per_token_timesteps: bool = False
    #: bytes per weight of the quantized transformer linears (None: not quantized)
    weight_bytes: float | None = None
    #: how the transformer weights are stored, for the report ("qint4+ara"; None: the model dtype)
    weight_format: str | None = None
    #: fnmatch patterns of transformer layers kept in the model dtype when quantized
    quantize_exclude: tuple[str, ...] = ()
    #: rank of a frozen recovery adapter beside each quantized linear (0: none)
    ara_rank: int = 0
    #: bytes per weight of the text encoder's linears (None: the model dtype)
    text_encoder_bytes: float | None = None
    text_encoder_format: str | None = None
    rank: int = 16
    modules: tuple[str, ...] = ()
    optimizer: str = "adamw"
    batch_size: int = 1
    frames: int = 33
    height: int = 512
    width: int = 512
    text_tokens: int = 512
    checkpointing: bool = True
    #: the expert that is not training waits in host RAM
    idle_expert_on_host: bool = False
    #: share of the transformer blocks whose weights stream in from the host
    streamed_layers: float = 0.0
    #: text states are computed before training (the encoder is off the GPU while training)
    text_states_cached: bool = False
    #: ... and the encoder is dropped from host RAM too
    text_encoder_unloaded: bool = False
    #: latents are computed before training (the VAE is off the GPU while training)
    latents_cached: bool = False
    experts: int = 2
    #: experts with a LoRA and optimizer state
    experts_trained: int = 2
    #: the experts that are not trained are loaded too (previews need every expert)
    loads_untrained_experts: bool = False
    #: ``[distributed] strategy = "fsdp"``: each expert's frozen weights split over this many processes
    shards: int = 1
    #: forward graphs kept for one backward besides the main one (a second
    #: forward with gradients on other inputs, e.g. a preservation prompt)
    extra_forward_graphs: int = 0

    @property
    def experts_loaded(self) -> int:
        return self.experts if self.loads_untrained_experts else min(self.experts, self.experts_trained)

    @property
    def weights_label(self) -> str:
        return self.weight_format or self.dtype

    @property
    def text_encoder_label(self) -> str:
        return self.text_encoder_format or self.dtype


@attrs.frozen
class Remedy:
    """One change that lowers the peak, offered when a run does not fit.

    ``order`` sorts the remedies of every plugin into one list (cheapest
    first: the kernel's checkpointing is 0, caches 10-20, quantization 30,
    offloading 40-50); ``changes`` are :class:`Settings` fields. A ``quiet``
    remedy is printed only when it makes the run fit or is the last of its
    ``order`` (a ladder of ever stronger settings shows only the rung that
    suffices)."""

    order: int
    text: str
    changes: Mapping[str, Any]
    quiet: bool = False


def kernel_settings(profile) -> Settings:
    """The kernel sections' share of :class:`Settings`."""
    from ..profile import LORA_MODULES

    res = max((max(d.resolutions) for d in profile.datasets), default=512)
    frames = max((d.num_frames for d in profile.datasets), default=33)
    arch = archs.get(profile.model.arch)
    return Settings(
        dtype=profile.model.dtype,
        arch=arch.name, vae_spatial=arch.vae_spatial, vae_temporal=arch.vae_temporal,
        per_token_timesteps=arch.start_frame == "tokens",
        experts=len(arch.experts), experts_trained=len(arch.experts),
        rank=profile.target.rank,
        modules=tuple(profile.target.modules or LORA_MODULES),
        optimizer=profile.training.optimizer,
        batch_size=profile.training.batch_size,
        frames=frames, height=res, width=res,
        text_tokens=profile.model.max_sequence_length,
        checkpointing=profile.model.gradient_checkpointing,
    )


# ---------------------------------------------------------------- counting


@attrs.frozen
class Counts:
    """Parameter counts of one expert."""

    dim: int
    ffn: int
    blocks: int
    patch: int
    quantized: int        # weights of quantized linears
    quantized_io: int     # sum of (in + out) over quantized linears (ARA size / rank)
    other: int            # every other parameter, model dtype
    fp32: int             # parameters diffusers keeps in fp32
    lora_io: int          # sum of (in + out) over LoRA targets
    block_fraction: float  # share of the weights inside the blocks


def count_transformer(config: Mapping[str, Any], quantized: bool, exclude, modules) -> Counts:
    """Count on the meta device; nothing is allocated. ``quantized``: the
    linear layers not matched by ``exclude`` are counted as quantized."""
    import torch

    from ..lora import target_regex

    module = model.build_empty(config)
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    targets = re.compile(target_regex(modules)) if modules else None
    qn = qio = other = fp32 = lio = in_blocks = 0
    for name, sub in module.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            n = p.numel()
            in_blocks += n if full.startswith("blocks.") else 0
            if type(sub) is torch.nn.Linear and pname == "weight" and quantized and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
                qn += n
                qio += sub.in_features + sub.out_features
            elif any(k in full.split(".") for k in keep):
                fp32 += n
            else:
                other += n
        if targets is not None and type(sub) is torch.nn.Linear and targets.fullmatch(name):
            lio += sub.in_features + sub.out_features
    total = qn + other + fp32
    cfg = dict(config)
    return Counts(
        dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], ffn=cfg["ffn_dim"], blocks=cfg["num_layers"],
        patch=math.prod(cfg["patch_size"]), quantized=qn, quantized_io=qio, other=other, fp32=fp32,
        lora_io=lio, block_fraction=in_blocks / total,
    )


def umt5_params(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(embedding params, linear params) of a UMT5 encoder (gated-GELU FFN)."""
    d, inner, ff, layers = cfg["d_model"], cfg["d_kv"] * cfg["num_heads"], cfg["d_ff"], cfg["num_layers"]
    embed = cfg["vocab_size"] * d
    linear = layers * (4 * d * inner + 3 * d * ff)
    small = layers * (2 * d + cfg["relative_attention_num_buckets"] * cfg["num_heads"]) + d
    return embed + small, linear


# ---------------------------------------------------------------- activations


def block_activation_bytes(s: Settings, dim: int, ffn: int) -> tuple[float, float]:
    """(bytes per video token, bytes per text token) autograd keeps for one
    ``WanTransformerBlock``: the distinct storages it saves, as measured by
    ``benchmarks/activation_memory.py`` (docs/memory.md has the op-by-op count).
    The LoRA computes in the model dtype (:mod:`wantrain.adapters.compute`): no
    fp32 copies of its inputs."""
    a = DTYPE_BYTES[s.dtype]
    # fp32 per token: log-sum-exp per head (head_dim 128), rope cos and sin (head_dim wide), norm statistics
    lse, rope, stats = 4 * dim // 128, 2 * 128 * 4, 3 * 2 * 4 + 3 * 4  # three LayerNorms' mean/rstd, RMSNorms' rstd
    on_text = {"attn2.to_k", "attn2.to_v"} & set(s.modules)  # each target keeps its rank-wide lora_A output
    lora, lora_text = a * s.rank * (len(set(s.modules)) - len(on_text)), a * s.rank * len(on_text)
    # norm1 fp32 input, its modulated output (q/k/v input), fp32 q and k RMSNorm inputs, sdpa's q k v out (to_out's input)
    self_attn = 4 * dim + a * dim + 2 * 4 * dim + 4 * a * dim + lse + rope
    cross = 4 * dim + a * dim + 4 * dim + 2 * a * dim + lse  # norm2, to_q input, fp32 norm_q input, sdpa q and out
    ffn_part = 4 * dim + a * dim + 2 * a * ffn  # norm3, proj input, gelu input, ffn.net.2 input
    text = a * dim + 4 * dim + 2 * a * dim  # to_k/to_v input, fp32 norm_k input (+ rstd), sdpa k and v
    # per-token timesteps: the fp32 sum of scale_shift_table and the token's 6 x dim
    # modulation (kept whole by the gate views), and the two fp32 (1 + scale) tensors
    modulation = (6 + 2) * 4 * dim if s.per_token_timesteps else 0
    return self_attn + cross + ffn_part + modulation + lora + stats, text + lora_text + 4


def video_tokens(s: Settings, patch: int) -> int:
    latent_frames = (s.frames - 1) // s.vae_temporal + 1
    return s.batch_size * latent_frames * (s.height // s.vae_spatial) * (s.width // s.vae_spatial) // patch


def activation_bytes(s: Settings, c: Counts) -> float:
    a = DTYPE_BYTES[s.dtype]
    tokens = video_tokens(s, c.patch)
    text = s.batch_size * s.text_tokens
    per_token, per_text = block_activation_bytes(s, c.dim, c.ffn)
    outside = tokens * 8 * c.dim
    if s.per_token_timesteps:  # every block's input: the 6 x dim projection and temb per token, the output norm's
        outside += tokens * ((6 + 1) * a + 12) * c.dim
    workspace = tokens * (16 * c.dim + 4 * c.ffn)  # gradients of the op being differentiated
    graphs = 1 + s.extra_forward_graphs  # each graph keeps its own saved tensors until the one backward
    if s.checkpointing:
        kept = c.blocks * tokens * a * c.dim  # each block's input
        return graphs * (kept + outside) + tokens * per_token + text * per_text + workspace  # one block recomputes at a time
    return graphs * (c.blocks * (tokens * per_token + text * per_text) + outside) + workspace


# ---------------------------------------------------------------- the estimate


@attrs.frozen
class Estimate:
    rows: list[tuple[str, float, float, str]]  # (item, GPU GiB, host GiB, note)
    gpu_peak: float
    host_peak: float
    phase: str
    tokens: int
    vram: float | None
    suggestions: list[str] = attrs.Factory(list)

    @property
    def fits(self) -> bool | None:
        return None if self.vram is None else self.gpu_peak <= self.vram

    def table(self) -> str:
        lines = [f"{'item':<44} {'GPU GiB':>8} {'host GiB':>9}  note"]
        for item, gpu, host, note in self.rows:
            lines.append(f"{item:<44} {gpu:>8.2f} {host:>9.2f}  {note}")
        lines.append(f"{'peak (' + self.phase + ')':<44} {self.gpu_peak:>8.2f} {self.host_peak:>9.2f}")
        return "\n".join(lines)


def expert_weight_bytes(s: Settings, c: Counts) -> float:
    a = DTYPE_BYTES[s.dtype]
    per = (s.weight_bytes or a) * c.quantized + a * c.other + 4 * c.fp32
    return per


def expert_bytes(s: Settings, c: Counts) -> tuple[float, float, float]:
    """One expert's (weights, ARA, fp32 LoRA) bytes: what the estimate's rows are built from
    (``benchmarks/real_scale_cpu.py`` holds them against a loaded expert)."""
    ara = DTYPE_BYTES[s.dtype] * s.ara_rank * c.quantized_io if s.weight_bytes is not None else 0.0
    return expert_weight_bytes(s, c), ara, 4 * s.rank * c.lora_io


def estimate(s: Settings, transformer_config: Mapping[str, Any], text_config: Mapping[str, Any] = UMT5_XXL,
             vae_params: int = WAN_VAE_PARAMS, vram_gb: float | None = None,
             remedies: Iterable[Remedy] | None = None) -> Estimate:
    """The estimate of ``s``; with ``remedies`` and a card that is too small,
    the suggestions that make it fit."""
    c = count_transformer(transformer_config, s.weight_bytes is not None, s.quantize_exclude, s.modules)
    a = DTYPE_BYTES[s.dtype]
    expert, ara, lora = expert_bytes(s, c)
    opt = OPTIMIZER_BYTES.get(s.optimizer, OPTIMIZER_BYTES["adamw"]) / 4 * lora
    embed, linear = umt5_params(text_config)
    te_full = a * (embed + linear)
    te_q = a * embed + (s.text_encoder_bytes or a) * linear
    vae = 4 * vae_params
    vae_work = VAE_BYTES_PER_PIXEL * s.height * s.width * s.batch_size
    acts = activation_bytes(s, c)
    loaded = s.experts_loaded
    on_gpu_experts = 1 if s.idle_expert_on_host else loaded
    streamed = round(s.streamed_layers * c.blocks) / c.blocks if c.blocks else 0.0
    stream_keep = (1 - streamed * c.block_fraction) if streamed else 1.0
    stream_buffer = (2 / c.blocks) * c.block_fraction * (expert + ara) if streamed else 0.0
    gathered = 2 * c.block_fraction * (expert + ara) / c.blocks if s.shards > 1 else 0.0  # fsdp: a block + the next, whole
    w_gpu = on_gpu_experts * (expert + ara) * stream_keep / s.shards + stream_buffer + gathered
    lora_gpu = min(on_gpu_experts, s.experts_trained) * (lora + opt) + lora  # + gradients of the active expert
    te_train = 0.0 if s.text_states_cached else te_q
    vae_train = 0.0 if s.latents_cached else vae
    ctx = CUDA_OVERHEAD_GIB * GiB
    start = te_q + vae + ctx  # the encoder is quantized on the host, then moved
    cache_experts = 0.0 if s.idle_expert_on_host else loaded * (expert + ara) * stream_keep / s.shards
    caching = (te_q + vae + vae_work + cache_experts + ctx) if (s.text_states_cached or s.latents_cached) else 0.0
    train_step = w_gpu + lora_gpu + te_train + vae_train + ctx + max(acts, 0.0 if s.latents_cached else vae_work)
    phases = {"start": start, "caching": caching, "training": train_step}
    phase = max(phases, key=phases.get)
    # host RAM
    host_experts = (loaded * (expert + ara)) if s.idle_expert_on_host else (loaded * (expert + ara) * streamed * c.block_fraction)
    host_lora = max(0, s.experts_trained - 1) * (lora + opt) if s.idle_expert_on_host else 0.0
    host_te = te_q if (s.text_states_cached and not s.text_encoder_unloaded) else 0.0
    load_block = (c.block_fraction * (a * (c.quantized + c.other) + 4 * c.fp32)) / c.blocks
    load_peak = expert + ara + (load_block if s.weight_bytes is not None else 0.0)
    host_base = HOST_BASELINE_GIB * GiB
    host_steady = host_base + host_experts + host_lora + host_te
    parked_before = (loaded - 1) * (expert + ara) if s.idle_expert_on_host else 0.0  # loaded earlier, parked
    host_loading = host_base + parked_before + load_peak
    host_peak = max(host_base + te_full, host_loading, host_steady)
    G = lambda x: x / GiB  # noqa: E731
    tokens = video_tokens(s, c.patch)
    rows = [
        (f"transformer weights x{on_gpu_experts} ({s.weights_label}{f', 1/{s.shards} per process' if s.shards > 1 else ''})",
         G(on_gpu_experts * expert * stream_keep / s.shards),
         G(loaded * expert if s.idle_expert_on_host else host_experts), f"{G(expert):.2f} GiB per expert"),
        ("ARA (rank %d)" % s.ara_rank if ara else "ARA", G(on_gpu_experts * ara * stream_keep), 0.0, "" if ara else "none"),
        ("streamed-block buffers", G(stream_buffer), 0.0, f"{round(streamed * c.blocks)} of {c.blocks} blocks streamed" if streamed else "layers = 0"),
        (f"LoRA rank {s.rank} + grads + {s.optimizer} state", G(lora_gpu), G(host_lora), f"{G(lora):.2f} GiB of fp32 LoRA per expert"),
        (f"activations ({tokens} tokens, {'checkpointing' if s.checkpointing else 'no checkpointing'})", G(acts), 0.0,
         f"{G(block_activation_bytes(s, c.dim, c.ffn)[0] * tokens):.2f} GiB per block"),
        (f"text encoder ({s.text_encoder_label})", G(te_train), G(host_te),
         "cached, off the GPU" if s.text_states_cached else "stays on the GPU"),
        ("VAE (fp32) + encode work", G(vae_train + (0 if s.latents_cached else vae_work)), 0.0,
         "latents cached, off the GPU" if s.latents_cached else "encodes every step"),
        ("CUDA context + allocator slack", CUDA_OVERHEAD_GIB, 0.0, ""),
        ("start: text encoder (quantized on the host) + VAE", G(start), G(host_base + te_full), "transient"),
        ("host: process + expert loading", 0.0, G(host_loading), "quantized so far + one layer" if s.weight_bytes is not None else "bf16 expert"),
    ]
    if gathered:
        rows.insert(3, ("fsdp: blocks gathered whole", G(gathered), 0.0, f"sharded over {s.shards} processes"))
    if caching:
        rows.insert(-2, ("caching phase (text encoder + VAE working)", G(caching), 0.0, "before the first step"))
    est = Estimate(rows=rows, gpu_peak=G(phases[phase]), host_peak=G(host_peak), phase=phase, tokens=tokens, vram=vram_gb)
    if remedies is not None and vram_gb is not None and not est.fits:
        est = attrs.evolve(est, suggestions=suggestions(s, remedies, transformer_config, text_config, vae_params, vram_gb))
    return est


def suggestions(s: Settings, remedies: Iterable[Remedy], tcfg, text_cfg, vae_params, vram: float) -> list[str]:
    """The remedies, applied one after the other (in ``order``), until the
    estimate fits; the last line says what is left when none suffices."""
    out, cur = [], s
    ordered = sorted(remedies, key=lambda r: r.order)
    for i, remedy in enumerate(ordered):
        cur = attrs.evolve(cur, **remedy.changes)
        e = estimate(cur, tcfg, text_cfg, vae_params, vram)
        last_of_kind = i + 1 == len(ordered) or ordered[i + 1].order != remedy.order
        if not remedy.quiet or e.fits or last_of_kind:
            out.append(f"{remedy.text}  -> peak {e.gpu_peak:.1f} GiB")
        if e.fits:
            return out
    out.append("lower the resolution or num_frames of the datasets (activations grow with frames x height x width)")
    return out


def kernel_remedies(s: Settings) -> list[Remedy]:
    return [] if s.checkpointing else [Remedy(0, "[model] gradient_checkpointing = true", {"checkpointing": True})]


# ---------------------------------------------------------------- from a profile


def configs_for(name_or_path: str, arch: str = archs.DEFAULT) -> tuple[dict, dict, int, str]:
    """(transformer config, text encoder config, VAE params, where from). A
    local Diffusers folder is read; anything else is taken to be the Wan 2.2
    model of ``arch`` (``[model] arch``), whose configs ship here (no
    download, no weights)."""
    path = Path(name_or_path).expanduser()
    if not (path / "transformer" / "config.json").is_file():
        if path.exists() or _looks_local(name_or_path):  # never estimate another model than the one named
            what = "has no transformer/config.json" if path.exists() else "no such folder"
            raise WantrainError(ProfileProblem("model.name_or_path", what, name_or_path,
                                               "give a Diffusers model folder, or a hub id (org/name) for the built-in config"))
        return dict(TRANSFORMERS[arch]), dict(UMT5_XXL), VAE_PARAMS[arch], f"built-in {archs.get(arch).title} config"
    tcfg = json.loads((path / "transformer" / "config.json").read_text())
    text = json.loads((path / "text_encoder" / "config.json").read_text())
    text = {k: text.get(k, UMT5_XXL[k]) for k in UMT5_XXL}
    vae_params = _count_vae(path / "vae" / "config.json")
    return tcfg, text, vae_params, f"{path} (configs only)"


def _looks_local(name_or_path: str) -> bool:
    """A path, not a hub id (``org/name[@revision]``)."""
    return name_or_path.startswith((".", "/", "~", "\\")) or not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", name_or_path)


def _count_vae(config_path: Path) -> int:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    cfg = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    with init_empty_weights():
        vae = AutoencoderKLWan.from_config(cfg)
    return sum(p.numel() for p in vae.parameters())


def estimate_profile(profile, pm, vram_gb: float | None = None, nproc: int = 1) -> tuple[Estimate, Settings, list[str], str]:
    """(estimate, settings, one note per plugin that changed them, model origin).

    ``pm`` is the run's plugin manager: each enabled plugin states what it
    changes (``estimate_memory``); every available plugin may offer a remedy
    (``memory_remedies``, asked of the plugin catalogue)."""
    from .. import registry

    base = kernel_settings(profile)
    if nproc > 1 and profile.distributed.strategy == "fsdp":
        base = attrs.evolve(base, shards=nproc)
    changes: dict[str, Any] = {}
    notes = []
    for name, found in registry.call_each(pm, "estimate_memory", profile=profile, memory=base).items():
        found = dict(found or {})
        note = found.pop("note", None)
        if note:
            notes.append(f"{name}: {note}")
        changes.update(found)
    s = attrs.evolve(base, **changes)
    remedies = kernel_remedies(s)
    for found in registry.catalogue(profile).hook.memory_remedies(profile=profile, memory=s):
        remedies += list(found or [])
    tcfg, text, vae_params, origin = configs_for(profile.model.name_or_path, profile.model.arch)
    return estimate(s, tcfg, text, vae_params, vram_gb, remedies=remedies), s, notes, origin


def report(profile, pm, vram_gb: float | None = None, nproc: int = 1) -> str:
    """The estimate as printed; ``nproc``: processes of a torchrun job (per-process figures)."""
    est, s, notes, origin = estimate_profile(profile, pm, vram_gb, nproc)
    head = (f"model: {origin}\nrun: {s.frames} frames at {s.width}x{s.height}, batch {s.batch_size} -> {est.tokens} video tokens; "
            f"weights {s.weights_label}, text encoder {s.text_encoder_label}, checkpointing={str(s.checkpointing).lower()}")
    lines = [head, *notes, "", est.table(), ""]
    if vram_gb is None:
        lines.append(f"peak GPU memory ~{est.gpu_peak:.1f} GiB, host RAM ~{est.host_peak:.1f} GiB (pass --vram-gb N to check a card)")
    elif est.fits:
        lines.append(f"fits: ~{est.gpu_peak:.1f} GiB of {vram_gb:g} GiB ({vram_gb - est.gpu_peak:.1f} GiB to spare); host RAM ~{est.host_peak:.1f} GiB")
    else:
        lines.append(f"does not fit: ~{est.gpu_peak:.1f} GiB needed, {vram_gb:g} GiB available. Try, in this order:")
        lines += [f"  {i + 1}. {t}" for i, t in enumerate(est.suggestions)]
    lines.append("estimates are +-15%: see docs/memory.md for the model and its assumptions")
    return "\n".join(lines)
