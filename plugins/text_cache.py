"""Cache Text Embeddings / Unload TE (``[plugins.text_cache]``).

UMT5-XXL is ~11 GB in bf16 and only turns captions into vectors. This
plugin encodes every prompt the run will need **once**, keeps the states on
disk and in host memory, and then takes the encoder off the device:

- at ``on_run_start`` it gathers every dataset caption (trigger word filled
  in), the empty caption when any dataset has ``caption_dropout > 0``, and
  each caption's *variants* that other plugins announce through
  ``caption_variants`` (DOP: the class caption); prompts other plugins
  encoded in their own ``on_run_start`` (preview prompts) are cached too;
- each prompt's states are stored as ``<folder>/<key>.safetensors`` (tensor
  ``states``, trailing padding trimmed, model dtype), ``key`` = sha256 of the
  encoder's identity and the text; the identity covers the model
  (``name_or_path`` with revision), ``max_sequence_length``, dtype, the
  encoder's config and its module classes (so a quantized encoder gets its
  own entries). A file for the same prompt and encoder is reused by later
  runs that point ``folder`` at the same place;
- afterwards ``encode_prompts`` answers from the cache. With ``unload =
  false`` the encoder moves to CPU memory (a prompt seen for the first time
  -- a new preview prompt -- is still encoded there, then cached). With
  ``unload = true`` the encoder is deleted.

``unload = true`` is AI Toolkit's "Unload TE": **trigger-word-only
training**. Every training caption is replaced by the trigger word alone
(``""`` when no trigger word is set); dropped captions stay ``""``; variants
follow (DOP's class caption becomes ``preservation_class`` alone);
regularization datasets keep their own captions. Your captions are then
ignored -- use it for a single-concept LoRA when even a cached encoder does
not fit, not when captions carry information. A prompt nobody encoded before
the unload (a new preview prompt) is an error that says so. Plain caching
(``unload = false``) trains on the full captions with the very states the
encoder gives (checked bit for bit on CPU).

Events: ``on_run_start`` (``trylast``: after other plugins' ``on_run_start``
so their prompts are cached before the encoder goes), ``encode_prompts``.
Reads ``run.data`` (dataset caption templates) and ``caption_variants``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable

import attrs
import torch
from safetensors import safe_open

from wantrain import distributed, hookimpl, model
from wantrain.errors import WantrainError
from wantrain.formats import sources
from wantrain.formats.safetensors import write_atomic
from wantrain.run import Run

log = logging.getLogger("wantrain.text_cache")

TRIGGER = "[trigger]"
ENCODE_BATCH = 8


@attrs.frozen(kw_only=True)
class Config:
    #: where the embeddings live; default "<output_dir>/cache/text_embeddings"
    folder: str | None = None
    #: "Unload TE": train on the trigger word only and delete the text encoder
    unload: bool = False


# ---------------------------------------------------------------- identity and storage


def encoder_identity(run) -> str:
    """Hash of what decides the text states besides the text."""
    encoder = run.text_encoder
    config = encoder.config.to_dict() if hasattr(encoder, "config") else {}
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path"):
        config.pop(volatile, None)
    spec = run.profile.model.name_or_path
    local = Path(spec).expanduser()
    payload = {
        "model": str(local.resolve()) if local.exists() else spec,
        "max_sequence_length": run.profile.model.max_sequence_length,
        "dtype": run.profile.model.dtype,
        "encoder": type(encoder).__name__,
        "config": config,
        "modules": sorted({type(m).__qualname__ for m in encoder.modules()}),
    }
    single = sources.source_identity(getattr(run, "source", None), "text_encoder")
    if single:  # [model] text_encoder = a single file: keyed by that file, not name_or_path
        payload["model"] = single
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def prompt_key(identity: str, text: str) -> str:
    return hashlib.sha256(f"{identity}\0{text}".encode()).hexdigest()


def trim(states: torch.Tensor) -> torch.Tensor:
    """``[L, D]`` without the all-zero padding rows at the end (at least one row)."""
    nonzero = states.abs().amax(dim=-1) > 0
    length = int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 1
    return states[:length].contiguous()


def pad(states: torch.Tensor, length: int) -> torch.Tensor:
    out = states.new_zeros((length, states.shape[-1]))
    out[: min(length, states.shape[0])] = states[:length]
    return out


class Store:
    """Trimmed states on disk (one safetensors file per prompt) and in memory."""

    def __init__(self, folder: Path, identity: str, max_length: int):
        self.folder, self.identity, self.max_length = folder, identity, max_length
        self.memory: dict[str, torch.Tensor] = {}
        self.encoded = 0  # prompts encoded by this run (the rest came from disk)

    def path(self, text: str) -> Path:
        return self.folder / f"{prompt_key(self.identity, text)}.safetensors"

    def get(self, text: str) -> torch.Tensor | None:
        if text in self.memory:
            return self.memory[text]
        path = self.path(text)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as fh:
            states = fh.get_tensor("states")
        self.memory[text] = states
        return states

    def put(self, text: str, states: torch.Tensor) -> None:
        trimmed = trim(states.detach().cpu())
        meta = {"text": text, "identity": self.identity}
        write_atomic({"states": trimmed}, self.path(text), meta)
        self.memory[text] = trimmed
        self.encoded += 1

    def stack(self, texts: list[str], device, dtype) -> torch.Tensor:
        return torch.stack([pad(self.memory[t], self.max_length) for t in texts]).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- the prompts a run needs


def dataset_templates(data) -> list[tuple[str, bool, bool]]:
    """``(template, caption dropout in its dataset, regularization)`` for every
    distinct caption template of the run's datasets."""
    seen: dict[tuple[str, bool], bool] = {}
    for ds in getattr(data, "datasets", ()):
        key_reg = bool(ds.config.is_regularization)
        for item in ds.items:
            key = (item.template, key_reg)
            seen[key] = seen.get(key, False) or ds.config.caption_dropout > 0
    return [(template, dropout, reg) for (template, reg), dropout in seen.items()]


