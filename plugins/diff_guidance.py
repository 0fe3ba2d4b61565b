"""Differential Guidance (``[plugins.diff_guidance]``).

Pushes the training target past the real one, away from what the model
predicts now::

    target' = pred.detach() + scale * (target - pred.detach())

With ``scale = 1`` this is the plain target. With the MSE loss the gradient
with respect to the prediction becomes exactly ``scale`` times the plain one
(``2 (pred - target') = scale * 2 (pred - target)`` because ``pred`` equals
its detached copy in value), so the gradient of every LoRA weight is scaled
by ``scale``. What that means depends on the optimizer:

- SGD-like updates scale with it: like multiplying the learning rate.
- Adam / AdamW / AdamW8bit divide by the running RMS of the gradient, so a
  constant factor almost cancels: the update changes only through epsilon
  (tiny) and through gradient clipping (``[training] max_grad_norm``), which
  now clips ``scale`` times more often. Adafactor normalises likewise.
  The logged ``loss/main`` is ``scale^2`` times the plain MSE.

With ``loss = "huber"`` the identity holds only where the error is below
the Huber delta.

Events: ``compute_target``. Works on its own and with any other plugin
(DOP's preservation loss is not affected).
"""

from __future__ import annotations

import attrs
import torch

from wantrain import hookimpl
from wantrain.profile import positive
from wantrain.run import Run


@attrs.frozen(kw_only=True)
class Config:
    #: how far past the real target to aim (1.0 = off)
    scale: float = attrs.field(default=3.0, validator=positive)


def guided_target(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    anchor = pred.detach()
    return anchor + scale * (target - anchor)


class Plugin:
    def __init__(self, config: Config):
        self.config = config

    @hookimpl
    def compute_target(self, run: Run, pred, target):
        return guided_target(pred, target, self.config.scale)
