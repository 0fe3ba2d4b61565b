"""LoRA files: module-name maps, every layout read into :class:`LoraWeights`,
the two layouts written, the metadata of our files, ``lora-info`` lines, and
:func:`read_lora_sources` -- which weights each expert gets from a path
(``[target] init_from`` and ``wantrain sample --lora`` alike).

The table of layouts is in :mod:`wantrain.formats`. Inside wantrain a module
is named as in diffusers' ``WanTransformer3DModel`` (``blocks.0.attn1.to_q``);
files may use those names or the original Wan / ComfyUI ones
(``blocks.0.self_attn.q``), under any of the prefixes below.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import attrs
import torch

from .. import __version__
from ..errors import ProfileProblem, WantrainError
from ..archs import ALL_EXPERTS, ARCHS, DEFAULT as DEFAULT_ARCH, FULL, Arch
from ..model import EXPERTS
from . import lycoris
from . import safetensors as st
from . import state as state_files

log = logging.getLogger("wantrain")

# ---------------------------------------------------------------- module names

#: diffusers module path inside a block  ->  original Wan / ComfyUI name
DIFFUSERS_TO_COMFY = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
COMFY_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_TO_COMFY.items()}
#: layers outside the blocks (read in ARA files): original Wan name -> diffusers name
TOP_COMFY_TO_DIFFUSERS = {
    "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
}
TOP_DIFFUSERS_TO_COMFY = {v: k for k, v in TOP_COMFY_TO_DIFFUSERS.items()}
#: prefixes before the module name, stripped in this order (``model.diffusion_model.`` is the original checkpoints')
_OUTER = ("base_model.model.", "model.", "diffusion_model.", "transformer.")
#: the expert part of a two-expert file (ai-toolkit's DualWanTransformer3DModel; diffusers' transformer_2)
EXPERT_TAGS = {"transformer_1.": "high_noise", "transformer_2.": "low_noise"}
#: the written layouts
WRITTEN = ("comfyui", "diffusers")

EXPECTED = ("expected keys like diffusion_model.blocks.0.self_attn.q.lora_A.weight (ComfyUI), "
            "transformer.blocks.0.attn1.to_q.lora_A.weight (diffusers), "
            "lora_unet_blocks_0_self_attn_q.lora_down.weight (kohya), "
            "diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A.weight (ai-toolkit, both experts)")


class Module(NamedTuple):
    """Where a tensor name points: the expert its prefix names (or None),
    the diffusers module name, the naming it was written in
    (``comfyui`` | ``diffusers`` | ``other``) and the outer prefix."""

    expert: str | None
    name: str
    naming: str
    outer: str


def module_name(name: str) -> Module:
    """``diffusion_model.transformer_1.blocks.0.self_attn.q`` ->
    ``Module("high_noise", "blocks.0.attn1.to_q", "comfyui", "diffusion_model.")``."""
    outer = ""
    for prefix in _OUTER:
        if name.startswith(prefix):
            outer, name = outer + prefix, name[len(prefix):]
    tag = next((t for t in EXPERT_TAGS if name.startswith(t)), None)
    if tag:
        name = name[len(tag):]
    expert = EXPERT_TAGS.get(tag or "")
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in COMFY_TO_DIFFUSERS:
        return Module(expert, f"blocks.{m.group(1)}.{COMFY_TO_DIFFUSERS[m.group(2)]}", "comfyui", outer)
    if m and m.group(2) in DIFFUSERS_TO_COMFY:
        return Module(expert, name, "diffusers", outer)
    if name in TOP_COMFY_TO_DIFFUSERS:
        return Module(expert, TOP_COMFY_TO_DIFFUSERS[name], "comfyui", outer)
    return Module(expert, name, "diffusers" if name in TOP_DIFFUSERS_TO_COMFY else "other", outer)


def comfy_name(name: str) -> str:
    """``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q`` (top-level layers too)."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in DIFFUSERS_TO_COMFY:
        return f"blocks.{m.group(1)}.{DIFFUSERS_TO_COMFY[m.group(2)]}"
    return TOP_DIFFUSERS_TO_COMFY.get(name, name)


def block_kind(name: str) -> str:
    """``blocks.3.attn1.to_q`` -> ``attn1.to_q`` (the name ``[target] modules`` uses)."""
    return name.split(".", 2)[2]


# ---------------------------------------------------------------- tensor names

_LY = "|".join(lycoris.PARTS)  # LyCORIS tensors (DoRA, LoKr, LoHa): formats.lycoris
_PART = re.compile(r"^(?P<head>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$|^(?P<ahead>.+)\.alpha$"
                   rf"|^(?P<lhead>.+?)\.(?P<ly>{_LY})$")