def final_caption(template: str, trigger_word: str | None) -> str:
    return template.replace(TRIGGER, trigger_word or "")


def plan_prompts(run, unload: bool) -> tuple[list[str], dict[str, str]]:
    """(prompts to encode, aliases). Aliases map a prompt the loop will ask
    for to the prompt whose states answer it: with ``unload``, each training
    caption (and its variants) -> the trigger word alone (and its variants).
    Regularization captions keep their own text."""
    trigger = run.profile.job.trigger_word
    prompts: dict[str, None] = {}
    aliases: dict[str, str] = {}
    lone = final_caption(TRIGGER, trigger)  # the caption of trigger-word-only training
    lone_variants = _variants(run, TRIGGER) if unload else []
    for template, dropout, regularization in dataset_templates(run.data):
        caption, variants = final_caption(template, trigger), _variants(run, template)
        if dropout:
            prompts[""] = None
        if unload and not regularization:
            aliases[caption] = lone
            aliases.update(zip(variants, lone_variants))
        else:
            prompts[caption] = None
            prompts.update(dict.fromkeys(variants))
    if unload:
        prompts[lone] = None
        prompts.update(dict.fromkeys(lone_variants))
    return list(prompts), aliases


def _variants(run, template: str) -> list[str]:
    return [v for found in run.pm.hook.caption_variants(run=run, template=template) for v in (found or [])]


# ---------------------------------------------------------------- the plugin


class Plugin:
    def __init__(self, config: Config):
        self.config = config
        self.store: Store | None = None
        self.aliases: dict[str, str] = {}
        self.unloaded = False

    @hookimpl
    def estimate_memory(self):
        unload = self.config.unload
        return {"text_states_cached": True, "text_encoder_unloaded": unload,
                "note": "text states cached before training; the encoder leaves the GPU" + (" and is unloaded" if unload else "")}

    def _open(self, run) -> Store:
        if self.store is None:
            folder = run.profile.resolve_path(self.config.folder) if self.config.folder else run.output_dir / "cache" / "text_embeddings"
            self.store = Store(folder, encoder_identity(run), run.profile.model.max_sequence_length)
        return self.store

    def _encode_missing(self, run, texts: Iterable[str]) -> None:
        store = self._open(run)
        missing = [t for t in dict.fromkeys(texts) if store.get(t) is None]
        if missing and run.text_encoder is None:
            raise WantrainError(f"text_cache: the text encoder was unloaded (unload = true) before {missing[0]!r} "
                                "was encoded; encode such prompts in on_run_start, or set unload = false")
        p = run.profile.model
        if missing:
            run.pm.hook.on_progress(run=run, task="caching text states", done=0, total=len(missing))
        for i in range(0, len(missing), ENCODE_BATCH):
            chunk = missing[i : i + ENCODE_BATCH]
            states = model.encode_text(run.tokenizer, run.text_encoder, chunk, p.max_sequence_length, "cpu", run.dtype)
            for text, s in zip(chunk, states):
                store.put(text, s)
            run.pm.hook.on_progress(run=run, task="caching text states", done=i + len(chunk), total=len(missing))

    @hookimpl(trylast=True)  # after every other plugin's on_run_start (e.g. `sample` encoding its prompts)
    def on_run_start(self, run):
        prompts, self.aliases = plan_prompts(run, self.config.unload)
        self._encode_missing(run, distributed.my_share(prompts))  # torchrun: each rank encodes its share,
        distributed.barrier()
        self._encode_missing(run, prompts)  # then reads the others' from the folder (alone: nothing left to do)
        store = self._open(run)
        log.info("text_cache: %d prompts ready (%d encoded now, the rest from %s)", len(store.memory), store.encoded, store.folder)
        if self.config.unload:
            run.text_encoder = None
            self.unloaded = True
            gc.collect()
            log.info("text_cache: text encoder unloaded; training on the trigger word only")
        elif run.device.type != "cpu":
            run.text_encoder.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @hookimpl
    def encode_prompts(self, run: Run, prompts):
        texts = [self.aliases.get(p, p) for p in prompts]
        self._encode_missing(run, texts)
        return self.store.stack(texts, run.device, run.dtype)


@hookimpl
def memory_remedies(memory):
    from wantrain.commands.estimate import Remedy

    if memory.text_states_cached:
        return []
    return [Remedy(10, 'enable the "text_cache" plugin (text encoder off the GPU after caching)', {"text_states_cached": True})]
