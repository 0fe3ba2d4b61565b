"""LoRA adapters on the experts: attach with peft, read and load their
weights, and start from an existing LoRA (``[target] init_from``).

Inside wantrain an adapter's tensors are named as the expert's modules in
diffusers (``blocks.0.attn1.to_q.lora_A.weight``); the forward scale of a
module is alpha / rank. File layouts (ours: ComfyUI, one file per expert;
diffusers; kohya; diffusion-pipe; ai-toolkit) are :mod:`wantrain.formats`'s.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterable, Mapping

import torch

from . import adapters
from .archs.checks import rank_problem
from .errors import ProfileProblem, WantrainError
from .formats.lora import LoraWeights, block_kind, read_expert_file, read_lora_sources, unreadable

log = logging.getLogger("wantrain")

ADAPTER = "default"


def target_regex(modules: Iterable[str]) -> str:
    alternatives = "|".join(re.escape(m) for m in modules)
    return rf"blocks\.\d+\.({alternatives})"


def attach_lora(module: torch.nn.Module, rank: int, alpha: float, modules: Iterable[str], seed: int) -> list[torch.nn.Parameter]:
    """Add one LoRA adapter (fp32 weights) to a frozen expert; return its parameters.

    Initialisation is seeded (``seed``) and independent of the global RNG.
    """
    from peft import LoraConfig, inject_adapter_in_model

    check_rank(module, rank, modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_regex(modules), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return adapters.compute_in_input_dtype(module, adapters.fp32_master_weights(module))  # bf16 matmuls, fp32 weights


def attach_target(module: torch.nn.Module, target, seed: int) -> list[torch.nn.Parameter]:
    """``[target]``'s adapter: plain LoRA by :func:`attach_lora` (its draws and bytes never move), DoRA / LoKr / LoHa by peft."""
    if target.type == "lora":
        return attach_lora(module, target.rank, target.alpha, target.modules, seed)
    if target.type != "lokr":
        check_rank(module, target.rank, target.modules)
    return adapters.attach(module, target.type, target.rank, target.alpha, target_regex(target.modules), seed,
                           lokr_factor=target.lokr_factor, lokr_full_rank=target.lokr_full_rank)


def check_rank(module: torch.nn.Module, rank: int, modules: Iterable[str]) -> None:
    """``rank`` no wider than the narrowest targeted layer (WantrainError), before peft allocates anything."""
    pattern = re.compile(target_regex(modules))
    widths = {name: min(m.in_features, m.out_features) for name, m in module.named_modules()
              if pattern.fullmatch(name) and hasattr(m, "in_features") and hasattr(m, "out_features")}
    narrowest = min(widths, key=widths.get, default=None)
    if narrowest is not None and rank > widths[narrowest]:
        raise WantrainError(rank_problem(rank, narrowest, widths[narrowest]))


