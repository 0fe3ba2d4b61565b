"""Where a component's weights come from: a Diffusers folder (or hub id), or
an original single file per component (ComfyUI's files) -- one interface.

``[model]`` names the single files beside ``name_or_path`` (see
docs/memory.md, "Pointing [model] at ComfyUI files")::

    high_noise = "/models/wan2.2_t2v_high_noise_14B_fp16.safetensors"
    low_noise = "/models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
    text_encoder = "/models/umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    vae = "/models/wan_2.1_vae.safetensors"
    tokenizer = "google/umt5-xxl"        # or name_or_path = a Diffusers folder / hub id

A component without a file comes from ``name_or_path`` as before. When every
component the arch needs is a file, ``name_or_path`` is not read at all and
the tokenizer must be named (UMT5's tokenizer is in none of the files):
``tokenizer = ...``, or ``name_or_path`` written out.

:class:`TensorSource` is what a streaming loader reads (the quantize
plugin's, and the unquantized one here): the component's Diffusers names,
its config, and tensors read a few at a time -- from Diffusers shards
(:class:`DiffusersTensors`) or from one original file with its key
conversion and fp8 scales (:class:`SingleFileTensors`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from ..errors import ModelError, ProfileError, ProfileProblem
from ..model import ModelSource, build_empty
from . import wan_original as wo

log = logging.getLogger("wantrain.model")

SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
#: ``[model]`` field -> component kind; experts are named by their expert name
COMPONENT_FIELDS = {"text_encoder": "text_encoder", "vae": "vae"}


# ---------------------------------------------------------------- Diffusers files


def subfolder_file(source, subfolder: str, filename: str) -> Path | None:
    """A file of the model (local folder or hub), or None when it does not exist."""
    if source.local:
        path = Path(source.local) / subfolder / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return Path(hf_hub_download(source.repo, f"{subfolder}/{filename}", revision=source.revision))
    except EntryNotFoundError:
        return None


def read_config(source, subfolder: str) -> dict:
    path = subfolder_file(source, subfolder, "config.json")
    if path is None:
        raise ModelError(ProfileProblem("model.name_or_path", f"has no {subfolder}/config.json", source.spec))
    return json.loads(path.read_text())


def weight_map(source, subfolder: str) -> dict[str, Path]:
    """``{tensor name: shard path}`` for a sharded or single-file subfolder."""
    index = subfolder_file(source, subfolder, INDEX_FILE)
    if index is not None:
        names = json.loads(index.read_text())["weight_map"]
        shards = {shard: subfolder_file(source, subfolder, shard) for shard in sorted(set(names.values()))}
        return {key: shards[shard] for key, shard in names.items()}
    single = subfolder_file(source, subfolder, SINGLE_FILE)
    if single is None:
        raise ModelError(ProfileProblem("model.name_or_path", f"has no safetensors weights in {subfolder}/", source.spec))
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as fh:
        return {key: single for key in fh.keys()}


def read_tensors(keys: Iterable[str], files: Mapping[str, Path]) -> dict[str, torch.Tensor]:
    """Read ``keys`` into memory of their own, opening each shard once and
    closing it right after, so no file stays mapped into this process."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    out = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as fh:
            for key in names:
                # a copy: safetensors may hand out views of its file mapping,
                # and one small tensor kept (a bias) would keep the whole
                # shard mapped and its pages in this process's RSS
                out[key] = fh.get_tensor(key).clone()
    return out


# ---------------------------------------------------------------- tensor sources