_KOHYA = re.compile(rf"^lora_unet_blocks_(\d+)_(\w+?)\.(?:(lora_down|lora_up|lora_A|lora_B)\.weight|alpha|({_LY}))$")
_UNDERSCORED = {**{c.replace(".", "_"): d for c, d in COMFY_TO_DIFFUSERS.items()},
                **{d.replace(".", "_"): d for d in DIFFUSERS_TO_COMFY}}
_PARTS = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B", None: "alpha"}


class TensorName(NamedTuple):
    """One tensor of a LoRA file: its module, ``A`` | ``B`` | ``alpha`` | a LyCORIS name
    (``dora_scale``, ``lokr_w1`` ...), and the layout its name is written in."""

    module: Module
    part: str
    layout: str


def tensor_name(key: str) -> TensorName | None:
    """What a LoRA tensor name means, or None when it is not a trainable
    block module of a Wan transformer."""
    m = _KOHYA.match(key)
    if m:
        block, path, part, ly = m.groups()
        if path not in _UNDERSCORED:
            return None
        return TensorName(Module(None, f"blocks.{block}.{_UNDERSCORED[path]}", "kohya", "lora_unet_"), ly or _PARTS[part], "kohya")
    m = _PART.match(key)
    if not m:
        return None
    module = module_name(m["head"] or m["ahead"] or m["lhead"])
    if module.naming == "other" or not module.name.startswith("blocks."):
        return None
    part = m["ly"] or _PARTS[m["part"]]
    if module.naming == "diffusers":
        layout = "diffusers"
    else:
        layout = "comfyui-down-up" if m["part"] in ("lora_down", "lora_up") else "comfyui"
    return TensorName(module, part, layout)


# ---------------------------------------------------------------- LoraWeights


@attrs.define
class LoraWeights:
    """One expert's adapter in diffusers module names: ``{"blocks.0.attn1.to_q": (A, B)}``
    with the alpha of each module (scale = alpha / rank).

    Types other than plain LoRA (``type``: dora, lokr, loha) also keep every
    module's tensors under their file names in ``parts`` (DoRA: ``A``, ``B``,
    ``dora_scale``; LoKr: ``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a`` /
    ``lokr_w2_b``; LoHa: ``hada_w1_a`` ...); a LoKr / LoHa module's entry in
    ``modules`` is that same table (:mod:`.lycoris` has the math)."""

    layout: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alphas: dict[str, float]
    expert: str | None = None
    metadata: dict[str, str] = attrs.Factory(dict)
    skipped: list[str] = attrs.Factory(list)
    #: the file or folder it was read from (named by error messages)
    source: str = ""
    #: the expert comes from the tensor names (one half of a two-expert file)
    combined: bool = False
    #: lora | dora | lokr | loha
    type: str = "lora"
    #: per module, the tensors of a type other than lora under their file names
    parts: dict[str, dict[str, torch.Tensor]] = attrs.Factory(dict)

    def part_tables(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every module's tensors under their file names (``A``, ``B``, ``lokr_w1``, ...)."""
        if self.type == "lora":
            return {name: {"A": a, "B": b} for name, (a, b) in self.modules.items()}
        return self.parts

    def rank_of(self, name: str) -> int | None:
        """The module's rank (None: a LoKr with both factors full)."""
        return lycoris.rank_of(self.type, self.part_tables()[name])

    @property
    def ranks(self) -> list[int]:
        if self.type == "lora":
            return sorted({a.shape[0] for a, _ in self.modules.values()})
        return sorted({r for r in (self.rank_of(n) for n in self.modules) if r is not None})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(next(iter(self.part_tables().values())).values())).dtype

    def state(self) -> dict[str, torch.Tensor]:
        """fp32 tensors in the kernel's names (``blocks.0.attn1.to_q.lora_A.weight``), as stored."""
        if self.type != "lora":
            return {f"{name}.{k}": t.float() for name, parts in self.parts.items()
                    for k, t in (lycoris.to_kernel_part(p, v) for p, v in parts.items())}
        out = {}
        for name, (a, b) in self.modules.items():
            out[f"{name}.lora_A.weight"] = a.float()
            out[f"{name}.lora_B.weight"] = b.float()
        return out

    def delta_state(self, alpha: float) -> dict[str, torch.Tensor]:
        """fp32 kernel-named tensors for an adapter whose scale is ``alpha / rank``
        (``lora_B``, LoKr's ``lokr_w1`` or LoHa's ``hada_w1_a`` rescaled so that
        the weight is unchanged; a full-rank LoKr has scale 1 either way)."""
        if self.type != "lora":
            out = self.state()
            first = {"dora": "lora_B.weight", "lokr": "lokr_w1", "loha": "hada_w1_a"}[self.type]
            for name in self.modules:
                factor = self.alphas[name] / alpha if self.rank_of(name) is not None else 1.0
                key = f"{name}.{first}" if f"{name}.{first}" in out else f"{name}.lokr_w1_a"
                out[key] = out[key] if factor == 1.0 else out[key] * factor
            return out
        out = {}
        for name, (a, b) in self.modules.items():
            factor = self.alphas[name] / alpha
            out[f"{name}.lora_A.weight"] = a.float()
            out[f"{name}.lora_B.weight"] = b.float() if factor == 1.0 else b.float() * factor
        return out


