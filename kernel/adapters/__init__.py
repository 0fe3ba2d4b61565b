"""The adapter types of ``[target] type`` other than plain LoRA -- DoRA,
LoKr, LoHa -- attached with peft, and their tensors in the kernel's names.

Plain LoRA keeps its own path (:func:`wantrain.lora.attach_lora`): the
default type's parameters, initial random draws and files must not move by a
bit when other types are added. Every type is attached as peft's adapter
``"default"``; its tensors are named as peft names its parameters with the
adapter name left out (``blocks.0.attn1.to_q.lokr_w1``,
``blocks.0.attn1.to_q.lora_magnitude_vector.weight``), which is also the name
the EMA plugin keys its shadow by. The math of each type, and how a file
holds it, are in :mod:`wantrain.formats.lycoris`.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

from .compute import compute_in_input_dtype, fp32_master_weights  # noqa: F401  (plain LoRA's compute dtype)

ADAPTER = "default"
TYPES = ("lora", "dora", "lokr", "loha")
#: peft's LoKr keeps w2 a full matrix when r >= half its largest side; this r
#: (with alpha = r, scale 1) asks for that on every layer (``lokr_full_rank``)
FULL_RANK = 1 << 30


def peft_config(kind: str, rank: int, alpha: float, regex: str, *, lokr_factor: int = -1,
                lokr_full_rank: bool = False):
    """The peft config of one adapter type (``lora`` included: LoraConfig)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=regex, init_lora_weights=True,
                          use_dora=kind == "dora")
    if kind == "lokr":
        r, a = (FULL_RANK, FULL_RANK) if lokr_full_rank else (rank, alpha)
        return LoKrConfig(r=r, alpha=a, target_modules=regex, decompose_factor=lokr_factor, init_weights=True)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=regex, init_weights=True)
    raise ValueError(kind)


def attach(module: torch.nn.Module, kind: str, rank: int, alpha: float, regex: str, seed: int, *,
           lokr_factor: int = -1, lokr_full_rank: bool = False) -> list[torch.nn.Parameter]:
    """Add one adapter of ``kind`` (fp32, seeded init independent of the global
    RNG) to a frozen expert; return its trainable parameters in module order."""
    from peft import inject_adapter_in_model

    config = peft_config(kind, rank, alpha, regex, lokr_factor=lokr_factor, lokr_full_rank=lokr_full_rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    params = []
    for _, layer in adapter_layers(module):
        for _, param in layer_parameters(layer):
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def adapter_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, layer)`` of every peft layer of ``module`` holding our adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, BaseTunerLayer) and any(ADAPTER in getattr(m, a, {}) for a in m.adapter_layer_names)]


def layer_parameters(layer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(part, parameter)`` of our adapter in one peft layer, parts named as
    peft without the adapter name (``lora_A.weight``, ``lokr_w1``,
    ``lora_magnitude_vector.weight``), in peft's order."""
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr, None)
        if holder is None or ADAPTER not in holder:
            continue
        value = holder[ADAPTER]
        if isinstance(value, torch.nn.Parameter):
            yield attr, value
        else:
            yield f"{attr}.weight", value.weight


def adapter_type(module: torch.nn.Module) -> str | None:
    """The type of the adapter attached to ``module`` (None: none)."""
    for _, layer in adapter_layers(module):
        parts = {part for part, _ in layer_parameters(layer)}
        if any(p.startswith("lokr_") for p in parts):
            return "lokr"
        if any(p.startswith("hada_") for p in parts):
            return "loha"
        return "dora" if "lora_magnitude_vector.weight" in parts else "lora"
    return None


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of every adapter tensor, ``{"blocks.0.attn1.to_q.lokr_w1": t, ...}``."""
    out = {}
    for name, layer in adapter_layers(module):
        for part, param in layer_parameters(layer):
            out[f"{name}.{part}"] = param.detach().float().cpu().clone()
    return out


#: a kernel tensor name -> (module, part); peft's ``.default`` is tolerated anywhere it may stand
PART = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_[AB]|lora_magnitude_vector|lokr_w[12](?:_[ab])?|lokr_t2|"
                  r"hada_w[12]_[ab]|hada_t[12])(?:\.default)?(?P<weight>\.weight)?$")


def split_name(key: str) -> tuple[str, str] | None:
    """``blocks.0.attn1.to_q.lora_A.default.weight`` -> ``("blocks.0.attn1.to_q", "lora_A.weight")``."""
    m = PART.match(key)
    if not m:
        return None
    return m["module"], m["part"] + (m["weight"] or "")


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy kernel-named tensors into the attached adapter; a name the adapter
    lacks is a KeyError, a shape that differs a ValueError (both name it)."""
    layers = {name: dict(layer_parameters(layer)) for name, layer in adapter_layers(module)}
    for key, tensor in tensors.items():
        found = split_name(key)
        param = layers.get(found[0], {}).get(found[1]) if found else None
        if param is None:
            raise KeyError(f"adapter tensor {key} has no matching adapter in the model")
        if param.shape != tensor.shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(tensor.shape)}, the adapter {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))


