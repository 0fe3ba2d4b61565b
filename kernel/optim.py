"""Optimizers and LR schedules named in ``[training]``: :mod:`wantrain.optimizers`."""

from .optimizers import build_optimizer, build_scheduler, effective_lr, eval_weights  # noqa: F401
