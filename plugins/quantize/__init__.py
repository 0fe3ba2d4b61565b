"""Quantized base weights (``[plugins.quantize]``), with optimum-quanto.

- ``transformer``: ``"none"`` | ``"qfloat8"`` | ``"qint8"`` | ``"qint4"`` |
  ``"qint4+ara"``. Each expert is loaded by :func:`wantrain.loader.load_quantized_expert`:
  built on the meta device, streamed in one layer at a time and quantized as
  it goes -- a full bf16 expert is never in memory. Only the experts the run
  needs are loaded (the kernel asks for the trained ones, previews for the
  other on first use).
- ``text_encoder``: ``"none"`` | ``"qfloat8"`` | ``"qint8"``, applied on its
  own to the UMT5 encoder's linear layers as soon as it is loaded.
- ``exclude``: fnmatch patterns of module names kept in high precision.
  Default: embeddings, norms, the modulation (time projection) and the
  output head -- in Wan 2.2 that leaves exactly the linear layers of the 40
  blocks quantized.
- ``qint4+ara``: every quantized linear gets a frozen accuracy-recovery
  adapter (``y = Q(W)x + B_ara A_ara x``), from ``ara``: ``"svd"`` (rank
  ``ara_rank`` truncated SVD of the quantization residual, computed while the
  block loads, cached in ``ara_cache`` or next to the model) or a file in
  LoRA layout (ComfyUI or diffusers keys; ``{expert}`` in the path becomes
  ``high_noise`` / ``low_noise``; ``hf://org/repo[@rev]/file`` for the hub).
  The ARA is never trained, never saved into the LoRA files and stays on when
  the trained LoRA is switched off (``run.lora_disabled``).

LoRA on quantized layers: quanto's ``QLinear`` is an ``nn.Linear`` subclass,
so peft wraps it with its ordinary LoRA ``Linear`` (its forward calls the
quantized layer, then adds the adapter); gradients flow to the LoRA and the
input, never to the frozen quantized weight. Gradient checkpointing works on
top (the kernel's ``model.gradient_checkpointing``).

Events: ``check_profile`` (ARA file rules), ``load_expert`` (answers unless
``transformer = "none"``; logs what was quantized and the ARA source),
``after_text_encoder_load``. Settings and measurements: docs/memory.md.
"""

from __future__ import annotations

import logging

import attrs

from wantrain import hookimpl

from . import ara as ara_mod
from . import loader
from wantrain.errors import ProfileProblem
from wantrain.profile import non_empty, one_of, positive
from wantrain.run import Run

log = logging.getLogger("wantrain.quantize")


@attrs.frozen(kw_only=True)
class Config:
    transformer: str = attrs.field(default="qint8", validator=one_of(*loader.TRANSFORMER_QTYPES))
    text_encoder: str = attrs.field(default="none", validator=one_of(*loader.TEXT_ENCODER_QTYPES))
    exclude: tuple[str, ...] = loader.DEFAULT_EXCLUDE
    ara: str = attrs.field(default="svd", validator=non_empty)
    ara_rank: int = attrs.field(default=16, validator=positive)
    ara_cache: str | None = None

    @property
    def uses_ara(self) -> bool:
        return self.transformer.endswith("+ara")


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    problems = []
    if not config.uses_ara or config.ara == "svd":
        return problems
    where = "plugins.quantize.ara"
    if "{expert}" not in config.ara:
        problems.append(ProfileProblem(where, "one ARA file cannot serve both experts", config.ara,
                                       "write {expert} where the file names differ (high_noise / low_noise)"))
    elif not config.ara.startswith("hf://"):
        for expert in ("high_noise", "low_noise"):
            path = ara_mod.resolve_ara_path(config.ara, expert, profile.base_dir)
            if not path.is_file():
                problems.append(ProfileProblem(where, f"ARA file for {expert} not found", str(path), 'check the path, or use ara = "svd"'))
    return problems


