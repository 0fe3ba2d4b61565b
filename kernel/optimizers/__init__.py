"""Optimizers and LR schedules named in ``[training]``.

``optimizer`` is one of :data:`NAMES` or any importable class written
``"module:Class"`` (a ``torch.optim.Optimizer``); ``optimizer_args`` are its
keyword arguments, over the defaults below. The profile is checked against
the class's signature before any weight loads: an unknown class or argument
is one line. Every optimizer's state (prodigy's ``d``, schedule-free's ``z``
and weight sum, CAME's factored moments) lives in its ``state_dict`` and
param groups, which the resume checkpoint holds whole, so each resumes
bit-exactly. docs/optimizers.md has the recommended settings.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
from typing import Any, Iterator

import torch

from ..errors import ProfileError, ProfileProblem

log = logging.getLogger("wantrain")

NAMES = ("adamw", "adamw8bit", "adafactor", "prodigy", "came", "adamw_schedulefree")
#: what each extra name is: (module, class, defaults over the class's own)
CLASSES = {
    # prodigy: the author's recommendations for diffusion fine-tuning (README of prodigyopt)
    "prodigy": ("prodigyopt", "Prodigy", {"use_bias_correction": True, "safeguard_warmup": True}),
    "came": ("came_pytorch", "CAME", {}),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", {}),
}
_FIX = "use " + ", ".join(map(repr, NAMES)) + ', or "module:Class" (e.g. "torch.optim:SGD")'


def resolve(name: str) -> tuple[type, dict[str, Any]]:
    """The optimizer class of ``name`` and the defaults wantrain sets for it
    (ImportError / AttributeError when a "module:Class" is not there)."""
    if name == "adamw":
        return torch.optim.AdamW, {}
    if name == "adafactor":
        return torch.optim.Adafactor, {}
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit, {}
    module, cls, defaults = CLASSES[name] if name in CLASSES else (*name.split(":"), {})
    return getattr(importlib.import_module(module), cls), dict(defaults)


def problems(training) -> list[ProfileProblem]:
    """``training.optimizer`` / ``optimizer_args`` checked against the class
    (one line each), and the schedule a schedule-free optimizer needs."""
    name, args = training.optimizer, dict(training.optimizer_args)
    try:
        cls, _ = resolve(name)
    except (ImportError, AttributeError, ValueError) as exc:
        return [ProfileProblem("training.optimizer", f"cannot be imported ({type(exc).__name__}: {exc})", name, _FIX)]
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return [ProfileProblem("training.optimizer", "is not a torch.optim.Optimizer class", name, _FIX)]
    out = []
    taken = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in taken.values()):
        for key in args:
            if key not in taken or key in ("self", "params"):
                close = difflib.get_close_matches(key, [k for k in taken if k not in ("self", "params")], n=1)
                fix = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(k for k in taken if k not in ("self", "params"))
                out.append(ProfileProblem(f"training.optimizer_args.{key}", f"is not an argument of {cls.__name__}",
                                          args[key], fix))
    for key in ("lr", "weight_decay"):
        if key in args:
            out.append(ProfileProblem(f"training.optimizer_args.{key}", f"is set by training.{key}", args[key],
                                      f"write training.{key} instead"))
    if is_schedule_free(cls) and (training.lr_scheduler != "constant" or training.warmup_steps):
        out.append(ProfileProblem("training.lr_scheduler", "a schedule-free optimizer takes no schedule",
                                  training.lr_scheduler, 'use lr_scheduler = "constant", warmup_steps = 0 '
                                  "(optimizer_args.warmup_steps warms it up)"))
    return out


def is_schedule_free(cls_or_optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences: train and eval modes."""
    cls = cls_or_optimizer if isinstance(cls_or_optimizer, type) else type(cls_or_optimizer)
    return hasattr(cls, "eval") and hasattr(cls, "train") and "schedulefree" in cls.__module__


def build_optimizer(name: str, params: list, lr: float, weight_decay: float,
                    args: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (tensors or param groups); a refused
    argument value is one line (ProfileError)."""
    cls, defaults = resolve(name)
    kwargs = {**defaults, **(args or {})}
    if name == "prodigy" and lr != 1.0:
        log.warning("prodigy: training.lr = %g multiplies the step size Prodigy estimates; 1.0 is the recommended "
                    "value (docs/optimizers.md)", lr)
    try:
        optimizer = cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:  # CAME checks its arguments with assert
        why = str(exc) or "an argument is out of its range"
        raise ProfileError(ProfileProblem("training.optimizer_args", f"refused by {cls.__name__} ({why})",
                                          dict(args or {}), "see its documentation; docs/optimizers.md")) from None
    if is_schedule_free(optimizer):
        optimizer.train()
    return optimizer


def effective_lr(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    """The step size the group holding ``params`` takes now: Prodigy's
    ``d * lr`` (its lr is a constant multiplier), schedule-free's warmed-up
    lr, else the group's lr."""
    first = params[0] if params else None
    group = next((g for g in optimizer.param_groups if any(p is first for p in g["params"])), optimizer.param_groups[0])
    lr = float(group.get("scheduled_lr") or group["lr"])
    return lr * float(group["d"]) if "d" in group and "d0" in group else lr


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """The weights to save or evaluate: a schedule-free optimizer's averaged
    sequence (its eval mode); the training weights come back bit for bit
    afterwards (copied, not recomputed), so saving never changes the run."""
    if optimizer is None or not is_schedule_free(optimizer) or not optimizer.param_groups[0].get("train_mode"):
        yield
        return
    saved = [(p, p.detach().clone()) for g in optimizer.param_groups for p in g["params"]]
    optimizer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, data in saved:
                p.copy_(data)
        for group in optimizer.param_groups:
            group["train_mode"] = True


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """constant / linear / cosine, each with linear warmup (diffusers' schedules)."""
    from diffusers.optimization import get_scheduler

    kind = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[name]
    return get_scheduler(kind, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)





def regroup(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A checkpoint's optimizer state fitted to ``optimizer``'s param groups:
    checkpoints from before one group per expert hold a single group over the
    same parameters in the same order, split here group by group (the
    per-parameter state is keyed by position and stays as it is)."""
    groups = saved.get("param_groups", [])
    if len(groups) != 1 or len(optimizer.param_groups) == 1:
        return saved
    ids, out, start = list(groups[0]["params"]), [], 0
    for group in optimizer.param_groups:
        n = len(group["params"])
        out.append({**groups[0], **{k: v for k, v in group.items() if k == "expert"}, "params": ids[start:start + n]})
        start += n
    return {**saved, "param_groups": out} if start == len(ids) else saved