def unreadable(path: Any, what: str, **got: Any) -> WantrainError:
    """``error: <path>: not a LoRA wantrain can read: <what>; expected keys like ...``"""
    return WantrainError(ProfileProblem(str(path), f"not a LoRA wantrain can read: {what}", fix=EXPECTED, **got))


def from_state(state: Mapping[str, torch.Tensor], alpha: float, **fields: Any) -> LoraWeights:
    """Kernel-named tensors (``blocks.0.attn1.to_q.lora_A.weight``, as
    :func:`wantrain.lora.lora_state` returns them) at one alpha -> LoraWeights."""
    from ..adapters import split_name

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        found = split_name(key)
        if found is None:
            raise ValueError(f"unexpected LoRA key {key}")
        part, value = lycoris.to_file_part(found[1], tensor)
        parts.setdefault(found[0], {})[part] = value
    ordered = dict(sorted(parts.items(), key=lambda kv: _natural(kv[0])))
    fields.setdefault("layout", "wantrain")
    return _typed(ordered, {n: float(alpha) for n in ordered}, **fields)


def _typed(parts: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float], **fields: Any) -> LoraWeights:
    """LoraWeights of one type from every module's file-named tensors (``alpha`` left out)."""
    kind = lycoris.type_of(next(iter(parts.values()))) if parts else "lora"
    if kind in ("lora", "dora"):
        modules = {n: (p["A"], p["B"]) for n, p in parts.items()}
    else:
        modules = dict(parts)
    return LoraWeights(modules=modules, alphas=alphas, type=kind, parts={} if kind == "lora" else dict(parts), **fields)


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


# ---------------------------------------------------------------- reading


def parse(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path | None = None) -> dict[str | None, LoraWeights]:
    """Every expert's weights in one file's tensors: ``{"high_noise": w,
    "low_noise": w}`` for a two-expert file, else ``{w.expert: w}`` (None when
    the file names no expert). Tensors of no trainable module are listed in
    ``skipped``; a file with none at all is a WantrainError."""
    where = path or "LoRA"
    named = {key: tensor_name(key) for key in tensors}
    combined = any(n and n.module.expert for n in named.values())
    groups: dict[str | None, dict[str, dict[str, torch.Tensor]]] = {}
    layouts, skipped = set(), []
    for key, n in named.items():
        expert = n.module.expert if n else None
        if n and combined and expert is None and n.module.outer == "transformer.":
            expert = "high_noise"  # diffusers' two-expert naming: transformer. + transformer_2.
        if n is None or (combined and expert is None):
            skipped.append(key)
            continue
        layouts.add(n.layout)
        groups.setdefault(expert, {}).setdefault(n.module.name, {})[n.part] = tensors[key]
    if not groups:
        raise unreadable(where, "no LoRA tensors of a Wan transformer", got=", ".join(sorted(tensors)[:3]) or "no tensors")
    layout = _layout(layouts, named, path)
    if not combined:  # one set of weights: the metadata or the file name may say whose
        groups = {_expert_of(metadata, path): groups[None]}
    return {expert: _weights(parts, layout, metadata, path, expert, skipped, combined) for expert, parts in groups.items()}


def _layout(layouts: set[str], named: Mapping[str, TensorName | None], path: Path | None) -> str:
    if any(n and n.module.expert == "high_noise" for n in named.values()):
        return "ai-toolkit"  # DualWanTransformer3DModel: transformer_1 / transformer_2
    if layouts == {"comfyui", "comfyui-down-up"}:  # only the .alpha names said "comfyui"
        layouts = {"comfyui-down-up"}
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    has_alpha = any(n and n.part == "alpha" for n in named.values())
    if layout == "comfyui" and not has_alpha and path is not None and (path.parent / "adapter_config.json").is_file():
        return "diffusion-pipe"  # adapter_model.safetensors + the PEFT config beside it
    return layout


