"""Whether a model folder (or the single files of ``[model]``) is the
``[model] arch`` the profile says, and fits the profile's LoRA rank: the
checks ``wantrain check`` runs before any weight loads, and the arch check
every run makes when it reads the model index."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import DEFAULT, Arch, folder_problems, get
from ..errors import ModelError, ProfileProblem
from ..model import ModelSource, _problem, _sources


def check_model_source(name_or_path: str, arch: str = DEFAULT) -> list[ProfileProblem]:
    """Cheap check for ``wantrain check``: a local folder must look like Wan 2.2, of ``arch``."""
    src = ModelSource(name_or_path)
    if not src.local:
        return [] if re.fullmatch(r"[\w.-]+/[\w.-]+", src.repo) else [_problem(name_or_path, "is neither an existing folder nor a hub id")]
    try:
        index = src.model_index()
    except ModelError as exc:
        return exc.problems
    missing = [k for k in ("transformer", "vae", "text_encoder", "tokenizer") if k not in index]
    if missing:
        return [_problem(name_or_path, f"is not a Wan 2.2 model (missing {', '.join(missing)})")]
    try:
        check_arch(src, index, get(arch))
    except ModelError as exc:
        return exc.problems
    return []


def _config(src: ModelSource, subfolder: str) -> dict:
    if subfolder in src.files:
        return _sources().tensor_source(src, subfolder).config()
    if src.local:
        path = src.local / subfolder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(src.repo, "config.json", subfolder=subfolder, revision=src.revision)).read_text())


def check_arch(src: ModelSource, index: dict, arch: Arch) -> None:
    """``[model] arch`` against the folder's configs (experts, transformer
    in_channels, VAE latent channels): ModelError naming both on a mismatch."""
    problems = folder_problems(arch, "model.arch", src.spec, index, _config(src, "transformer"), _config(src, "vae"))
    if problems:
        raise ModelError(problems[0])


def check_rank(name_or_path: str, rank: int, modules) -> list[ProfileProblem]:
    """``wantrain check``: ``rank`` no wider than the narrowest targeted layer, from a local
    ``transformer/config.json`` (a hub model is checked at load: :func:`wantrain.lora.check_rank`)."""
    try:
        config = json.loads((Path(name_or_path).expanduser() / "transformer" / "config.json").read_text())
        dim, ffn = int(config["num_attention_heads"]) * int(config["attention_head_dim"]), int(config["ffn_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # not a local folder we can read: check_model_source says so
    width, kind = min((min(dim, ffn) if m.startswith("ffn.") else dim, m) for m in modules)
    return [rank_problem(rank, f"blocks.*.{kind}", width)] if rank > width else []


def rank_problem(rank: int, layer: str, width: int) -> ProfileProblem:
    return ProfileProblem("target.rank", f"is wider than the model allows: {layer} is {width} wide (a rank is at most the "
                          "smaller of a layer's input and output sizes)", rank, f"use a rank <= {width}, or target fewer modules")
