"""``wantrain export`` and ``wantrain lora-info``.

``export`` converts a LoRA file of any layout :mod:`wantrain.formats` reads
(each half of a two-expert file to its own file), or a checkpoint folder (one
file per expert), to ``comfyui`` (ours) or ``diffusers``. A checkpoint's
other weights (``--<variant>``: a plugin's own copy of the LoRA) come from
the plugin that keeps them, through the ``checkpoint_weights`` event.
``lora-info`` prints :func:`wantrain.formats.lora.describe`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import model, registry
from ..errors import ProfileProblem, WantrainError
from ..formats import lora as lora_format
from ..formats import state as state_files
from ..formats.lora import describe  # noqa: F401 - ``wantrain lora-info``

FORMATS = lora_format.WRITTEN
_CHECKPOINT_FIX = "give a checkpoints/step_N folder or a LoRA .safetensors file"


def export(source: str | Path, fmt: str, out: str | Path, *, variant: str | None = None,
           dtype: str | None = None) -> list[Path]:
    """A LoRA file -> one file (a two-expert file: one per expert); a checkpoint
    folder -> one file per expert in the folder ``out``. ``variant`` picks a
    plugin's weights of a checkpoint; ``dtype`` (bf16 | fp16 | fp32) defaults
    to the source's. ``out`` ending in ``/`` is a folder (made when missing);
    writing onto the source is refused."""
    into_folder = str(out).endswith(("/", os.sep))
    source, out = Path(source), Path(out)
    if into_folder:
        out.mkdir(parents=True, exist_ok=True)
    torch_dtype = model.DTYPES[dtype] if dtype else None
    if source.is_dir():
        return _export_checkpoint(source, fmt, out, variant, torch_dtype)
    if variant:
        raise WantrainError(ProfileProblem(f"--{variant}", "needs a checkpoint folder (checkpoints/step_N)", str(source),
                                           "LoRA files already hold the weights they were saved with"))
    found = lora_format.read_file(source)
    first = next(iter(found.values()))
    if not first.combined:
        return [lora_format.write(first, fmt, _not_source(out / source.name if out.is_dir() else out, source), torch_dtype)]
    written = []
    for expert, w in found.items():
        target = out / f"{source.stem}_{expert}{source.suffix}" if out.is_dir() else out.with_name(f"{out.stem}_{expert}{out.suffix}")
        written.append(lora_format.write(w, fmt, _not_source(target, source), torch_dtype))
    return written


def _not_source(target: Path, source: Path) -> Path:
    if target.exists() and os.path.samefile(target, source):
        raise WantrainError(ProfileProblem("-o", "is the file being exported; refusing to overwrite it", str(target),
                                           "write to another file name or folder"))
    return target


def _export_checkpoint(folder: Path, fmt: str, out: Path, variant: str | None, dtype: torch.dtype | None) -> list[Path]:
    doc = state_files.read_doc(folder, "export", _CHECKPOINT_FIX)
    weights = variant_weights(folder, doc, variant) if variant else None
    found = lora_format.read_checkpoint(folder, "export", weights=weights, variant=variant)
    name, step = doc.get("name", "lora"), int(doc["step"])
    return [lora_format.write(w, fmt, out / lora_format.lora_filename(name, expert, step), dtype)
            for expert, w in found.items()]


def variant_weights(folder: Path, doc: Mapping[str, Any], variant: str) -> Mapping[str, Mapping[str, torch.Tensor]]:
    """``{expert: kernel-named tensors}`` of ``variant``, asked of the plugins
    (``checkpoint_weights``) with the checkpoint's decoded plugin states."""
    states = state_files.read_tree(folder, doc).get("plugins") or {}
    weights = registry.catalogue().hook.checkpoint_weights(states=states, variant=variant)
    if weights is None:
        raise WantrainError(ProfileProblem(f"--{variant}", f"this checkpoint holds no {variant} weights", str(folder),
                                           f"enable the plugin that keeps them in the run, or export without --{variant}"))
    return weights