def _weights(parts: Mapping[str, Mapping[str, torch.Tensor]], layout: str, metadata: Mapping[str, str], path: Path | None,
             expert: str | None, skipped: list[str], combined: bool) -> LoraWeights:
    kinds = sorted({lycoris.type_of(p) for p in parts.values()})
    if len(kinds) > 1:
        raise unreadable(path or "LoRA", f"mixes adapter types ({', '.join(kinds)}) in one file")
    if kinds[0] in ("lokr", "loha"):
        return _lycoris_weights(kinds[0], parts, layout=layout, metadata=dict(metadata), source=str(path or ""),
                                expert=expert, skipped=list(skipped), combined=combined)
    incomplete = [m for m, p in parts.items() if "A" not in p or "B" not in p]
    if incomplete:
        raise unreadable(path or "LoRA", f"{incomplete[0]} lacks its lora_A or lora_B")
    for name, p in parts.items():
        wrong = _shape_problem(p)
        if wrong:
            raise unreadable(path or "LoRA", f"{name}: {wrong}")
    config = _peft_config(metadata, path) if any("alpha" not in p for p in parts.values()) else {}
    modules, alphas = {}, {}
    for name, p in sorted(parts.items(), key=lambda kv: _natural(kv[0])):
        modules[name] = (p["A"], p["B"])
        rank = p["A"].shape[0]
        alphas[name] = float(p["alpha"].float().item()) if "alpha" in p else _alpha_for(name, config, rank)
    if kinds == ["dora"]:
        tables = {n: {k: v for k, v in parts[n].items() if k != "alpha"} for n in modules}
        return _typed(tables, alphas, layout=layout, expert=expert, metadata=dict(metadata), skipped=list(skipped),
                      source=str(path or ""), combined=combined)
    return LoraWeights(layout=layout, modules=modules, alphas=alphas, expert=expert, metadata=dict(metadata),
                       skipped=list(skipped), source=str(path or ""), combined=combined)


def _lycoris_weights(kind: str, parts: Mapping[str, Mapping[str, torch.Tensor]], **fields: Any) -> LoraWeights:
    """A LoKr / LoHa file's modules; a missing alpha means scale 1 (alpha = rank), as in ComfyUI."""
    for name, p in parts.items():
        wrong = lycoris.shape_problem(kind, p) or _alpha_problem(p)
        if wrong:
            raise unreadable(fields["source"] or "LoRA", f"{name}: {wrong}")
    ordered = sorted(parts.items(), key=lambda kv: _natural(kv[0]))
    tables = {n: {k: v for k, v in p.items() if k != "alpha"} for n, p in ordered}
    alphas = {n: float(p["alpha"].float().item()) if "alpha" in p else float(lycoris.rank_of(kind, p) or 1)
              for n, p in ordered}
    return _typed(tables, alphas, **fields)


def _alpha_problem(p: Mapping[str, torch.Tensor]) -> str | None:
    if "alpha" in p and p["alpha"].numel() != 1:
        return f"alpha holds {p['alpha'].numel()} numbers, not one"
    if "alpha" in p and not torch.isfinite(p["alpha"].float()).all():
        return "alpha is not a finite number"
    return None


def _shape_problem(p: Mapping[str, torch.Tensor]) -> str | None:
    """What makes one module's tensors unusable (shapes, rank, alpha), or None."""
    a, b = p["A"], p["B"]
    if "dora_scale" in p and p["dora_scale"].numel() != b.shape[0]:
        return f"dora_scale holds {p['dora_scale'].numel()} numbers, lora_B has {b.shape[0]} rows"
    if a.ndim != 2 or b.ndim != 2:
        return f"lora_A and lora_B must be matrices (got shapes {list(a.shape)} and {list(b.shape)})"
    if a.shape[0] == 0:
        return "rank 0 (lora_A has no rows)"
    if b.shape[1] != a.shape[0]:
        return f"lora_B has rank {b.shape[1]} but lora_A has rank {a.shape[0]}"
    if "alpha" in p and p["alpha"].numel() != 1:
        return f"alpha holds {p['alpha'].numel()} numbers, not one"
    if "alpha" in p and not torch.isfinite(p["alpha"].float()).all():
        return "alpha is not a finite number"
    return None