def lora_layers(module: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def lora_disabled(module: torch.nn.Module):
    """Run ``module`` as if the trained adapter were absent.

    The adapter's scale is set to 0 (exactly zero contribution) rather than
    peft's ``disable_adapters``, so frozen adapters living beside it (the
    accuracy-recovery adapter of 4-bit experts) stay on, and no
    ``requires_grad`` flag is touched.
    """
    saved, dora = [], [(layer, layer._active_adapter) for layer in adapters.dora_layers(module)]
    for _, layer in adapters.adapter_layers(module):
        if ADAPTER in layer.scaling:
            saved.append((layer, layer.scaling[ADAPTER]))
            layer.scaling[ADAPTER] = 0.0
    for layer, active in dora:  # DoRA's magnitude rescales W even at scale 0: leave the adapter out
        layer._active_adapter = [a for a in layer.active_adapters if a != ADAPTER]
    try:
        yield module
    finally:
        for layer, scale in saved:
            layer.scaling[ADAPTER] = scale
        for layer, active in dora:
            layer._active_adapter = active


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"blocks.{i}.{path}.lora_A.weight": tensor, ...}`` in diffusers naming, fp32
    (other types: :func:`wantrain.adapters.state`'s names)."""
    return adapters.state(module)


def load_lora_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy diffusers-named adapter tensors into the attached adapter (shapes must match)."""
    adapters.load_state(module, dict(state))


def _check_layers(module: torch.nn.Module, w: LoraWeights, where: str) -> None:
    """Every module of ``w`` must be a layer of ``module``: none -> the file is
    not for this model; some -> it does not fit."""
    layers = {name for name, _ in module.named_modules()}
    missing = [name for name in w.modules if name not in layers]
    if len(missing) == len(w.modules):
        raise unreadable(w.source or where, "its modules apply to none of this model's layers", got=missing[0])
    if missing:
        raise WantrainError(ProfileProblem(
            where, f"does not fit this model: {missing[0]} is not one of its layers ({len(missing)} of "
            f"{len(w.modules)} modules)", w.source, "use a LoRA trained for Wan 2.2 A14B (or the same model)"))


def attach_weights(module: torch.nn.Module, weights: LoraWeights, seed: int = 0) -> list[torch.nn.Parameter]:
    """Attach a LoRA of the file's rank to ``module`` holding ``weights``, each
    module at its own scale (its alpha / rank); modules the file lacks add 0."""
    where = weights.source or "LoRA"
    _check_layers(module, weights, where)
    if weights.type != "lora":
        return adapters.attach_file(module, weights, target_regex(sorted({block_kind(n) for n in weights.modules})), seed)
    if len(weights.ranks) != 1:
        raise WantrainError(ProfileProblem(where, "mixes LoRA ranks", weights.ranks, "use a file with one rank"))
    rank = weights.ranks[0]
    kinds = sorted({block_kind(name) for name in weights.modules})
    params = attach_lora(module, rank, next(iter(weights.alphas.values())), kinds, seed=seed)
    load_lora_state(module, weights.state())
    for name, layer in lora_layers(module):
        if name in weights.alphas:
            layer.scaling[ADAPTER] = weights.alphas[name] / rank
    return params


def fit_to_target(w: LoraWeights, target, where: str = "target.init_from") -> dict[str, torch.Tensor]:
    """Check rank and modules against ``[target]``; fp32 tensors at ``target.alpha``."""
    problems = adapters.target_problems(w, target, where)
    if w.ranks != [target.rank] and not problems and not (target.type == "lokr" and target.lokr_full_rank):
        problems.append(ProfileProblem(where, f"has rank {', '.join(map(str, w.ranks))}, target.rank is {target.rank}",
                                       fix=f"set target.rank = {w.ranks[0]}" if len(w.ranks) == 1 else ""))
    extra = sorted({block_kind(n) for n in w.modules} - set(target.modules))
    if extra:
        problems.append(ProfileProblem(where, "holds weights for modules target.modules does not list", extra,
                                       "add them to target.modules"))
    if problems:
        raise WantrainError(problems)
    return w.delta_state(target.alpha)


def load_init_from(run) -> None:
    """``[target] init_from``: copy an existing LoRA (any layout
    :func:`wantrain.formats.lora.read_lora_sources` reads) into the freshly
    attached adapters (before ``after_adapters_attached``; a resumed run then
    overwrites them)."""
    value = run.profile.target.init_from
    if not value:
        return
    if isinstance(value, str):
        path = run.profile.resolve_path(value)
        sources = read_lora_sources(path, run.trained, where="target.init_from", arch=run.arch)
    else:  # {high_noise = "...", low_noise = "..."}
        path = "the init_from table"
        sources = {e: read_expert_file(run.profile.resolve_path(v), e, f"target.init_from.{e}", run.arch)
                   for e, v in value.items() if e in run.trained}
    for expert in run.trained:
        w = sources.get(expert)
        if w is None:
            log.warning("init_from: %s holds no %s weights; that expert starts fresh", path, expert)
            continue
        if w.skipped:
            log.warning("init_from: ignoring %d tensors wantrain does not train (e.g. %s)", len(w.skipped), w.skipped[0])
        _check_layers(run.experts[expert], w, "target.init_from")
        state = fit_to_target(w, run.target(expert))
        load_lora_state(run.experts[expert], state)
        log.info("init_from: %s starts from %s (%s layout, %d modules)", expert, w.source or path, w.layout, len(w.modules))
