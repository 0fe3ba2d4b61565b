"""``ara = "calibrated"``: an activation-aware accuracy-recovery adapter,
computed on the user's machine from the base model.

What a quantized layer gets wrong is ``(W - Q(W)) x`` -- its *output* error
on the inputs it actually sees. Real activations are far from isotropic (a
few channels carry most of the energy; the states live near a low-rank
subspace), so the best rank-``r`` correction is not the SVD of the weight
residual (which treats every input direction alike) but the one that
minimises the output error on those activations. For a layer with input
covariance ``C = E[x x^T] = L L^T`` the distillation objective
``min_{B,A} E||(R - B A) x||^2`` with ``R = W - dequant(Q(W))`` has a
closed-form optimum: the rank-``r`` SVD of ``R L``, mapped back through
``L^{-1}`` (activation-whitened SVD, as in SVD-LLM / ASVD). So "a short
distillation toward the full-precision output" is solved exactly rather
than by gradient steps; ``damp`` (1 % of the mean input variance on the
diagonal, as GPTQ does) keeps it well posed in directions the calibration
never visited.

Calibration activations (decided here, recorded in docs/memory.md): the
expert runs on ``samples`` inputs of pure random latents N(0, 1) at about
``tokens`` video tokens each (3 latent frames, square), timesteps spread
evenly over the expert's own range, and the **real** text states of a fixed
set of generic video prompts from the run's text encoder (the
``encode_prompts`` event: the text cache serves or stores them). Random
latents rather than the dataset's: the adapter is a property of base model
plus grid, shared by every run and cached once next to the model like the
SVD cache (a dataset-dependent adapter would be recomputed per dataset);
the activations inside the blocks are shaped by the model's own norms,
modulation and text projection either way.

The expert is calibrated block by block (as GPTQ does): the inputs of block
0 are captured once, then for each block its quantized layers' input
covariances are gathered, their adapters computed from the full-precision
weights re-read one layer at a time from the checkpoint (a bf16 expert is
never in memory), attached, and the block is run again to give the next
block its inputs. Only one block and the calibration states are on the
device at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch

from . import loader
from .ara import AraPlan, dequantized_weight

log = logging.getLogger("wantrain.quant")

#: generic prompts whose real text states drive the calibration (cross-attention inputs)
PROMPTS = (
    "a woman walking through a busy city street at dusk, handheld camera",
    "close-up of a man smiling, soft window light, shallow depth of field",
    "a red sports car driving along a coastal road, aerial tracking shot",
    "a cat jumping onto a wooden table in a sunny kitchen",
    "waves crashing on rocks under a stormy sky, slow motion",
    "an animated character dancing in a colorful room, studio lighting",
    "a forest path in autumn, leaves falling, the camera moves forward",
    "two people talking in a cafe, cinematic, warm tones",
)
LATENT_FRAMES = 3
DAMP = 0.01


def describe(samples: int, tokens: int, seed: int) -> str:
    """What the cache records about the calibration (a change recomputes)."""
    prompts = hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()[:12]
    return f"random-latents samples={samples} tokens={tokens} seed={seed} damp={DAMP} prompts={prompts}"


@torch.no_grad()
def whitened_ara(residual: torch.Tensor, gram: torch.Tensor, count: int, rank: int, dtype: torch.dtype,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [r, in], up [out, r])`` minimising ``sum ||(R - up down) x||^2``
    over the inputs whose ``sum x x^T`` is ``gram`` (``count`` of them)."""
    cov = gram.double() / max(count, 1)
    cov.diagonal().add_(DAMP * float(cov.diagonal().mean()) + 1e-12)
    chol = torch.linalg.cholesky(cov)
    m = residual.double() @ chol
    rank = min(rank, *m.shape)
    if min(m.shape) <= 1024:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    else:
        with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(m, q=min(rank + 8, *m.shape), niter=4)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    down = torch.linalg.solve_triangular(chol.T, v * root[None, :], upper=True).T
    return down.to(dtype).contiguous(), (u * root[None, :]).to(dtype).contiguous()


def calibration_inputs(run, expert: str, module: torch.nn.Module, samples: int, tokens: int, seed: int,
                       device: torch.device) -> list[dict]:
    """Forward kwargs for the expert: random latents, spread timesteps, real text states."""
    cfg = module.config
    _, ph, pw = cfg.patch_size
    side = max(1, round(math.sqrt(tokens / LATENT_FRAMES)))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(samples)]
    states = run.encode_prompts(prompts).to(device)
    lo, hi = run.expert_range(expert)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(samples):
        latents = torch.randn(1, cfg.in_channels, LATENT_FRAMES, side * ph, side * pw, generator=g)
        t = torch.tensor([lo + (hi - lo) * (i + 0.5) / samples])
        out.append({"hidden_states": latents.to(device, run.dtype), "timestep": t.to(device),
                    "encoder_hidden_states": states[i:i + 1].to(run.dtype)})
    return out


class _Captured(Exception):
    pass


def _block_inputs(module: torch.nn.Module, batch: dict) -> tuple[list, dict]:
    """The positional and keyword arguments the expert hands its first block."""
    seen = {}

    def grab(_mod, args, kwargs):
        seen["args"], seen["kwargs"] = list(args), dict(kwargs)
        raise _Captured

    handle = module.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        module(**batch, return_dict=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def _outside_blocks(module: torch.nn.Module, device) -> None:
    """Move everything but the blocks (embedders, head, module-level tensors)."""
    for name, child in module.named_children():
        if name != "blocks":
            child.to(device)
    for key, p in list(module._parameters.items()):
        if p is not None:
            module._parameters[key] = torch.nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
    for key, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[key] = b.to(device)


@torch.no_grad()
def calibrate_ara(module: torch.nn.Module, plan: AraPlan, source, subfolder: str, inputs: list[dict],
                  device: torch.device) -> None:
    """Compute, attach and record (``plan.computed``) the adapters of
    ``plan.pending``, block by block; ``inputs`` as :func:`calibration_inputs`."""
    pending = set(plan.pending)
    files = loader.tensor_source(source, subfolder)  # Diffusers shards or an original single file, as the loader read them
    home = next(module.buffers()).device
    _outside_blocks(module, device)
    try:
        captured = [_block_inputs(module, batch) for batch in inputs]
    finally:
        _outside_blocks(module, home)
    for i, block in enumerate(module.blocks):
        names = [n for n, _ in block.named_modules() if f"blocks.{i}.{n}" in pending]
        block.to(device)
        if names:
            _calibrate_block(block, i, names, captured, plan, files)
        for args, kwargs in captured:  # the next block's inputs, through this block's corrected layers
            args[0] = block(*args, **kwargs)
        block.to(home)
    plan.pending = []


def _calibrate_block(block, index: int, names: list[str], captured, plan: AraPlan, files) -> None:
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def gather(name):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # fp32 sums; the factorisation runs in fp64
            grams[name] = grams[name] + x.T @ x if name in grams else x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(gather(n)) for n in names]
    try:
        for args, kwargs in captured:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        full = f"blocks.{index}.{n}"
        layer = block.get_submodule(n)
        weight = files.read([f"{full}.weight"])[f"{full}.weight"]
        deq = dequantized_weight(layer)
        residual = weight.to(deq.device).double() - deq.double()
        down, up = whitened_ara(residual, grams.pop(n), counts[n], plan.rank, deq.dtype)
        entry = (down.cpu(), up.cpu(), 1.0)
        plan.computed[full] = entry
        plan.put(layer, full, entry, deq.dtype)
