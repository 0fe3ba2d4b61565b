"""The one safetensors serializer, the one atomic writer and the one reader.

LoRA pairs, exports, the resume state's tensors and the SVD ARA cache are
written by :func:`write_atomic`, ``state.json`` by :func:`write_bytes_atomic`
(plugins' caches should use them too); LoRA, ARA and state files are read by
:func:`read`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from ..errors import ProfileProblem, WantrainError

_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):  # torch >= 2.3
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _code


def serialize(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bytes:
    """safetensors bytes with a canonical header (keys sorted), so the same
    tensors and metadata always give the same bytes. (The safetensors
    library writes its metadata from a hash map, in an order that changes
    between calls.) The result is read by ``safetensors.safe_open``; tensors
    come back bit for bit."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    chunks, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    """Write ``data`` under a temporary name beside ``path``, fsync it, rename
    into place: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    if path.exists() and not path.is_file():  # never replace a folder, a device node (/dev/null), a fifo, ...
        raise WantrainError(ProfileProblem(str(path), "is not a regular file (a folder, device or other special file); "
                                           "refusing to replace it", fix="write to a new file path"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_atomic(tensors: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, str]) -> Path:
    """A safetensors file (canonical bytes, :func:`serialize`) written atomically."""
    return write_bytes_atomic(serialize(tensors, meta), path)


def require_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """WantrainError when a floating tensor holds nan or inf (one device sync):
    a diverged run must never write (and rotate in) weights that are garbage."""
    floats = [t for t in tensors.values() if t.is_floating_point() and t.numel()]
    if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
        raise WantrainError(ProfileProblem(where, "the LoRA weights are not finite (nan or inf): the run diverged; "
                                           "nothing was written, earlier checkpoints are intact",
                                           fix="lower training.lr and resume from the last checkpoint"))


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read(path: str | Path, where: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a missing or unreadable
    file is one WantrainError line located at ``where`` (default: the path)."""
    path = Path(path)
    got = {"got": str(path)} if where else {}
    where = where or str(path)
    if not path.is_file():
        raise WantrainError(ProfileProblem(where, "file not found", fix="check the path", **got))
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WantrainError(ProfileProblem(where, f"not a readable safetensors file ({reason})", **got)) from None
    return tensors, metadata