def set_scale(module: torch.nn.Module, scales: dict[str, float]) -> None:
    """Each named layer's forward scale (a file's per-module alpha / rank)."""
    for name, layer in adapter_layers(module):
        if name in scales:
            layer.scaling[ADAPTER] = scales[name]


def dora_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers whose adapter is DoRA: scale 0 does not switch those off (the
    magnitude still rescales the base weight), so :func:`wantrain.lora.lora_disabled`
    takes them out of the active adapters instead."""
    return [layer for _, layer in adapter_layers(module) if getattr(layer, "use_dora", {}).get(ADAPTER)]


def lokr_factor_for(in_features: int, out_features: int, w1_shape: tuple[int, int]) -> int | None:
    """The ``decompose_factor`` with which peft makes a w1 of ``w1_shape`` for
    this layer (-1, or one of the sides), or None when no factor does."""
    from peft.tuners.lokr.layer import factorization

    for factor in (-1, w1_shape[0], w1_shape[1]):
        if (factorization(out_features, factor)[0], factorization(in_features, factor)[0]) == tuple(w1_shape):
            return factor
    return None


# ---------------------------------------------------------------- files of any type


def attach_file(module: torch.nn.Module, weights, regex: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """Attach a DoRA / LoKr / LoHa adapter shaped as the file ``weights``
    (a :class:`wantrain.formats.lora.LoraWeights`), holding its tensors, each
    module at the scale ComfyUI gives it (for ``wantrain sample --lora``)."""
    from ..errors import ProfileProblem, WantrainError
    from ..formats import lycoris

    where = weights.source or weights.type
    ranks = weights.ranks
    if len(ranks) > 1:
        raise WantrainError(ProfileProblem(where, "mixes ranks", ranks, "use a file with one rank"))
    factor = -1
    if weights.type == "lokr":
        factor = _file_factor(module, weights, where)
    try:
        params = attach(module, weights.type, ranks[0] if ranks else 1, ranks[0] if ranks else 1, regex, seed,
                        lokr_factor=factor, lokr_full_rank=not ranks)
        load_state(module, weights.state())
    except ValueError as exc:
        raise WantrainError(ProfileProblem(where, f"its {weights.type} factors do not fit the layers peft makes ({exc})",
                                           fix="use a file trained with wantrain, or export it from its trainer as LoRA")) from None
    tables = weights.part_tables()
    set_scale(module, {n: lycoris.scale(weights.type, tables[n], weights.alphas[n]) for n in tables})
    return params


def _file_factor(module: torch.nn.Module, weights, where: str) -> int:
    """The LoKr factor that rebuilds the file's w1 shapes on every layer."""
    from ..errors import ProfileProblem, WantrainError

    factors = set()
    for name, parts in weights.part_tables().items():
        layer = module.get_submodule(name)
        w1 = parts.get("lokr_w1")
        if w1 is None:
            raise WantrainError(ProfileProblem(where, "factors lokr_w1 into lokr_w1_a / lokr_w1_b, which peft cannot rebuild",
                                               name, "use a LoKr with a full lokr_w1 (wantrain's, ai-toolkit's)"))
        factors.add(lokr_factor_for(layer.in_features, layer.out_features, tuple(w1.shape)))
    if len(factors) != 1 or None in factors:
        raise WantrainError(ProfileProblem(where, "its lokr_w1 shapes follow no single factor peft can use",
                                           sorted(map(str, factors)), "use a LoKr trained with one factor"))
    return factors.pop()


def target_problems(weights, target, where: str) -> list:
    """Why ``weights`` cannot start a run of ``[target]``'s type (init_from), one problem each."""
    from ..errors import ProfileProblem

    if weights.type != target.type:
        return [ProfileProblem(where, f"holds {weights.type} weights, target.type is {target.type!r}",
                               fix=f'set target.type = "{weights.type}"')]
    if target.type == "lokr" and (not weights.ranks) != target.lokr_full_rank:
        full = "full" if not weights.ranks else "factored (lokr_w2_a / lokr_w2_b)"
        return [ProfileProblem(where, f"its LoKr w2 is {full}", target.lokr_full_rank,
                               f"set target.lokr_full_rank = {str(not weights.ranks).lower()}")]
    return []


def profile_problems(target) -> list:
    """LoKr's keys set for another type: one line each (they would be ignored)."""
    from ..errors import ProfileProblem

    if target.type == "lokr":
        return []
    return [ProfileProblem(f"target.{key}", f'is a LoKr setting; target.type is "{target.type}"', value,
                           f'set target.type = "lokr", or remove {key}')
            for key, value, default in (("lokr_factor", target.lokr_factor, -1), ("lokr_full_rank", target.lokr_full_rank, False))
            if value != default]
