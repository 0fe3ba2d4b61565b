"""Flow-matching math (rectified flow, as Wan 2.2 was trained).

t lives in [0, 1000]; sigma = t / 1000 is the noise level.

    x_t    = (1 - sigma) * x0 + sigma * noise
    target = noise - x0                    (the velocity the model predicts)
    model timestep input = t = sigma * 1000

Routing: t >= boundary * 1000 -> high-noise expert, else low-noise.
"""

from __future__ import annotations

import torch

T_MAX = 1000.0


def expert_range(expert: str, boundary: float) -> tuple[float, float]:
    """[lo, hi) in t space for ``expert`` (high noise includes 1000; a
    single-expert model's one expert covers all of [0, 1000])."""
    cut = boundary * T_MAX
    if expert not in ("high_noise", "low_noise"):
        return (0.0, T_MAX)
    return (cut, T_MAX) if expert == "high_noise" else (0.0, cut)


def expert_for(t: float, boundary: float) -> str:
    return "high_noise" if t >= boundary * T_MAX else "low_noise"


def uniform_timesteps(expert: str, boundary: float, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    lo, hi = expert_range(expert, boundary)
    return lo + (hi - lo) * torch.rand(batch_size, generator=generator)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sigma = (t / T_MAX).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", weight: torch.Tensor | None = None) -> torch.Tensor:
    """Loss in fp32, mean over every element (``weight``: broadcastable 0/1
    mask, mean over the weighted elements -- TI2V's clean start frame is left out)."""
    pred, target = pred.float(), target.float()
    if weight is None:
        if kind == "huber":
            return torch.nn.functional.huber_loss(pred, target, delta=1.0)
        return torch.nn.functional.mse_loss(pred, target)
    if kind == "huber":
        each = torch.nn.functional.huber_loss(pred, target, delta=1.0, reduction="none")
    else:
        each = (pred - target) ** 2
    weight = weight.to(each).expand_as(each)
    return (each * weight).sum() / weight.sum().clamp_min(1.0)
