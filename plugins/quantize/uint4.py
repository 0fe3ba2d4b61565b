"""``uint4``: torchao's 4-bit affine grid, as ai-toolkit quantizes Wan 2.2.

The grid (what ``UIntXWeightOnlyConfig(torch.uint4)`` of torchao 0.10 --
the version ai-toolkit pins -- makes of a linear weight, and what the
published accuracy-recovery adapter ``ostris/accuracy_recovery_adapters``
``wan22_14b_t2i_torchao_uint4`` was trained against):

- groups of 64 consecutive input features of one output row;
- asymmetric: ``scale = (max(w, 0) - min(w, 0)) / 15`` (clamped to
  float32's eps), an **integer** zero point
  ``zp = clamp(0 - round(min(w, 0) / scale), 0, 15)``;
- ``q = clamp(round(w / scale) + zp, 0, 15)``; dequantized
  ``(q - zp) * scale`` in the weight's dtype.

The math is torchao's own (``choose_qparams_affine`` / ``quantize_affine``
/ ``dequantize_affine`` with ``MappingType.ASYMMETRIC``); only the storage
is ours: two 4-bit codes per byte, the scale in the model dtype and the
zero point as one byte per group -- 0.547 bytes per weight. torchao's own
uint4 tensor subclasses change between releases (0.18 routes 4-bit through
gemlite/HQQ, a different grid) and have no CPU backward, so the layer is
a plain :class:`torch.nn.Linear` subclass with buffers: peft wraps it as an
ordinary ``Linear``, the offload plugin moves its buffers like any other,
and gradients flow to the input (hence the LoRA) on CPU and CUDA through a
small autograd function that dequantizes again in backward instead of
keeping a bf16 copy of the weight alive for it.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import version

import torch

log = logging.getLogger("wantrain.quant")

GROUP = 64
#: the grid name written into the metadata of ARA files made against it
GRID = "torchao-uint4-g64"
QMIN, QMAX = 0, 15
#: stored bytes per weight: 4 bits + a bf16 scale and a one-byte zero point per 64
BYTES_PER_WEIGHT = 0.5 + 2 / GROUP + 1 / GROUP


@functools.cache  # once: dequantize calls it in every forward and backward
def _primitives():
    """torchao's affine primitives. torchao logs a warning at import when its
    compiled extensions do not match the installed torch; the primitives
    used here are plain PyTorch and do not need them, so that one import is
    kept quiet."""
    # torchao's own logger (compiled extensions), and torch's pytree logger
    # (a deprecation note about an enum torchao registers)
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization import quant_primitives as qp
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return qp


def torchao_version() -> str:
    return version("torchao")


@torch.no_grad()
def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [out, in] uint8 in 0..15, scale [out, in/64] weight dtype,
    zero point [out, in/64] int32)`` -- torchao's asymmetric uint4, group 64."""
    qp = _primitives()
    if weight.dim() != 2 or weight.shape[1] % GROUP:
        raise ValueError(f"uint4 needs a 2-D weight with in_features divisible by {GROUP} (got {tuple(weight.shape)})")
    block = (1, GROUP)
    scale, zero = qp.choose_qparams_affine(
        weight, qp.MappingType.ASYMMETRIC, block, torch.uint8, quant_min=QMIN, quant_max=QMAX,
        eps=torch.finfo(torch.float32).eps, zero_point_dtype=torch.int32,
    )
    codes = qp.quantize_affine(weight, block, scale, zero, torch.uint8, quant_min=QMIN, quant_max=QMAX)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torchao's ``dequantize_affine`` of the codes: ``(q - zp) * scale`` in ``dtype`` (default: the scale's)."""
    qp = _primitives()
    return qp.dequantize_affine(codes, (1, GROUP), scale, zero.to(torch.int32), torch.uint8, quant_min=QMIN,
                                quant_max=QMAX, output_dtype=dtype or scale.dtype)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: column ``2j`` in the low nibble, ``2j+1`` in the high one."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class _Uint4Linear(torch.autograd.Function):
    """``x @ dequant(W).T + b`` with a gradient for ``x`` only (the weight is
    frozen); backward dequantizes again rather than saving the full weight."""

    @staticmethod
    def forward(ctx, x, packed, scale, zero, bias):
        weight = dequantize(unpack(packed), scale, zero).to(x.dtype)
        ctx.save_for_backward(packed, scale, zero)
        return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        packed, scale, zero = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight = dequantize(unpack(packed), scale, zero).to(grad.dtype)
        return grad @ weight, None, None, None, None


_LAST: dict = {}  # the weight :attr:`UInt4Linear.weight` dequantized last, keyed by its layer and storage


def forget_dequantized() -> None:
    """Drop the cached dequantized weight (one layer's, up to 141 MiB at A14B in bf16)."""
    _LAST.clear()


class UInt4Linear(torch.nn.Linear):
    """A frozen linear layer stored on the ``uint4`` grid.

    An ``nn.Linear`` for everything that asks (peft, the offload plugin,
    ``isinstance`` checks); its weight lives in three buffers (``packed``,
    ``scale``, ``zero_point``). ``weight`` reads as the dequantized tensor
    (what peft and the ARA code look at); the forward never keeps it."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, bias: torch.Tensor | None = None):
        torch.nn.Module.__init__(self)  # not Linear's: it would create a float weight
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear) -> "UInt4Linear":
        codes, scale, zero = quantize(linear.weight.detach())
        return cls(linear.in_features, linear.out_features, pack(codes), scale, zero.to(torch.uint8), linear.bias)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight (read-only in effect: writing to it changes nothing stored). peft reads
        it ~20 times per layer while attaching an adapter (device, dtype, shape): the last layer's stays
        cached (:func:`forget_dequantized`), else attaching to an A14B expert dequantized 8,800 times."""
        key = (id(self), self.packed.data_ptr(), self.packed.device, tuple(self.packed.shape))
        if _LAST.get("key") != key:
            _LAST.clear()
            _LAST.update(key=key, weight=self.dequantize())
        return _LAST["weight"]

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(unpack(self.packed), self.scale, self.zero_point, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Uint4Linear.apply(x, self.packed, self.scale, self.zero_point, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {GRID}"
