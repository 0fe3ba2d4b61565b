"""Wan 2.2 components: loading (local Diffusers folder or hub id) and the
tiny random model used by tests and the CPU demo.

Layout (Diffusers): ``transformer`` = high-noise expert, ``transformer_2`` =
low-noise expert (A14B; the TI2V-5B has ``transformer`` only), ``vae``
(AutoencoderKLWan), ``text_encoder`` (UMT5), ``tokenizer``, ``scheduler``,
and ``boundary_ratio`` in ``model_index.json``. Which arch a folder holds is
data (:mod:`wantrain.archs`), checked by :func:`check_arch`.

diffusers, transformers and accelerate are imported inside the functions that
use them: they take seconds to import, and ``wantrain check`` loads no model.
"""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from . import archs
from .errors import ModelError, ProfileProblem

log = logging.getLogger("wantrain.model")

EXPERT_SUBFOLDERS = {"high_noise": "transformer", "low_noise": "transformer_2"}
EXPERTS = ("high_noise", "low_noise")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- locating


class ModelSource:
    """Where the components come from: a local folder, or a hub id at a revision."""

    files: dict[str, Path] = {}  # subfolder -> original single file (formats.sources.SingleFileSource)
    tokenizer: str | None = None

    def __init__(self, name_or_path: str):
        self.spec = name_or_path
        path = Path(name_or_path).expanduser()
        self.local = path if path.exists() else None
        repo, _, revision = name_or_path.partition("@")
        self.repo = repo
        self.revision = revision or None

    @property
    def root(self) -> str:
        return str(self.local) if self.local else self.repo

    def kwargs(self) -> dict[str, Any]:
        return {} if self.local else {"revision": self.revision}

    def model_index(self) -> dict:
        if self.local:
            path = self.local / "model_index.json"
            if not path.is_file():
                raise ModelError(_problem(self.spec, "is not a Diffusers model folder (no model_index.json)"))
            return json.loads(path.read_text())
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo):
            raise ModelError(_problem(self.spec, "is neither an existing folder nor a hub id like 'org/name'"))
        from huggingface_hub import hf_hub_download

        try:
            return json.loads(Path(hf_hub_download(self.repo, "model_index.json", revision=self.revision)).read_text())
        except Exception as exc:  # noqa: BLE001 - any hub failure is a user-facing problem here
            raise ModelError(_problem(self.spec, f"could not be fetched from the hub ({type(exc).__name__})")) from None


def _problem(spec: str, what: str) -> ProfileProblem:
    return ProfileProblem("model.name_or_path", what, spec, "give a local Diffusers folder or a hub id (org/name[@revision])")


# ---------------------------------------------------------------- loading


def load_model_index(name_or_path: str) -> tuple[ModelSource, dict]:
    src = ModelSource(name_or_path)
    return src, src.model_index()


def boundary_ratio(index: dict, arch: archs.Arch | None = None) -> float:
    """The routing boundary: ``model_index.json``'s, else the arch's (0 for one expert)."""
    arch = arch or archs.get(archs.DEFAULT)
    ratio = index.get("boundary_ratio")
    return arch.boundary if ratio is None or arch.single_expert else float(ratio)


def load_expert(src: ModelSource, expert: str, dtype: torch.dtype, subfolder: str | None = None) -> torch.nn.Module:
    """One expert, weights streamed into a meta-initialised module (no second copy)."""
    from diffusers import WanTransformer3DModel

    subfolder = subfolder or EXPERT_SUBFOLDERS[expert]
    if subfolder in src.files:
        return _sources().load_expert(src, subfolder, dtype)
    module = WanTransformer3DModel.from_pretrained(
        src.root, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=True, **src.kwargs()
    )
    module.requires_grad_(False).eval()
    return module


def _sources():
    from .formats import sources  # single files; imported here: it imports this module

    return sources


def build_empty(config: dict[str, Any]) -> torch.nn.Module:
    """An expert from its ``config.json`` on the ``meta`` device (buffers such
    as the RoPE tables stay real): for streaming loaders and for counting."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=False):
        return WanTransformer3DModel.from_config(config)


def load_vae(src: ModelSource) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    if "vae" in src.files:
        return _sources().load_vae(src)
    # The Wan VAE is kept in fp32: it is small and bf16 hurts reconstruction.
    vae = AutoencoderKLWan.from_pretrained(src.root, subfolder="vae", torch_dtype=torch.float32, **src.kwargs())
    return vae.requires_grad_(False).eval()


def load_text_encoder(src: ModelSource, dtype: torch.dtype):
    from transformers import AutoTokenizer, UMT5EncoderModel

    if src.files or src.tokenizer:
        return _sources().load_text_encoder(src, dtype)
    kwargs = src.kwargs()
    tokenizer = AutoTokenizer.from_pretrained(src.root, subfolder="tokenizer", **kwargs)
    encoder = UMT5EncoderModel.from_pretrained(src.root, subfolder="text_encoder", dtype=dtype, **kwargs)
    return tokenizer, encoder.requires_grad_(False).eval()


# ---------------------------------------------------------------- encoders


def clean_prompt(text: str) -> str:
    """What WanPipeline does to a prompt (minus ftfy): unescape, squash spaces."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_text(tokenizer, encoder, prompts: list[str], max_length: int, device, dtype) -> torch.Tensor:
    """Text states ``[B, max_length, dim]`` with padding zeroed (as WanPipeline)."""
    inputs = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    enc_device = next(encoder.parameters()).device
    states = encoder(inputs.input_ids.to(enc_device), inputs.attention_mask.to(enc_device)).last_hidden_state
    mask = inputs.attention_mask.to(enc_device).unsqueeze(-1).to(states.dtype)
    return (states * mask).to(device=device, dtype=dtype)


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels ``[B, 3, F, H, W]`` in [-1, 1] -> normalised latents (distribution mode)."""
    vae_device = next(vae.parameters()).device
    latents = vae.encode(pixels.to(vae_device, torch.float32)).latent_dist.mode()
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> pixels in [-1, 1]."""
    vae_device = next(vae.parameters()).device
    latents = latents.to(vae_device, torch.float32)
    mean, std = _latent_stats(vae, latents)
    return vae.decode(latents * std + mean, return_dict=False)[0].clamp(-1, 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(ProfileProblem("job.device", "CUDA is not available on this machine", name, 'use device = "cpu" or "auto"'))
    return torch.device(name)
