"""Plain LoRA computes in the model dtype (wantrain.adapters.compute): bf16
matmuls and no fp32 copies of the inputs in a bf16 block, fp32 master weights,
loss and gradients equal to peft's fp32-adapter path within bf16 tolerance, an
fp32 block bit-for-bit unchanged -- and ``wantrain estimate``'s per-token
figure equal to what autograd actually saves (benchmarks/activation_memory.py's
count, run here on a narrow block with A14B's head width)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from wantrain.adapters.compute import InputDtypeLinear
from wantrain.commands import estimate as est

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "activation_memory.py"
DIM, FFN, HEADS = 256, 512, 2  # head_dim 128, as every Wan 2.2 arch


@pytest.fixture(scope="module")
def am():
    spec = importlib.util.spec_from_file_location("activation_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lora_block(am, dtype, before: bool):
    """A narrow Wan block with rank-4 LoRA on the ten targets, lora_B nonzero (seeded)."""
    block = am.make_block(DIM, FFN, HEADS, dtype, "cpu")
    block.requires_grad_(False)
    am.attach(block, 4, before=before)
    gen = torch.Generator().manual_seed(7)
    for name, p in block.named_parameters():
        if ".lora_B." in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return block


def loss_and_grads(am, block, dtype):
    (h, e, t, rot), _ = am.inputs(DIM, HEADS, 2, dtype, "cpu", side=8, text=16)
    loss = block(h, e, t, rot).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}


def test_bf16_block_computes_lora_in_bf16_with_fp32_master_weights(am):
    after = lora_block(am, torch.bfloat16, before=False)
    linears = [m for n, m in after.named_modules() if ".lora_A." in n or ".lora_B." in n]
    assert linears and all(type(m) is InputDtypeLinear for m in linears)
    assert all(p.dtype == torch.float32 for n, p in after.named_parameters() if p.requires_grad)
    before = lora_block(am, torch.bfloat16, before=True)
    before.load_state_dict(after.state_dict())
    loss_a, grads_a = loss_and_grads(am, after, torch.bfloat16)
    loss_b, grads_b = loss_and_grads(am, before, torch.bfloat16)
    assert len(grads_a) == 20 and grads_a.keys() == grads_b.keys()
    assert torch.allclose(loss_a, loss_b, rtol=2e-2)
    for name, g in grads_a.items():
        assert g.dtype == torch.float32
        ref = grads_b[name]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, name  # bf16 matmuls: ~1e-2 relative


def test_fp32_block_is_bit_for_bit_unchanged(am):
    after, before = lora_block(am, torch.float32, before=False), lora_block(am, torch.float32, before=True)
    before.load_state_dict(after.state_dict())
    loss_a, grads_a = loss_and_grads(am, after, torch.float32)
    loss_b, grads_b = loss_and_grads(am, before, torch.float32)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_estimate_per_token_bytes_are_the_measured_ones(am, dtype, name):
    block = lora_block(am, dtype, before=False)
    measured = am.per_token(block, DIM, HEADS, (1, 3), dtype, "cpu", checkpoint=False)
    s = est.Settings(dtype=name, modules=am.LORA_MODULES, rank=4)
    assert measured == est.block_activation_bytes(s, DIM, FFN)[0]
    if dtype == torch.bfloat16:  # peft's own casting kept an fp32 copy of every distinct LoRA input
        old = am.per_token(lora_block(am, dtype, before=True), DIM, HEADS, (1, 3), dtype, "cpu", checkpoint=False)
        assert old - measured >= 4 * (4 * DIM + FFN)
    kept = am.per_token(block, DIM, HEADS, (1, 3), dtype, "cpu", checkpoint=True)
    assert kept == est.DTYPE_BYTES[name] * DIM  # checkpointing keeps the block's input