class TensorSource(Mapping[str, Path]):
    """One component's tensors under Diffusers names: a mapping ``{name:
    file it is read from}`` plus :meth:`config` and :meth:`read`."""

    names: dict[str, Path]

    def __getitem__(self, name: str) -> Path:
        return self.names[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def config(self) -> dict:
        raise NotImplementedError

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class DiffusersTensors(TensorSource):
    """A Diffusers subfolder's shards (local or hub)."""

    def __init__(self, source, subfolder: str):
        self.source, self.subfolder = source, subfolder
        self.names = weight_map(source, subfolder)

    def config(self) -> dict:
        return read_config(self.source, self.subfolder)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return read_tensors(names, self.names)


class SingleFileTensors(TensorSource):
    """One original single file: names converted, fp8 dequantized with its scales."""

    def __init__(self, path: str | Path, kind: str, where: str = "model"):
        try:
            self.file, self.original, self._config = wo.open_component(path, kind)
        except wo.FormatError as exc:
            raise ModelError(ProfileProblem(where, str(exc), str(path), fix_for(kind))) from None
        self.names = {name: self.file.path for name in self.original}

    def config(self) -> dict:
        return dict(self._config)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        tensors = self.file.read({self.original[n] for n in names})
        return {n: tensors[self.original[n]] for n in names}


def fix_for(kind: str) -> str:
    return f"give {wo.COMPONENT_NAMES[kind]} file in the original (ComfyUI) layout, or remove the key to use name_or_path"


def tensor_source(source, subfolder: str) -> TensorSource:
    """What a streaming loader reads for ``subfolder`` of ``source``."""
    files = getattr(source, "files", {})
    if subfolder in files:
        kind = "expert" if subfolder.startswith("transformer") else subfolder
        return SingleFileTensors(files[subfolder], kind, source.where.get(subfolder, "model"))
    return DiffusersTensors(source, subfolder)


# ---------------------------------------------------------------- the model source


class SingleFileSource(ModelSource):
    """A :class:`~wantrain.model.ModelSource` some of whose components are
    original single files (``files``: Diffusers subfolder -> path)."""

    def __init__(self, name_or_path: str, files: Mapping[str, Path], where: Mapping[str, str], tokenizer: str | None,
                 standalone: bool):
        super().__init__(name_or_path)
        self.files, self.where, self.tokenizer, self.standalone = dict(files), dict(where), tokenizer, standalone

    def model_index(self) -> dict:
        if not self.standalone:
            return super().model_index()
        index = {sub: ["diffusers", "WanTransformer3DModel"] for sub in self.files if sub.startswith("transformer")}
        return {**index, "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
                "tokenizer": ["transformers", "AutoTokenizer"]}

    def identity(self, subfolder: str) -> str:
        """Names a single-file component in cache keys (text and latent
        caches): by content, so a moved file keeps its caches."""
        return f"single file {file_digest(self.files[subfolder])}"


def model_source(profile, arch) -> ModelSource:
    """The run's source: a plain :class:`ModelSource` when ``[model]`` names
    no single file (nothing changes), else a :class:`SingleFileSource`.
    Raises ProfileError on the problems :func:`single_file_problems` finds."""
    mcfg = profile.model
    fields = _fields(mcfg, arch)
    if not fields and mcfg.tokenizer is None:
        return ModelSource(mcfg.name_or_path)
    problems = single_file_problems(profile, arch)
    if problems:
        raise ProfileError(problems)
    files = {sub: profile.resolve_path(value) for sub, (field, value) in fields.items()}
    where = {sub: f"model.{field}" for sub, (field, value) in fields.items()}
    tokenizer = str(_resolve_tokenizer(profile)) if mcfg.tokenizer else None
    for sub, path in files.items():
        log.info("model: %s from the single file %s (%s)", fields[sub][0], path, wo.OriginalFile(path).storage)
    return SingleFileSource(mcfg.name_or_path, files, where, tokenizer, standalone=_standalone(fields, arch))


def _fields(mcfg, arch) -> dict[str, tuple[str, str]]:
    """Diffusers subfolder -> (``[model]`` field, value) for each single file given."""
    out = {}
    for expert in arch.experts:
        value = getattr(mcfg, expert, None)
        if value is not None:
            out[arch.subfolders[expert]] = (expert, value)
    for field in COMPONENT_FIELDS:
        if getattr(mcfg, field, None) is not None:
            out[field] = (field, getattr(mcfg, field))
    return out


def _standalone(fields: Mapping, arch) -> bool:
    return all(arch.subfolders[e] in fields for e in arch.experts) and all(f in fields for f in COMPONENT_FIELDS)


def _resolve_tokenizer(profile) -> str | Path:
    path = profile.resolve_path(profile.model.tokenizer)
    return path if path.exists() else profile.model.tokenizer


def single_file_problems(profile, arch) -> list[ProfileProblem]:
    """``wantrain check`` (and the start of a run): every single file exists
    and holds the component its key names, in the original layout; an
    expert fits the arch; the tokenizer has a source. One line each."""
    mcfg = profile.model
    fields = _fields(mcfg, arch)
    problems = []
    for sub, (field, value) in fields.items():
        where, path = f"model.{field}", profile.resolve_path(value)
        kind = "expert" if sub.startswith("transformer") else field
        if not path.is_file():
            what = "is a folder, not a single .safetensors file" if path.is_dir() else "not found"
            problems.append(ProfileProblem(where, what, value, fix_for(kind)))
            continue
        try:
            _, _, config = wo.open_component(path, kind)
        except wo.FormatError as exc:
            problems.append(ProfileProblem(where, str(exc), value, fix_for(kind)))
            continue
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a damaged header
            problems.append(ProfileProblem(where, f"is not a readable safetensors file ({type(exc).__name__})", value, fix_for(kind)))
            continue
        problems += _fits_arch(where, value, kind, config, arch)
    if _standalone(fields, arch) and mcfg.tokenizer is None and "name_or_path" not in profile.raw.get("model", {}):
        problems.append(ProfileProblem("model.tokenizer", "is needed: every component is a single file and none holds "
                                       "UMT5's tokenizer", ProfileProblem._MISSING,
                                       'add tokenizer = "google/umt5-xxl" (or a folder), or name_or_path = a Wan 2.2 '
                                       "Diffusers folder or hub id"))
    return problems


def _fits_arch(where: str, value: str, kind: str, config: dict, arch) -> list[ProfileProblem]:
    if kind == "expert" and config["in_channels"] != arch.in_channels:
        return [ProfileProblem(where, f"is an expert with {config['in_channels']} input channels; {arch.title} "
                               f"takes {arch.in_channels}", value, f"give a {arch.title} file, or set [model] arch to match")]
    if kind == "vae" and config["z_dim"] != arch.latent_channels:
        return [ProfileProblem(where, f"is a VAE with {config['z_dim']} latent channels; {arch.title} uses "
                               f"{arch.latent_channels}", value, "give the VAE this arch uses")]
    return []


# ---------------------------------------------------------------- loading (no quantization)


def _target_dtype(module: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """As ``from_pretrained(torch_dtype=...)``: modules the class keeps in
    fp32 stay fp32 -- diffusers' (norms, modulation, time embedder) always,
    transformers' (UMT5's ``wo``) only under fp16, as transformers does."""
    from transformers import PreTrainedModel

    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    if isinstance(module, PreTrainedModel) and dtype != torch.float16:
        keep = getattr(module, "_keep_in_fp32_modules_strict", None) or ()
    return torch.float32 if any(k in name.split(".") for k in keep) else dtype


@torch.no_grad()
def stream_into(module: torch.nn.Module, tensors: TensorSource, dtype: torch.dtype, where: str) -> torch.nn.Module:
    """Fill a meta-built module from ``tensors`` one tensor at a time (host
    RAM: the module in ``dtype`` plus one tensor)."""
    from accelerate.utils import set_module_tensor_to_device

    wanted = [n for n, _ in module.named_parameters()] + [n for n, b in module.named_buffers() if b.device.type == "meta"]
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise ModelError(ProfileProblem(where, f"lacks {len(missing)} weights of the model (e.g. {missing[0]})",
                                        str(next(iter(tensors.values()), "")), "give a complete file of this component"))
    for name in wanted:
        value = tensors.read([name])[name]
        set_module_tensor_to_device(module, name, "cpu", value=value, dtype=_target_dtype(module, name, dtype))
    return module.requires_grad_(False).eval()


def load_expert(source: SingleFileSource, subfolder: str, dtype: torch.dtype) -> torch.nn.Module:
    """An expert from its single file, unquantized, in ``dtype``."""
    tensors = tensor_source(source, subfolder)
    return stream_into(build_empty(tensors.config()), tensors, dtype, source.where[subfolder])


def load_vae(source: SingleFileSource) -> torch.nn.Module:
    """The VAE from its single file, in fp32 (as the Diffusers path)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    tensors = tensor_source(source, "vae")
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKLWan.from_config(tensors.config())
    return stream_into(vae, tensors, torch.float32, source.where["vae"])


def load_text_encoder(source: SingleFileSource, dtype: torch.dtype):
    """Tokenizer (``[model] tokenizer`` or name_or_path's) and UMT5 encoder
    (its single file, or name_or_path's)."""
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = load_tokenizer(source)
    if "text_encoder" not in source.files:
        encoder = UMT5EncoderModel.from_pretrained(source.root, subfolder="text_encoder", dtype=dtype, **source.kwargs())
        return tokenizer, encoder.requires_grad_(False).eval()
    tensors = tensor_source(source, "text_encoder")
    with init_empty_weights(include_buffers=False):
        encoder = UMT5EncoderModel(UMT5Config(**tensors.config()))
    return tokenizer, stream_into(encoder, tensors, dtype, source.where["text_encoder"])


def load_tokenizer(source: ModelSource):
    """``[model] tokenizer``: a tokenizer folder or hub id, or a Diffusers
    folder / hub id (its ``tokenizer/``); else name_or_path's ``tokenizer/``."""
    from transformers import AutoTokenizer

    spec = getattr(source, "tokenizer", None)
    if spec is None:
        return AutoTokenizer.from_pretrained(source.root, subfolder="tokenizer", **source.kwargs())
    local = Path(spec)
    if local.is_dir() and (local / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(local / "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise ModelError(ProfileProblem("model.tokenizer", f"could not be loaded ({type(exc).__name__})", spec,
                                        'give a tokenizer folder, a hub id such as "google/umt5-xxl", or a Diffusers folder')) from None


def source_identity(source, subfolder: str) -> str | None:
    """A cache key part for a single-file component (None for one from name_or_path)."""
    return source.identity(subfolder) if subfolder in getattr(source, "files", {}) else None


def file_digest(path: Path) -> str:
    """sha256 of a file's size and first and last MiB: cheap for a 6 GB text
    encoder, and a safetensors file's first MiB is its header (every name,
    dtype and offset), so another conversion or quantization changes it."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
