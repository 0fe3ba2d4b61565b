"""Differential Output Preservation (``[plugins.dop]``).

Teaches the LoRA the trigger word without changing what the base model does
for the class the trigger belongs to. Each micro-batch, for every sample
whose caption was not dropped:

1. the *class caption*: the caption with the trigger (``[trigger]`` and the
   literal ``job.trigger_word``) replaced by ``preservation_class``
   ("sks dancing" -> "person dancing");
2. ``prior`` = the active expert with its LoRA off (exactly zero), on the class
   caption, same noisy latents and timesteps (no gradient);
3. ``pred_class`` = the same expert with the LoRA on, same inputs;
4. ``loss += multiplier * MSE(pred_class, prior)``, logged as
   ``loss/preservation`` next to ``loss/main``.

Samples whose caption was dropped (caption dropout) are left out: pulling the
LoRA's unconditional output back to the base model would undo what caption
dropout is there to teach. A batch of only dropped captions adds 0.

Cost: one extra no-grad forward and one extra forward+backward per
micro-batch (about 1.7x the step time).

With ``text_cache``: this plugin answers ``caption_variants`` with each
caption's class caption, so the cache encodes it up front with the others;
DOP then works with cached embeddings, also with ``unload = true``.

Requires ``[job] trigger_word`` (checked before anything loads).

Events: ``check_profile``, ``caption_variants``, ``compute_extra_losses``,
``estimate_memory`` (one more forward graph kept for the backward).
"""

from __future__ import annotations

import re

import attrs
import torch

from wantrain import hookimpl
from wantrain.errors import ProfileProblem
from wantrain.profile import non_empty, non_negative
from wantrain.run import Run

TRIGGER = "[trigger]"


@attrs.frozen(kw_only=True)
class Config:
    #: weight of the preservation loss
    multiplier: float = attrs.field(default=1.0, validator=non_negative)
    #: what the trigger word is an instance of ("person", "woman", "dog", "style")
    preservation_class: str = attrs.field(default="person", validator=non_empty)


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    if not profile.job.trigger_word:
        return [ProfileProblem("plugins.dop", "needs job.trigger_word (DOP replaces the trigger by the class)",
                               fix='set [job] trigger_word = "sks"')]
    return []


def class_caption(template: str, trigger_word: str | None, preservation_class: str) -> str:
    """``template`` with ``[trigger]`` (any case) and the literal trigger word
    replaced by ``preservation_class``."""
    text = re.sub(re.escape(TRIGGER), preservation_class, template, flags=re.IGNORECASE)
    if trigger_word:
        text = re.sub(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", preservation_class, text)
    return " ".join(text.split())


def batch_templates(batch) -> list[str | None]:
    """Each sample's caption before trigger substitution, None where dropped
    (from ``batch.captions`` when a batch has no templates: the literal
    trigger word is replaced instead)."""
    templates = getattr(batch, "templates", None)
    if templates is not None:
        return list(templates)
    return [c if c else None for c in batch.captions]


def preservation_loss(run, batch, ctx, config: Config) -> torch.Tensor:
    """``multiplier * MSE(pred_class, prior)`` over the samples that kept their caption."""
    trigger = run.profile.job.trigger_word
    templates = batch_templates(batch)
    keep = [i for i, t in enumerate(templates) if t is not None]
    if not keep:
        return ctx.loss.new_zeros(())
    captions = [class_caption(templates[i], trigger, config.preservation_class) for i in keep]
    index = torch.tensor(keep, device=ctx.noisy.device)
    noisy, timesteps = ctx.noisy.index_select(0, index), ctx.timesteps.index_select(0, index)
    states = run.encode_prompts(captions)
    with torch.no_grad(), run.lora_disabled(ctx.expert):
        prior = run.predict(ctx.expert, noisy, timesteps, states, ctx.cond.select(index))
    pred_class = run.predict(ctx.expert, noisy, timesteps, states, ctx.cond.select(index))
    return config.multiplier * torch.nn.functional.mse_loss(pred_class, prior)


class Plugin:
    def __init__(self, config: Config):
        self.config = config

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @hookimpl
    def caption_variants(self, run: Run, template):
        return [class_caption(template, run.profile.job.trigger_word, self.config.preservation_class)]

    @hookimpl
    def estimate_memory(self):
        # pred_class's graph lives beside the main one until the single backward
        return {"extra_forward_graphs": 1,
                "note": "one more forward graph per step (class prompt, LoRA on): its activations are kept too"}

    @hookimpl
    def compute_extra_losses(self, run: Run, batch, ctx):
        return {"preservation": preservation_loss(run, batch, ctx, self.config)}
