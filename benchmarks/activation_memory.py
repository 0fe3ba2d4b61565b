"""Bytes autograd saves for backward per video token in one Wan block at A14B
width (dim 5120, 40 heads, ffn 13824), bf16, rank-16 LoRA on the ten usual
linears -- before (peft's default: the fp32 LoRA casts each targeted layer's
input to fp32 and keeps that copy) and after (the adapter computed in the
block's dtype, :mod:`wantrain.adapters.compute`), with and without gradient
checkpointing.

    python benchmarks/activation_memory.py [--frames 1 4]

Counting: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor a
forward saves; each storage is counted once (the frozen layer and lora_A keep
the same input). The block runs at two token counts with the same 512 text
tokens; the difference divided by the token difference is the per-video-token
figure (weights, text and constants cancel). With checkpointing (reentrant,
so the saved inputs pass the hooks) a block keeps only its input; during
backward one block at a time recomputes and keeps the no-checkpointing set.
It runs on the CPU: on the ``meta`` device sdpa takes its math path, which
keeps the attention probabilities, and the figure would be ~60 % too high.
"""

from __future__ import annotations

import argparse
import sys

import torch

A14B = dict(dim=5120, ffn=13824, heads=40)
LORA_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def make_block(dim: int, ffn: int, heads: int, dtype: torch.dtype, device: str, seed: int = 0):
    """One ``WanTransformerBlock`` as the A14B builds it (cross-attention norm, rms qk norm), random weights."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    with torch.device("meta"):
        block = WanTransformerBlock(dim, ffn, heads, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
    block = block.to_empty(device=device).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    for p in block.parameters():
        if device != "meta":
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return block


def inputs(dim: int, heads: int, frames: int, dtype: torch.dtype, device: str, side: int = 16, text: int = 512,
           seed: int = 1):
    """(hidden_states, encoder_hidden_states, temb, rotary) for a ``frames`` x side x side latent (patch 1x2x2)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    gen = torch.Generator().manual_seed(seed)
    tokens = frames * (side // 2) ** 2
    rope = WanRotaryPosEmbed(dim // heads, (1, 2, 2), 1024)
    rotary = rope(torch.zeros(1, 16, frames, side, side))
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return (rnd(1, tokens, dim), rnd(1, text, dim), rnd(1, 6, dim) * 0.1,
            tuple(r.to(device) for r in rotary)), tokens


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves while ``fn(*args)`` runs forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen.setdefault(storage._cdata, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return sum(seen.values())


def attach(block, rank: int, before: bool) -> None:
    """Rank-``rank`` LoRA as wantrain attaches it; ``before``: peft's own input casting, as before the change."""
    from peft.tuners.lora import LoraLayer

    from wantrain.lora import attach_lora

    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([block])  # the adapter targets blocks.<i>.<path>
    attach_lora(holder, rank, float(rank), LORA_MODULES, seed=0)
    if before:
        for layer in block.modules():
            if isinstance(layer, LoraLayer):
                layer.cast_input_dtype_enabled = True
                for m in (*layer.lora_A.values(), *layer.lora_B.values()):
                    m.__class__ = torch.nn.Linear


def per_token(block, dim, heads, frames: tuple[int, int], dtype, device, checkpoint: bool) -> float:
    """Saved bytes per video token of ``block`` (difference over two token counts)."""
    figures = []
    for f in frames:
        (h, e, t, rot), tokens = inputs(dim, heads, f, dtype, device)
        h.requires_grad_(True)
        if checkpoint:
            run = lambda h, e, t: torch.utils.checkpoint.checkpoint(block, h, e, t, rot, use_reentrant=True)  # noqa: E731
        else:
            run = lambda h, e, t: block(h, e, t, rot)  # noqa: E731
        figures.append((tokens, saved_bytes(run, h, e, t)))
    (t1, b1), (t2, b2) = figures
    return (b2 - b1) / (t2 - t1)


def measure(dim: int, ffn: int, heads: int, frames=(1, 4), dtype=torch.bfloat16, device="cpu", rank: int = 16) -> dict:
    """{(before|after, checkpointing): bytes per video token} for one block."""
    out = {}
    for label in ("before", "after"):
        block = make_block(dim, ffn, heads, dtype, device)
        block.requires_grad_(False)
        attach(block, rank, before=label == "before")
        for ckpt in (False, True):
            out[label, ckpt] = per_token(block, dim, heads, frames, dtype, device, ckpt)
        del block
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs=2, default=(1, 4), help="latent frames of the two runs (64 tokens each)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    m = measure(**A14B, frames=tuple(args.frames), device="cpu", rank=args.rank)
    from wantrain.commands import estimate as est

    s = est.Settings(dtype="bf16", modules=LORA_MODULES, rank=args.rank)
    formula = est.block_activation_bytes(s, A14B["dim"], A14B["ffn"])[0]
    print(f"one Wan block at A14B width (dim {A14B['dim']}, ffn {A14B['ffn']}, {A14B['heads']} heads), bf16, "
          f"rank-{args.rank} LoRA on {len(LORA_MODULES)} linears, {args.frames[0] * 64}/{args.frames[1] * 64} video tokens")
    print(f"{'':28}{'before':>14}{'after':>14}{'change':>9}")
    for ckpt, name in ((False, "no checkpointing"), (True, "checkpointing (kept)")):
        b, a = m["before", ckpt], m["after", ckpt]
        print(f"{name:28}{b:>12.0f} B{a:>12.0f} B{(a - b) / b:>+9.1%}")
    print("checkpointing, during backward: one block at a time recomputes and keeps the no-checkpointing set "
          "(not measured separately)")
    print(f"wantrain estimate's per-token figure: {formula:.0f} B ({(formula - m['after', False]) / m['after', False]:+.1%} "
          "of the measured 'after')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
