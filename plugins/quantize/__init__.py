"""Quantized base weights (``[plugins.quantize]``), with optimum-quanto.

- ``transformer``: ``"none"`` | ``"qfloat8"`` | ``"qint8"`` | ``"qint4"`` |
  ``"qint4+ara"`` (optimum-quanto) | ``"uint4"`` | ``"uint4+ara"`` (torchao's
  asymmetric group-64 grid, ai-toolkit's: :mod:`.uint4`). Each expert is loaded by :func:`wantrain.loader.load_quantized_expert`:
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
- ``*+ara``: every quantized linear gets a frozen accuracy-recovery
  adapter (``y = Q(W)x + B_ara A_ara x``), from ``ara``: ``"calibrated"``
  (activation-aware, :mod:`.calibrate`: ``ara_samples`` forward passes of
  ``ara_tokens`` tokens), ``"svd"`` (rank ``ara_rank`` truncated SVD of the
  quantization residual, computed while the block loads) -- both cached in
  ``ara_cache`` or next to the model -- or a file in LoRA layout (one file
  with ai-toolkit's ``transformer_1.`` / ``transformer_2.`` names serves
  both experts, else ``{expert}`` in the path becomes ``high_noise`` /
  ``low_noise``; ``hf://org/repo[@rev]/file`` for the hub, fetched at load).
  A file that misses a quantized layer or was made for another grid is an
  error (:class:`.ara.AraPlan`).
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
from . import calibrate, loader, uint4
from wantrain.archs import get as get_arch
from wantrain.errors import ProfileProblem
from wantrain.formats.ara import ara_file_header
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
    #: ``ara = "calibrated"``: forward passes on random latents, and video tokens in each
    ara_samples: int = attrs.field(default=4, validator=positive)
    ara_tokens: int = attrs.field(default=2048, validator=positive)

    @property
    def uses_ara(self) -> bool:
        return self.transformer.endswith("+ara")

    @property
    def ara_file(self) -> bool:
        """``ara`` names a file (a path or ``hf://``), not a method."""
        return self.ara not in COMPUTED


#: ARA sources computed on the user's machine (else ``ara`` is a file)
COMPUTED = ("svd", "calibrated")


def profile_problems(config: Config, profile) -> list[ProfileProblem]:
    """ARA file rules that need no network and no weights: the file exists,
    serves every expert of the arch (``{expert}`` in the path, or one file
    with ``transformer_1.`` / ``transformer_2.`` names) and was made for the
    grid in use. ``hf://`` files are checked when they are fetched, at load."""
    if not config.uses_ara or not config.ara_file or config.ara.startswith("hf://"):
        return []
    where, experts = "plugins.quantize.ara", get_arch(profile.model.arch).experts
    paths = {e: ara_mod.resolve_ara_path(config.ara, e, profile.base_dir) for e in experts}
    problems = []
    for expert, path in paths.items():
        if not path.is_file():
            who = f" for {expert}" if "{expert}" in config.ara else ""
            problems.append(ProfileProblem(where, f"ARA file{who} not found", str(path), 'check the path, or use ara = "calibrated"'))
    if problems:
        return problems
    for path in sorted(set(paths.values())):
        named, meta = ara_file_header(path)
        grid = meta.get("wantrain.ara.grid") or ara_mod.grid_from_name(path.name)
        mine = loader.GRIDS[config.transformer.split("+")[0]]
        if grid is not None and grid != mine:
            problems.append(ProfileProblem(where, f"made for the {grid} grid, not {mine}", str(path),
                                           f'set transformer = "{ara_mod.QTYPE_OF_GRID.get(grid, "?")}+ara" to match it, or use ara = "calibrated"'))
    if "{expert}" not in config.ara and len(experts) > 1:
        named, _ = ara_file_header(paths[experts[0]])
        lacking = [e for e in experts if e not in named]
        if lacking == list(experts):
            problems.append(ProfileProblem(where, "one ARA file without transformer_1. / transformer_2. names cannot serve both experts",
                                           config.ara, "write {expert} where the file names differ (high_noise / low_noise)"))
        elif lacking:
            problems.append(ProfileProblem(where, f"the file has no {' / '.join(lacking)} half (no {'transformer_1' if lacking[0] == 'high_noise' else 'transformer_2'}. names)",
                                           config.ara, "use a file with both experts, or write {expert} in the path"))
    return problems


def ara_plan(config: Config, run, expert: str, subfolder: str) -> ara_mod.AraPlan | None:
    if not config.uses_ara:
        return None
    if config.ara_file:
        path = ara_mod.resolve_ara_path(config.ara, expert, run.profile.base_dir)
        shared = "{expert}" not in config.ara and len(run.arch.experts) > 1
        return ara_mod.AraPlan(config.transformer, config.ara_rank, file=path, expert=expert, shared=shared)
    name = ara_mod.ara_cache_path(run.source, subfolder, config.transformer, config.ara_rank, config.ara).name
    if config.ara_cache:
        cache = run.profile.resolve_path(config.ara_cache) / subfolder / name
    else:
        cache = ara_mod.ara_cache_path(run.source, subfolder, config.transformer, config.ara_rank, config.ara)
    calibration = calibrate.describe(config.ara_samples, config.ara_tokens, CALIBRATION_SEED) if config.ara == "calibrated" else ""
    return ara_mod.AraPlan(config.transformer, config.ara_rank, cache=cache, method=config.ara, calibration=calibration)


#: the calibration inputs are the same for every run (the cache is shared)
CALIBRATION_SEED = 0


def load_expert(config: Config, run, expert: str, subfolder: str):
    """The quantized expert and the ARA plan used (None without ARA)."""
    plan = ara_plan(config, run, expert, subfolder)
    module = loader.load_quantized_expert(
        run.source, subfolder, dtype=run.dtype, qtype=config.transformer, exclude=config.exclude, ara=plan
    )
    if plan is not None and plan.pending:
        log.info("%s: calibrating the ARA of %d layers (%d forward passes on random latents, ~%d tokens each)",
                 expert, len(plan.pending), config.ara_samples, config.ara_tokens)
        inputs = calibrate.calibration_inputs(run, expert, module, config.ara_samples, config.ara_tokens, CALIBRATION_SEED, run.device)
        calibrate.calibrate_ara(module, plan, run.source, subfolder, inputs, run.device)
        plan.finish()
    layers = len(loader.quantized_linears(module))
    source = plan and (plan.file if plan.file is not None else f"{plan.method} rank {config.ara_rank}")
    ara = f", ARA on {plan.attached} ({source})" if plan else ""
    log.info("%s: %d linear layers quantized to %s%s", expert, layers, config.transformer.split("+")[0], ara)
    return module, plan


#: bytes per stored weight: qint4 = 4 bits + a bf16 scale and shift per group
#: of 128; uint4 4 bits + a bf16 scale and a one-byte zero point per group of
#: 64; qint8 and qfloat8 1 byte (+ a per-row scale, negligible)
WEIGHT_BYTES = {"qfloat8": 1.0, "qint8": 1.0, "qint4": 0.5 + 4 / 128, "qint4+ara": 0.5 + 4 / 128,
                "uint4": uint4.BYTES_PER_WEIGHT, "uint4+ara": uint4.BYTES_PER_WEIGHT}


def memory_settings(config: Config) -> dict:
    """``wantrain estimate``'s view of this config."""
    out = {"note": f"transformer {config.transformer}, text encoder {config.text_encoder}"}
    if config.transformer != "none":
        out.update(weight_bytes=WEIGHT_BYTES[config.transformer], weight_format=config.transformer,
                   quantize_exclude=tuple(config.exclude), ara_rank=config.ara_rank if config.uses_ara else 0)
    if config.text_encoder != "none":
        out.update(text_encoder_bytes=WEIGHT_BYTES[config.text_encoder], text_encoder_format=config.text_encoder)
    return out


_LADDER = {None: "qfloat8", "qfloat8": "qint8", "qint8": "uint4+ara", "qint4": "qint4+ara"}


@hookimpl
def memory_remedies(memory):
    """Ever smaller transformer weights, down to uint4 with its calibrated
    ARA (what docs/memory.md measured best at 4 bits)."""
    from wantrain.commands.estimate import Remedy

    out, q = [], memory.weight_format
    while q in _LADDER:
        q = _LADDER[q]
        change = memory_settings(Config(transformer=q))
        change.pop("note")
        ara = ', ara = "calibrated"' if q == "uint4+ara" else ""
        out.append(Remedy(30, f'[plugins.quantize] transformer = "{q}"{ara}', change))
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
    def after_adapters_attached(self):
        uint4.forget_dequantized()  # peft's reads while attaching are over

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
