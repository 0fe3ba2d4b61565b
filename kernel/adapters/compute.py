"""Plain LoRA computed in the dtype of the layer's input, fp32 master weights.

peft casts a LoRA layer's input to its adapter weights' dtype
(``x = self._cast_input_dtype(x, lora_A.weight.dtype)``). With fp32 adapter
weights in a bf16 expert, every targeted layer's input is copied to fp32 and
that copy is what autograd keeps for the backward of ``lora_A`` -- two extra
bytes per element beside the bf16 input the frozen layer already keeps, and
fp32 ``lora_A`` / ``lora_B`` matmuls. At A14B width it was ~40 % of a block's
saved activations (``benchmarks/activation_memory.py``).

Here the input is left in its own dtype and the adapter's weights are cast to
it inside the matmul instead (``F.linear(x, W.to(x.dtype))``): the
parameters, what the optimizer steps and what is saved to files stay fp32;
autograd keeps the bf16 input it already had (the same storage the frozen
layer keeps) and a rank-wide bf16 ``lora_A`` output. Gradients flow back
through the cast into the fp32 weights. An fp32 expert is untouched op for
op: ``W.to(float32)`` of an fp32 weight is the weight itself, so the CPU
demo's bytes do not move.

Only plain LoRA layers (no DoRA or other peft variant) are switched; the other
adapter types keep peft's own casting.
"""

from __future__ import annotations

import torch


class InputDtypeLinear(torch.nn.Linear):
    """``nn.Linear`` whose weight (and bias) are cast to the input's dtype in
    the forward: the parameter keeps its dtype, the matmul runs in the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def fp32_master_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The plain LoRA's A and B weights of ``module``, made fp32 and trainable:
    the optimizer steps fp32 masters whatever the expert's dtype."""
    params = []
    for name, param in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def compute_in_input_dtype(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Switch every plain LoRA layer of ``module`` to compute its adapter in
    the dtype of its input (see the module docstring); returns ``params``
    (so :func:`wantrain.lora.attach_lora` can end with it)."""
    from peft.tuners.lora import LoraLayer

    for layer in module.modules():
        if not isinstance(layer, LoraLayer) or getattr(layer, "lora_variant", None):
            continue
        linears = [m for d in (layer.lora_A, layer.lora_B) for m in d.values()]
        if not linears or any(type(m) is not torch.nn.Linear for m in linears):
            continue  # not peft's plain Linear LoRA (conv, embedding, ...): leave peft's casting
        for m in linears:
            m.__class__ = InputDtypeLinear
        layer.cast_input_dtype_enabled = False
    return params
