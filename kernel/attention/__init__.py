"""``[model] attention``: which attention kernel the experts run, through
diffusers' attention dispatcher (``ModelMixin.set_attention_backend``).

Every name maps to one diffusers backend. Training needs a backward pass, so
a backend without one is refused for a training run with the reason (it is
allowed for ``wantrain sample``): SageAttention's INT8/FP8 kernels are
inference-only, and diffusers 0.42 runs FlashAttention-3 through a
``torch.library.custom_op`` that registers no autograd formula
(FlexAttention trains on a GPU only: PyTorch has no CPU backward). ``auto``
picks the fastest installed backend with a correct backward pass for the
device and dtype: FlashAttention-2 on a CUDA GPU in bf16/fp16 when
``flash-attn`` is installed, else PyTorch's ``scaled_dot_product_attention``
(``sdpa``, which itself picks its flash / memory-efficient kernel on a GPU;
on the CPU it is the only choice). Decisions are recorded in docs/attention.md.
"""

from __future__ import annotations

import contextlib
import difflib
import logging

import attrs
import torch

from ..errors import ProfileError, ProfileProblem

log = logging.getLogger("wantrain")

NO_BACKWARD_SAGE = "SageAttention's quantized kernels are inference-only (no backward pass)"
NO_BACKWARD_FA3 = "diffusers runs FlashAttention-3 through a custom op with no backward pass"


@attrs.frozen
class Backend:
    """One ``[model] attention`` choice: the diffusers backend it selects,
    why it cannot train (None: it can), and what it needs."""

    diffusers: str
    no_backward: str | None = None
    cuda: bool = False  # needs a CUDA GPU
    half: bool = False  # needs bf16 / fp16 ([model] dtype)
    package: str | None = None  # pip package it needs
    gpu_backward: bool = False  # its backward runs on CUDA only (FlexAttention's)


BACKENDS = {
    "sdpa": Backend("native"),
    "sdpa_flash": Backend("_native_flash", cuda=True, half=True),
    "sdpa_efficient": Backend("_native_efficient", cuda=True),
    "sdpa_cudnn": Backend("_native_cudnn", cuda=True, half=True),
    "sdpa_math": Backend("_native_math"),
    "flash": Backend("flash", cuda=True, half=True, package="flash-attn"),
    "flash_varlen": Backend("flash_varlen", cuda=True, half=True, package="flash-attn"),
    "flash3": Backend("_flash_3", NO_BACKWARD_FA3, cuda=True, half=True, package="flash-attn 3 (hopper build)"),
    "flex": Backend("flex", gpu_backward=True),
    "xformers": Backend("xformers", cuda=True, package="xformers"),
    "sage": Backend("sage", NO_BACKWARD_SAGE, cuda=True, half=True, package="sageattention"),
    "sage_varlen": Backend("sage_varlen", NO_BACKWARD_SAGE, cuda=True, half=True, package="sageattention"),
}
NAMES = ("auto", *BACKENDS)
#: ``auto``'s candidates, fastest first; the first that is usable and trains wins
AUTO_ORDER = ("flash", "sdpa")


def installed(name: str) -> bool:
    """The backend's package is importable (diffusers' own requirement check)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(BACKENDS[name].diffusers))
    except RuntimeError:
        return False
    return True


def unusable(name: str, device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
    """Why ``name`` cannot run here (None: it can)."""
    b = BACKENDS[name]
    if training and b.no_backward:
        return f"cannot train: {b.no_backward}"
    if training and b.gpu_backward and device.type != "cuda":
        return f"cannot train on the {device.type}: its backward pass runs on CUDA GPUs only"
    if b.cuda and device.type != "cuda":
        return f"needs a CUDA GPU (device is {device.type})"
    if b.half and dtype not in (torch.bfloat16, torch.float16):
        return "needs [model] dtype bf16 or fp16"
    if not installed(name):
        return f"is not installed (pip install {b.package})" if b.package else "is not available in this torch"
    return None


def resolve(name: str, device: torch.device, dtype: torch.dtype, training: bool = True) -> str:
    """The ``[model] attention`` name to use: ``auto`` resolved, others as given."""
    if name != "auto":
        return name
    return next(n for n in AUTO_ORDER if unusable(n, device, dtype, training) is None)


def problems(profile, device: torch.device | None, training: bool) -> list[ProfileProblem]:
    """``[model] attention``'s problems: an unknown name; a backend with no
    backward in a training run; with ``device`` known, one that cannot run there."""
    name, where = profile.model.attention, "model.attention"
    if name not in NAMES:
        close = difflib.get_close_matches(str(name), NAMES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use one of " + ", ".join(map(repr, NAMES))
        return [ProfileProblem(where, f"must be one of {', '.join(map(repr, NAMES))}", name, hint)]
    if name == "auto":
        return []
    from ..model import DTYPES

    why = unusable(name, device or torch.device("cuda"), DTYPES[profile.model.dtype], training)
    if why and (device is not None or why.startswith("cannot train")):
        fix = 'use "auto" (the fastest installed backend that trains)' if training else 'use "auto"'
        return [ProfileProblem(where, f"{name!r} {why}", name, fix)]
    return []


def check(profile, device: torch.device | None, training: bool) -> None:
    """Raise :func:`problems` as a ProfileError (before any weight loads)."""
    found = problems(profile, device, training)
    if found:
        raise ProfileError(found)


def apply(module: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Set ``module``'s attention backend; returns the name used. PyTorch's
    sdpa (diffusers' default) is left as it is: nothing is changed for it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = resolve(name, device, dtype)
    backend = BACKENDS[name].diffusers
    chosen = {getattr(getattr(m, "processor", None), "_attention_backend", None) for m in module.modules()}
    if backend == "native" and _AttentionBackendRegistry._active_backend.value == "native" and chosen <= {None}:
        return name
    if hasattr(module, "set_attention_backend"):
        with _quiet("diffusers.models.modeling_utils"):
            module.set_attention_backend(backend)
        log.debug("attention: %s (diffusers backend %s)", name, backend)
    return name


@contextlib.contextmanager
def _quiet(logger: str):
    """diffusers warns that attention backends are experimental on every call."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)