def ara_plan(config: Config, run, expert: str, subfolder: str) -> ara_mod.AraPlan | None:
    if not config.uses_ara:
        return None
    if config.ara != "svd":
        path = ara_mod.resolve_ara_path(config.ara, expert, run.profile.base_dir)
        return ara_mod.AraPlan(config.transformer, config.ara_rank, file=path, expert=expert)
    if config.ara_cache:
        name = ara_mod.ara_cache_path(run.source, subfolder, config.transformer, config.ara_rank).name
        cache = run.profile.resolve_path(config.ara_cache) / subfolder / name
    else:
        cache = ara_mod.ara_cache_path(run.source, subfolder, config.transformer, config.ara_rank)
    return ara_mod.AraPlan(config.transformer, config.ara_rank, cache=cache)


def load_expert(config: Config, run, expert: str, subfolder: str):
    """The quantized expert and the ARA plan used (None without ARA)."""
    plan = ara_plan(config, run, expert, subfolder)
    module = loader.load_quantized_expert(
        run.source, subfolder, dtype=run.dtype, qtype=config.transformer, exclude=config.exclude, ara=plan
    )
    layers = len(loader.quantized_linears(module))
    ara = f", ARA on {plan.attached} ({'svd rank %d' % config.ara_rank if plan.file is None else plan.file})" if plan else ""
    log.info("%s: %d linear layers quantized to %s%s", expert, layers, config.transformer.split("+")[0], ara)
    return module, plan


#: bytes per stored weight: qint4 = 4 bits + a bf16 scale and shift per group
#: of 128; qint8 and qfloat8 1 byte (+ a per-row scale, negligible)
WEIGHT_BYTES = {"qfloat8": 1.0, "qint8": 1.0, "qint4": 0.5 + 4 / 128, "qint4+ara": 0.5 + 4 / 128}


def memory_settings(config: Config) -> dict:
    """``wantrain estimate``'s view of this config."""
    out = {"note": f"transformer {config.transformer}, text encoder {config.text_encoder}"}
    if config.transformer != "none":
        out.update(weight_bytes=WEIGHT_BYTES[config.transformer], weight_format=config.transformer,
                   quantize_exclude=tuple(config.exclude), ara_rank=config.ara_rank if config.uses_ara else 0)
    if config.text_encoder != "none":
        out.update(text_encoder_bytes=WEIGHT_BYTES[config.text_encoder], text_encoder_format=config.text_encoder)
    return out


_LADDER = {None: "qfloat8", "qfloat8": "qint8", "qint8": "qint4+ara", "qint4": "qint4+ara"}


@hookimpl
def memory_remedies(memory):
    """Ever smaller transformer weights, down to qint4 with its ARA."""
    from wantrain.commands.estimate import Remedy

    out, q = [], memory.weight_format
    while q in _LADDER:
        q = _LADDER[q]
        change = memory_settings(Config(transformer=q))
        change.pop("note")
        out.append(Remedy(30, f'[plugins.quantize] transformer = "{q}"', change))
    return out


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        #: expert -> the ARA plan used while loading it (what was attached, computed, skipped)
        self.ara_plans: dict[str, ara_mod.AraPlan] = {}

    @hookimpl
    def check_profile(self, profile):
        return profile_problems(self.config, profile)

    @hookimpl
    def load_expert(self, run: Run, expert, subfolder):
        if self.config.transformer == "none":
            return None
        module, plan = load_expert(self.config, run, expert, subfolder)
        if plan is not None:
            self.ara_plans[expert] = plan
        return module

    @hookimpl
    def estimate_memory(self):
        return memory_settings(self.config)

    @hookimpl
    def after_text_encoder_load(self, run: Run, module):
        if self.config.text_encoder == "none":
            return
        n = loader.quantize_module(module, self.config.text_encoder)
        log.info("text encoder: %d linear layers quantized to %s", n, self.config.text_encoder)
