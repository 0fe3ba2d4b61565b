"""Optimizers and LR schedules named in ``[training]``."""

from __future__ import annotations

import torch

from .errors import ProfileError, ProfileProblem


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
            raise ProfileError(ProfileProblem("training.optimizer", f"bitsandbytes is not usable here ({exc})", name, 'use "adamw"')) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(name)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """constant / linear / cosine, each with linear warmup (diffusers' schedules)."""
    from diffusers.optimization import get_scheduler

    kind = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[name]
    return get_scheduler(kind, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)