def _peft_config(metadata: Mapping[str, str], path: Path | None) -> dict[str, Any]:
    """PEFT alpha settings: diffusers' ``lora_adapter_metadata`` or an
    ``adapter_config.json`` beside the file (PEFT, diffusion-pipe); either
    one malformed is a WantrainError naming it."""
    if metadata.get("lora_adapter_metadata"):
        config = _json_table(metadata["lora_adapter_metadata"], path or "LoRA", "its lora_adapter_metadata")
        config = {k.removeprefix("transformer.").removeprefix("transformer_2."): v for k, v in config.items()}
        where = path or "LoRA"
    elif path is not None and (path.parent / "adapter_config.json").is_file():
        where = path.parent / "adapter_config.json"
        try:
            text = where.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise unreadable(where, f"cannot read it ({exc})") from None
        config = _json_table(text, where, "it")
    else:
        return {}
    patterns, alpha = config.get("alpha_pattern"), config.get("lora_alpha")
    if patterns is not None and not (isinstance(patterns, dict) and all(_is_number(v) for v in patterns.values())):
        raise unreadable(where, "alpha_pattern is not a table of module name -> number", got=patterns)
    if alpha is not None and not _is_number(alpha):
        raise unreadable(where, "lora_alpha is not a number", got=alpha)
    return config


