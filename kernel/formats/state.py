"""The resume state's files: one checkpoint folder ``checkpoints/step_<k>/``::

    lora.safetensors      fp32 LoRA weights of every trained expert, named
                          "<expert>.blocks.{i}.<diffusers module>.lora_A.weight"
    tensors.safetensors   optimizer, RNG and plugin tensors
    state.json            {"format": "wantrain.resume", "version": 1, "step",
                          "name", "experts", "profile" (dotted keys), "tree"}
                          -- the tree's tensors are references into
                          tensors.safetensors

Nothing is pickled: :func:`encode_tree` moves tensors out of the tree and
leaves ``{"__tensor__": key}``; tuples, non-string dict keys, numpy arrays and
dtypes are tagged so :func:`decode_tree` gives back what was stored. Tensors
round-trip bit for bit (raw bytes, :mod:`.safetensors`). The commit protocol
(temporary folder, rename) belongs to :mod:`wantrain.resume`; the files are
written here, each through the one atomic writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ..errors import ProfileProblem, WantrainError
from . import safetensors as st

FORMAT = "wantrain.resume"
VERSION = 1
STATE_JSON = "state.json"
LORA_FILE = "lora.safetensors"
TENSORS_FILE = "tensors.safetensors"

_RESUME_FIX = "give a <output_dir>/checkpoints/step_<N> folder; to start from a LoRA file use [target] init_from"


# ---------------------------------------------------------------- the state tree


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of ``obj``; tensors are moved into ``tensors`` and
    replaced by ``{"__tensor__": key}``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__dict__": [[encode_tree(k, tensors, f"{path}.k{i}"), encode_tree(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store a {type(obj).__name__} in the resume state (at {path or 'the top'}); "
                    "return tensors, numbers, strings, lists or dicts from state_dict")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__tuple__" in obj:
        return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# ---------------------------------------------------------------- files


def write_files(folder: Path, doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                weights: Mapping[str, torch.Tensor], weights_meta: Mapping[str, str]) -> None:
    """The three files of a checkpoint into ``folder`` (each written
    atomically and fsynced), then the folder itself fsynced."""
    folder = Path(folder)
    st.write_atomic(weights, folder / LORA_FILE, weights_meta)
    st.write_atomic(tensors, folder / TENSORS_FILE, {"format": "pt"})
    st.write_bytes_atomic(json.dumps(doc).encode("utf-8"), folder / STATE_JSON)
    st.fsync_dir(folder)


def read_doc(folder: Path, where: str = "--resume", fix: str = _RESUME_FIX) -> dict[str, Any]:
    """The parsed ``state.json`` of a checkpoint folder; WantrainError (at
    ``where``) when the folder is not a wantrain resume state."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WantrainError(ProfileProblem(where, "is not a checkpoint folder (no state.json)", str(folder), fix)) from None
    except (OSError, ValueError) as exc:
        raise WantrainError(ProfileProblem(where, f"unreadable checkpoint ({exc})", str(folder))) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise WantrainError(ProfileProblem(where, "not a wantrain resume state of a known version", str(folder)))
    return doc


def read_weights(folder: Path, experts: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{expert: {"blocks.0.attn1.to_q.lora_A.weight": fp32 tensor, ...}}`` from ``lora.safetensors``."""
    flat, _ = st.read(Path(folder) / LORA_FILE)
    return {e: {k[len(e) + 1:]: v for k, v in flat.items() if k.startswith(e + ".")} for e in experts}


def read_tree(folder: Path, doc: Mapping[str, Any]) -> Any:
    """The decoded state tree (optimizer, scheduler, rng, data, plugins)."""
    tensors, _ = st.read(Path(folder) / TENSORS_FILE)
    return decode_tree(doc["tree"], tensors)
