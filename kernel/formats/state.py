"""The resume state's files: one checkpoint folder ``checkpoints/step_<k>/``::

    lora.safetensors      fp32 LoRA weights of every trained expert, named
                          "<expert>.blocks.{i}.<diffusers module>.lora_A.weight"
    tensors.safetensors   optimizer, RNG and plugin tensors
    state.json            {"format": "wantrain.resume", "version": 1, "step",
                          "name", "experts", "lineage", "written_at",
                          "profile" (dotted keys), "tree"}
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
from typing import Any, Iterable, Iterator, Mapping

import attrs
import numpy as np
import torch
from safetensors import safe_open

from ..errors import ProfileProblem, WantrainError
from . import safetensors as st

FORMAT = "wantrain.resume"
VERSION = 1
#: ``<output_dir>/checkpoints/`` holds the resume state (the file layout of
#: docs/checkpoints.md; the same word as the plugin that writes periodic
#: checkpoints, but the folder is the kernel's: resume and graceful stop use it
#: with or without that plugin)
CHECKPOINTS_DIR = "checkpoints"
STATE_JSON = "state.json"
LORA_FILE = "lora.safetensors"
TENSORS_FILE = "tensors.safetensors"

#: the lineage of checkpoints written before lineages were recorded
LEGACY = "legacy"


@attrs.frozen
class Lineage:
    """A chain of checkpoints, each continuing the one before (docs/checkpoints.md,
    "Lineages"). ``tag`` is part of the names of its checkpoints (``step_<k>_<tag>``,
    ``<name>_<k>_<tag>_<expert>``); "" for the lineage a folder started with."""

    id: str = LEGACY
    tag: str = ""
    #: the checkpoint folder this run resumed from (None: a fresh start)
    resumed_from: str | None = None


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
    wrong = _wrong_field(doc)
    if wrong:
        raise WantrainError(ProfileProblem(where, f"damaged checkpoint: state.json {wrong}", str(folder),
                                           _DAMAGED_FIX if where == "--resume" else "give another checkpoint"))
    return doc


_DAMAGED_FIX = "give an earlier checkpoints/step_N folder (--resume auto skips damaged ones)"
#: state.json fields and what each must be
_FIELDS = {
    "step": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "experts": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(e, str) for e in v), "a list of expert names"),
    "profile": (lambda v: isinstance(v, dict), "a table"),
    "tree": (lambda v: isinstance(v, dict), "a table"),
}


def _wrong_field(doc: Mapping[str, Any], required: Iterable[str] = ("step",)) -> str | None:
    """What is wrong with a parsed state.json's fields (those present, and the ``required`` ones), or None."""
    for key, (ok, what) in _FIELDS.items():
        if key not in doc:
            if key in required:
                return f"has no {key!r}"
            continue
        if not ok(doc[key]):
            return f"{key!r} is not {what} (got {json.dumps(doc[key])[:40]})"
    return None


def check_files(folder: Path, doc: Mapping[str, Any], where: str = "--resume") -> None:
    """Cheap checks that a checkpoint can be restored, without loading a
    tensor: both safetensors files open (a truncated file fails here: its
    header no longer covers the file), ``lora.safetensors`` holds weights of
    every expert the state names, ``tensors.safetensors`` every tensor the
    tree refers to. WantrainError naming the file and what is wrong."""
    folder = Path(folder)
    wrong = _wrong_field(doc, required=_FIELDS)
    if wrong:
        raise WantrainError(ProfileProblem(where, f"damaged checkpoint: state.json {wrong}", str(folder), _DAMAGED_FIX))
    lora_keys = _keys(folder / LORA_FILE, where)
    missing = [e for e in doc["experts"] if not any(k.startswith(e + ".") for k in lora_keys)]
    if missing:
        raise WantrainError(ProfileProblem(where, f"damaged checkpoint: {LORA_FILE} holds no {missing[0]} weights",
                                           str(folder), _DAMAGED_FIX))
    tensor_keys = _keys(folder / TENSORS_FILE, where)
    absent = [r for r in _tensor_refs(doc["tree"]) if r not in tensor_keys]
    if absent:
        raise WantrainError(ProfileProblem(where, f"damaged checkpoint: {TENSORS_FILE} lacks {len(absent)} tensor(s) "
                                           f"the state refers to (e.g. {absent[0]!r})", str(folder), _DAMAGED_FIX))


def _keys(path: Path, where: str) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return set(fh.keys())
    except Exception as exc:  # noqa: BLE001 - missing, truncated or garbage: all the same to the user
        reason = "missing" if not path.exists() else (str(exc).splitlines() or [type(exc).__name__])[0]
        raise WantrainError(ProfileProblem(where, f"damaged checkpoint: {path.name} is unreadable ({reason})",
                                           str(path.parent), _DAMAGED_FIX)) from None


def _tensor_refs(tree: Any) -> Iterator[str]:
    """Every tensor key an encoded tree refers to."""
    if isinstance(tree, list):
        for v in tree:
            yield from _tensor_refs(v)
    elif isinstance(tree, dict):
        for tag in ("__tensor__", "__ndarray__"):
            if isinstance(tree.get(tag), str):
                yield tree[tag]
        for v in tree.values():
            yield from _tensor_refs(v)


def read_weights(folder: Path, experts: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{expert: {"blocks.0.attn1.to_q.lora_A.weight": fp32 tensor, ...}}`` from ``lora.safetensors``."""
    flat, _ = st.read(Path(folder) / LORA_FILE)
    return {e: {k[len(e) + 1:]: v for k, v in flat.items() if k.startswith(e + ".")} for e in experts}


def read_tree(folder: Path, doc: Mapping[str, Any]) -> Any:
    """The decoded state tree (optimizer, scheduler, rng, data, plugins)."""
    tensors, _ = st.read(Path(folder) / TENSORS_FILE)
    return decode_tree(doc["tree"], tensors)