def _json_table(text: str, where: Any, what: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise unreadable(where, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise unreadable(where, f"{what} is not a JSON object", got=config)
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _alpha_for(name: str, config: Mapping[str, Any], rank: int) -> float:
    """A module's alpha from a PEFT config (``alpha_pattern``, then
    ``lora_alpha``); without one, alpha = rank (scale 1, PEFT's and kohya's default).

    A pattern matches a module whose name is it or ends with ``.<pattern>``
    -- PEFT's suffix rule, taken literally: patterns come from files, and a
    regular expression from a file is never run (a crafted one can take
    hours to fail; diffusers writes plain module names)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        for candidate in (name, comfy_name(name)):
            if candidate == pattern or candidate.endswith("." + pattern):
                return float(alpha)
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else float(rank)


def _expert_of(metadata: Mapping[str, str], path: Path | None) -> str | None:
    if metadata.get("wantrain.expert") in ALL_EXPERTS:
        return metadata["wantrain.expert"]
    found = [e for e in EXPERTS if path is not None and e in path.name]
    return found[0] if len(found) == 1 else None


def read_file(path: str | Path, where: str | None = None) -> dict[str | None, LoraWeights]:
    """Every expert's weights in a LoRA file of any layout (see :func:`parse`)."""
    tensors, metadata = st.read(path, where)
    return parse(tensors, metadata, Path(path))


def read_lora(path: str | Path, expert: str | None = None) -> LoraWeights:
    """The weights of one file: ``expert``'s half of a two-expert file, else the file's one set."""
    found = read_file(path)
    first = next(iter(found.values()))
    if not first.combined:
        return first
    if expert in found:
        return found[expert]
    if expert is None and len(found) == 1:
        return first
    what = "holds both experts; name the one wanted" if expert is None else f"holds no {expert} weights"
    raise WantrainError(ProfileProblem(str(path), what, sorted(e for e in found if e), "use its other half, or another file"))


def read_checkpoint(folder: str | Path, where: str = "checkpoint",
                    weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    variant: str | None = None) -> dict[str, LoraWeights]:
    """``{expert: weights}`` of a resume checkpoint: its fp32 LoRA weights, or
    ``weights`` (kernel names per expert) that a plugin keeps in it (``variant``)."""
    folder = Path(folder)
    doc = state_files.read_doc(folder, where, "give a checkpoints/step_N folder or a LoRA .safetensors file")
    per_expert = weights if weights is not None else state_files.read_weights(folder, doc["experts"])
    profile = doc["profile"]
    out = {}
    for expert, tensors in per_expert.items():  # an expert's own rank / alpha (``target.experts.<e>``), else [target]'s
        alpha = float(profile.get(f"target.experts.{expert}.alpha", profile["target.alpha"]))
        rank = int(profile.get(f"target.experts.{expert}.rank", profile["target.rank"]))
        meta = metadata(profile_toml="", step=int(doc["step"]), base_model=str(profile.get("model.name_or_path")),
                        trigger_word=profile.get("job.trigger_word"), rank=rank, alpha=alpha, expert=expert,
                        arch=profile.get("model.arch") or DEFAULT_ARCH)
        if variant:
            meta["wantrain.variant"] = variant
        out[expert] = from_state(tensors, alpha, layout="wantrain checkpoint", expert=expert, metadata=meta,
                                 source=str(folder))
    return out


def read_lora_sources(path: str | Path, experts: Sequence[str], *, where: str = "LoRA",
                      prefix: bool = False, arch: Arch | None = None) -> dict[str, LoraWeights]:
    """Which weights each of ``experts`` gets from ``path``: a checkpoints/step_N
    folder; a two-expert file (each expert its half); a file and its
    high_noise/low_noise partner beside it; a file naming no expert (every
    expert); with ``prefix``, also ``output/demo/demo`` for
    ``output/demo/demo_{high,low}_noise.safetensors`` (``output/demo/demo.safetensors``
    for a one-expert model). Experts the path holds nothing for are absent.
    ``arch``: the model it is for (:func:`check_arch`)."""
    path = Path(path)
    if path.is_dir():
        return {e: w for e, w in check_arch(read_checkpoint(path, where), arch, where).items() if e in experts}
    if not path.is_file():
        pair = _prefix_files(path) if prefix else {}
        if not pair:
            example = "the prefix of a pair (output/demo/demo for output/demo/demo_high_noise.safetensors), " if prefix else ""
            raise WantrainError(ProfileProblem(where, "no LoRA file found", str(path),
                                               f"give {example}a LoRA .safetensors file or a checkpoints/step_N folder"))
        return {e: w for e, w in check_arch({e: read_lora(p, e) for e, p in pair.items()}, arch, where).items() if e in experts}
    found = check_arch(read_file(path), arch, where)
    first = next(iter(found.values()))
    if first.combined:
        return {e: found[e] for e in experts if e in found}
    if first.expert is None:
        if len(experts) > 1:  # diffusion-pipe's adapter_model.safetensors, a Wan 2.1 LoRA: say so
            table = ' (or init_from = {high_noise = "...", low_noise = "..."})' if where == "target.init_from" else ""
            log.warning("%s: %s names no expert; it is loaded into both %s. To give each expert its own file, "
                        "name them *_high_noise / *_low_noise%s", where, path.name, " and ".join(experts), table)
        return {e: first for e in experts}
    out = {first.expert: first}
    if first.expert == FULL:  # a one-expert model's file has no partner
        return {e: w for e, w in out.items() if e in experts}
    other = next(e for e in EXPERTS if e != first.expert)
    partner = path.with_name(path.name.replace(first.expert, other))
    if partner != path and partner.is_file():
        out[other] = read_lora(partner, other)
    return {e: w for e, w in out.items() if e in experts}


def read_expert_file(path: Path, expert: str, where: str, arch: Arch | None = None) -> LoraWeights:
    """One expert's weights from a file chosen for it (its half of a two-expert file)."""
    if not path.is_file():
        raise WantrainError(ProfileProblem(where, "no LoRA file found", str(path), "give a LoRA .safetensors file"))
    return check_arch({expert: read_lora(path, expert)}, arch, where)[expert]


def stated_arch(w: LoraWeights) -> str | None:
    """The arch a LoRA says it was trained for: its ``wantrain.arch``; a
    wantrain file without one predates the other archs (T2V-A14B); None when
    the file does not say (other tools)."""
    meta = w.metadata
    if meta.get("wantrain.arch") in ARCHS:
        return meta["wantrain.arch"]
    return DEFAULT_ARCH if "wantrain.version" in meta else None


def check_arch(found: Mapping[Any, LoraWeights], arch: Arch | None, where: str) -> Mapping[Any, LoraWeights]:
    """``found`` unchanged when its files suit ``arch`` (None: not checked).
    The TI2V-5B and the A14Bs differ in width and experts: a LoRA of the one
    never fits the other (WantrainError naming both). T2V and I2V A14B share
    every LoRA shape: a LoRA of the other loads, with a warning (starting an
    I2V LoRA from a T2V one is a thing people do)."""
    for w in found.values() if arch is not None else ():
        trained = stated_arch(w)
        if trained is None or trained == arch.name:
            continue
        other = ARCHS[trained]
        if other.single_expert or arch.single_expert:
            raise WantrainError(ProfileProblem(where, f"is a {other.title} LoRA; this model is {arch.title}", w.source or where,
                                               f"give a LoRA trained for {arch.title}, or set [model] arch = \"{other.name}\""))
        log.warning("%s: %s is a %s LoRA, loaded into %s (the same shapes; what it learned may not carry over)",
                    where, w.source or "the file", other.title, arch.title)
        break
    return found


def _prefix_files(path: Path) -> dict[str, Path]:
    prefix = re.sub(r"_(high|low)_noise\.safetensors$", "", str(path))
    found = {e: Path(f"{prefix}_{e}.safetensors") for e in EXPERTS}
    found = {e: p for e, p in found.items() if p.is_file()}
    single = Path(f"{prefix}.safetensors")  # a one-expert model's file: <name>.safetensors
    return found or ({FULL: single} if single.is_file() else {})


# ---------------------------------------------------------------- writing


def comfy_tensors(w: LoraWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Ours: ``diffusion_model.blocks.{i}.<Wan name>.lora_A.weight`` / ``lora_B.weight`` / ``.alpha``
    (other types: their LyCORIS names, :mod:`.lycoris`; no alpha where ComfyUI applies none)."""
    out = {}
    for name, parts in w.part_tables().items():
        base = f"diffusion_model.{comfy_name(name)}"
        for part, tensor in parts.items():
            out[f"{base}.{_FILE_KEY.get(part, part)}"] = tensor.to(dtype).contiguous()
        if w.type == "lora" or w.rank_of(name) is not None:
            out[f"{base}.alpha"] = torch.tensor(w.alphas[name], dtype=dtype)
    return out


_FILE_KEY = {"A": "lora_A.weight", "B": "lora_B.weight"}


def diffusers_tensors(w: LoraWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT names under ``transformer.``, the scale ``alpha / rank`` folded into lora_B
    (DoRA: its magnitude as ``lora_magnitude_vector``; LoKr / LoHa: refused, one line)."""
    if w.type in ("lokr", "loha"):
        raise WantrainError(ProfileProblem("--format diffusers", f"diffusers' Wan LoRA loader reads no {w.type} weights",
                                           w.source or w.type, "export --format comfyui (ComfyUI loads it)"))
    out = {}
    for name in w.parts if w.type == "dora" else ():
        out[f"transformer.{name}.lora_magnitude_vector"] = w.parts[name]["dora_scale"].reshape(-1).to(dtype).contiguous()
    for name, (a, b) in w.modules.items():
        scale = w.alphas[name] / a.shape[0]
        out[f"transformer.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"transformer.{name}.lora_B.weight"] = (b.float() * scale if scale != 1.0 else b).to(dtype).contiguous()
    return out


def to_comfy(state: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Kernel-named tensors at one alpha -> our file's tensors (what the trainer writes)."""
    return comfy_tensors(from_state(state, alpha), dtype)


def write(w: LoraWeights, fmt: str, path: Path, dtype: torch.dtype | None = None) -> Path:
    """One expert's weights as a ``comfyui`` or ``diffusers`` file, written atomically."""
    dtype = dtype or w.dtype
    meta = {k: v for k, v in w.metadata.items() if k != "lora_adapter_metadata"}
    meta.update({"format": "pt", "wantrain.layout": fmt})
    if w.expert:
        meta["wantrain.expert"] = w.expert
    if fmt == "diffusers":
        tensors = diffusers_tensors(w, dtype)  # (LoKr / LoHa refused first)
        rank = w.ranks[0]
        meta.update({"wantrain.alpha": f"{rank:g}", "ss_network_alpha": f"{rank:g}",
                     "wantrain.alpha_folded": ",".join(sorted({f"{a:g}" for a in w.alphas.values()}))})
    else:
        tensors = comfy_tensors(w, dtype)
    return st.write_atomic(tensors, path, meta)


def metadata(*, profile_toml: str, step: int | None, base_model: str, trigger_word: str | None, rank: int,
             alpha: float, expert: str, arch: str = DEFAULT_ARCH) -> dict[str, str]:
    """The safetensors metadata of our LoRA files (``wantrain.profile`` only
    when a profile is given; ``wantrain.arch`` for archs other than T2V-A14B)."""
    meta = {
        "format": "pt",
        "wantrain.version": __version__,
        "wantrain.expert": expert,
        "wantrain.step": "final" if step is None else str(step),
        "wantrain.base_model": base_model,
        "wantrain.rank": str(rank),
        "wantrain.alpha": f"{alpha:g}",
        "wantrain.trigger_word": trigger_word or "",
        "wantrain.profile": profile_toml,
        # read by tools that show kohya-style metadata
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": f"wan2.2_t2v_a14b_{expert}",
    }
    if arch != DEFAULT_ARCH:
        meta["wantrain.arch"] = arch
        short = arch.replace("wan22_", "wan2.2_")
        meta["ss_base_model_version"] = short if expert == FULL else f"{short}_{expert}"
    if not profile_toml:
        del meta["wantrain.profile"]
    return meta


def lora_filename(name: str, expert: str, step: int | None, tag: str = "") -> str:
    """Final files ``<name>_<expert>``; a save ``<name>_<step:09d>[_<lineage tag>]_<expert>``.
    A one-expert model (TI2V-5B, expert ``full``) drops the ``_<expert>`` part."""
    if expert == FULL:
        stem = name if step is None else (f"{name}_{step:09d}_{tag}" if tag else f"{name}_{step:09d}")
        return f"{stem}.safetensors"
    if step is None:
        return f"{name}_{expert}.safetensors"
    return f"{name}_{step:09d}_{tag}_{expert}.safetensors" if tag else f"{name}_{step:09d}_{expert}.safetensors"


# ---------------------------------------------------------------- lora-info


def describe(path: str | Path) -> list[str]:
    """``wantrain lora-info``: layout, expert, modules, rank, alpha and metadata
    of a file (each half of a two-expert file) or a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        sections, head = read_checkpoint(path, "lora-info").values(), f"{path}: resume checkpoint"
    else:
        found = read_file(path)
        sections = found.values()
        head = f"{path}: both experts in one file" if next(iter(sections)).combined else None
    if head is None:
        return [str(path), *_describe_one(next(iter(sections)))]
    lines = [head]
    for w in sections:
        lines += ["", *_describe_one(w)]
    return lines


#: which tools load a file of each layout (``lora-info``'s "loads in:" line)
LOADS_IN = {
    "comfyui": "ComfyUI, diffusers",
    "comfyui-down-up": "ComfyUI",
    "diffusers": "diffusers (not ComfyUI's loader; export --format comfyui for ComfyUI)",
    "kohya": "ComfyUI, musubi-tuner",
    "diffusion-pipe": "ComfyUI, diffusers, diffusion-pipe",
    "ai-toolkit": "ai-toolkit (split it with export --format comfyui for ComfyUI and diffusers)",
    "wantrain checkpoint": "wantrain only (resume; export --format comfyui or diffusers for other tools)",
}


#: what ``lora-info`` says of each type other than plain LoRA
TYPE_NOTES = {"dora": "LoRA + dora_scale magnitude", "lokr": "Kronecker product lokr_w1 x lokr_w2",
              "loha": "Hadamard product of two low-rank pairs"}
#: which tools load each type (over the layout's answer)
LOADS_IN_TYPE = {"dora": "ComfyUI, diffusers (export --format diffusers; see docs/adapters.md)",
                 "lokr": "ComfyUI (not diffusers' Wan loader)", "loha": "ComfyUI (not diffusers' Wan loader)"}


#: block width -> what a LoRA of that width fits (files that do not name their arch)
_WIDTHS = {5120: "a Wan A14B (T2V or I2V: the file does not say which)", 3072: "Wan 2.2 TI2V-5B (from its 3072-wide blocks)"}


def arch_line(w: LoraWeights) -> str:
    """``lora-info``'s arch: the one the file names, else what its width fits."""
    name = stated_arch(w)
    if name is not None:
        return f"{ARCHS[name].title} ({name})"
    a = next((a for n, (a, _) in w.modules.items() if not n.endswith("ffn.net.2")), None) if w.type in ("lora", "dora") else None
    width = a.shape[1] if a is not None and a.ndim == 2 else None  # lora_A: rank x the block width
    return _WIDTHS.get(width, f"unknown (no wantrain.arch metadata; blocks {width or '?'} wide)")


def _describe_one(w: LoraWeights) -> list[str]:
    blocks = sorted({int(n.split(".")[1]) for n in w.modules})
    kinds = sorted({block_kind(n) for n in w.modules}, key=list(DIFFUSERS_TO_COMFY).index)
    alphas, ranks = sorted(set(w.alphas.values())), w.ranks
    scale = ", ".join(f"{a / r:g}" for a in alphas for r in ranks) if len(alphas) * len(ranks) <= 4 else "varies"
    lines = [
        f"layout: {w.layout}",
        f"loads in: {LOADS_IN_TYPE.get(w.type) or LOADS_IN.get(w.layout, 'wantrain (init_from, export)')}",
        f"expert: {w.expert or 'unknown (no metadata, no high_noise/low_noise in the name)'}",
        f"arch: {arch_line(w)}",
        f"dtype: {str(w.dtype).removeprefix('torch.')}",
        f"modules: {len(w.modules)} ({len(blocks)} blocks x {len(kinds)}: {', '.join(kinds)})",
        f"rank: {', '.join(map(str, ranks))}",
        f"alpha: {', '.join(f'{a:g}' for a in alphas)} (scale alpha/rank = {scale})",
    ]
    if w.type != "lora":
        lines[1:1] = [f"type: {w.type} ({TYPE_NOTES[w.type]})"]
    if not ranks:
        lines[-2:] = ["rank: none (LoKr with both factors full matrices)", "alpha: not used (scale 1)"]
    if w.metadata.get("wantrain.alpha_folded"):
        lines.append(f"alpha folded into lora_B: {w.metadata['wantrain.alpha_folded']}")
    if w.skipped:
        lines.append(f"not read: {len(w.skipped)} tensors (e.g. {w.skipped[0]})")
    meta = {k: v for k, v in w.metadata.items() if k != "format"}
    if meta:
        lines.append("metadata:")
        for key in sorted(meta):
            value = meta[key]
            if key == "wantrain.profile":
                value = f"<resolved profile, {len(value.splitlines())} lines of TOML>"
            lines.append(f"  {key}: {value}")
    return lines
