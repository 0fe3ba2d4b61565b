"""LoRA layouts: read the common ones, write ours or diffusers', describe a
file, and start a run from an existing LoRA.

Layouts read (one expert per file; the tensor names decide):

===================  =====================================================================
``comfyui``          ours: ``diffusion_model.blocks.{i}.self_attn.q.lora_A.weight`` /
                     ``lora_B.weight`` / ``.alpha`` (original Wan module names)
``comfyui-down-up``  the same names with ``lora_down`` / ``lora_up`` (+ ``.alpha``)
``kohya``            ``lora_unet_blocks_{i}_self_attn_q.lora_down.weight`` / ``lora_up`` /
                     ``.alpha`` (kohya, musubi-tuner; diffusers module names accepted too)
``diffusers``        ``transformer.blocks.{i}.attn1.to_q.lora_A.weight`` (PEFT; also without
                     the prefix, with ``base_model.model.`` or ``.default``); alpha from the
                     ``lora_adapter_metadata`` entry, an ``adapter_config.json`` beside the
                     file, or else equal to the rank (scale 1)
===================  =====================================================================

A resume checkpoint folder (``checkpoints/step_N``) reads as fp32 weights of
every trained expert (and, with ``ema=True``, the EMA shadow it holds).

Written layouts: ``comfyui`` (ours, alpha kept as ``.alpha``) and
``diffusers`` (``transformer.``-prefixed PEFT names, alpha folded into
``lora_B`` -- ``B * alpha / rank`` -- so every PEFT-based loader gets the
right scale without reading metadata). Both load in
``WanPipeline.load_lora_weights`` (low noise: ``load_into_transformer_2=True``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import lora, model
from .errors import ProfileProblem, WantrainError

log = logging.getLogger("wantrain")

FORMATS = ("comfyui", "diffusers")
_PARTS = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B", "alpha": "alpha"}
# underscore spellings (kohya) of both the original Wan and the diffusers module names
_UNDERSCORED = {**{c.replace(".", "_"): d for c, d in lora.COMFY_TO_DIFFUSERS.items()},
                **{d.replace(".", "_"): d for d in lora.DIFFUSERS_TO_COMFY}}
_DIFFUSERS_PATHS = "|".join(re.escape(d) for d in lora.DIFFUSERS_TO_COMFY)
_COMFY_PATHS = "|".join(re.escape(c) for c in lora.COMFY_TO_DIFFUSERS)
_PATTERNS = [
    ("comfyui", re.compile(rf"^diffusion_model\.blocks\.(\d+)\.({_COMFY_PATHS})\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$")),
    ("kohya", re.compile(r"^lora_unet_blocks_(\d+)_(\w+?)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$")),
    ("diffusers", re.compile(rf"^(?:transformer\.|transformer_2\.|base_model\.model\.|diffusion_model\.)?blocks\.(\d+)\.({_DIFFUSERS_PATHS})\.(lora_A|lora_B)(?:\.default)?\.weight$")),
]


@attrs.define
class LoraWeights:
    """One expert's LoRA in diffusers module names: ``{"blocks.0.attn1.to_q": (A, B)}``."""

    layout: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alphas: dict[str, float]
    expert: str | None = None
    metadata: dict[str, str] = attrs.Factory(dict)
    skipped: list[str] = attrs.Factory(list)

    @property
    def ranks(self) -> list[int]:
        return sorted({a.shape[0] for a, _ in self.modules.values()})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values()))[0].dtype

    def delta_state(self, alpha: float) -> dict[str, torch.Tensor]:
        """fp32 diffusers-named tensors for an adapter whose scale is ``alpha / rank``
        (``lora_B`` rescaled so that the product is unchanged)."""
        out = {}
        for name, (a, b) in self.modules.items():
            factor = self.alphas[name] / alpha
            out[f"{name}.lora_A.weight"] = a.float()
            out[f"{name}.lora_B.weight"] = b.float() if factor == 1.0 else b.float() * factor
        return out


def _module_of(key: str) -> tuple[str, str, str] | None:
    """(layout, diffusers module name, part) of one tensor name, or None."""
    for layout, pattern in _PATTERNS:
        m = pattern.match(key)
        if not m:
            continue
        block, path, part = m.groups()
        if layout == "comfyui":
            path = lora.COMFY_TO_DIFFUSERS[path]
            layout = "comfyui-down-up" if "lora_down" in part or "lora_up" in part else "comfyui"
        elif layout == "kohya":
            if path not in _UNDERSCORED:
                return None
            path = _UNDERSCORED[path]
        else:
            part = part + ".weight"
        return layout, f"blocks.{block}.{path}", _PARTS[part]
    return None


def parse_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path | None = None) -> LoraWeights:
    """Any supported layout -> :class:`LoraWeights` (unknown tensors are listed in ``skipped``)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    layouts, skipped = set(), []
    for key, tensor in tensors.items():
        found = _module_of(key)
        if found is None:
            skipped.append(key)
            continue
        layouts.add(found[0])
        parts.setdefault(found[1], {})[found[2]] = tensor
    incomplete = [m for m, p in parts.items() if "A" not in p or "B" not in p]
    if not parts or incomplete:
        what = "no LoRA tensors of a Wan transformer" if not parts else f"{incomplete[0]} lacks its lora_A or lora_B"
        raise WantrainError(ProfileProblem(str(path or "LoRA"), f"not a LoRA wantrain can read: {what}",
                                           fix="see docs/checkpoints.md for the layouts read"))
    if layouts == {"comfyui", "comfyui-down-up"}:  # only the .alpha names said "comfyui"
        layouts = {"comfyui-down-up"}
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    default_alpha = _diffusers_alphas(metadata, path) if layout == "diffusers" else {}
    modules, alphas = {}, {}
    for name, p in sorted(parts.items(), key=lambda kv: _natural(kv[0])):
        modules[name] = (p["A"], p["B"])
        rank = p["A"].shape[0]
        alphas[name] = float(p["alpha"].float().item()) if "alpha" in p else _alpha_for(name, default_alpha, rank)
    return LoraWeights(layout=layout, modules=modules, alphas=alphas, expert=_expert_of(metadata, path),
                       metadata=dict(metadata), skipped=skipped)


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _diffusers_alphas(metadata: dict[str, str], path: Path | None) -> dict[str, Any]:
    """PEFT alpha settings: diffusers' ``lora_adapter_metadata`` or an adapter_config.json beside the file."""
    config: dict[str, Any] = {}
    if metadata.get("lora_adapter_metadata"):
        config = json.loads(metadata["lora_adapter_metadata"])
        config = {k.removeprefix("transformer."): v for k, v in config.items()}
    elif path is not None and (path.parent / "adapter_config.json").is_file():
        config = json.loads((path.parent / "adapter_config.json").read_text(encoding="utf-8"))
    return config


def _alpha_for(name: str, config: dict[str, Any], rank: int) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern.lstrip("^"), name):
            return float(alpha)
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else float(rank)


def _expert_of(metadata: dict[str, str], path: Path | None) -> str | None:
    if metadata.get("wantrain.expert") in model.EXPERTS:
        return metadata["wantrain.expert"]
    name = path.name if path is not None else ""
    found = [e for e in model.EXPERTS if e in name]
    return found[0] if len(found) == 1 else None


def read_lora(path: str | Path) -> LoraWeights:
    """A LoRA file of any supported layout."""
    path = Path(path)
    if not path.is_file():
        raise WantrainError(ProfileProblem(str(path), "file not found", fix="check the path"))
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WantrainError(ProfileProblem(str(path), f"not a readable safetensors file ({exc})")) from None
    return parse_tensors(tensors, metadata, path)


def read_checkpoint_weights(folder: str | Path, ema: bool = False) -> dict[str, LoraWeights]:
    """``{expert: weights}`` of a resume checkpoint (fp32; the EMA shadow with ``ema``)."""
    from .resume import LORA_FILE, TENSORS_FILE, decode_tree, read_checkpoint

    ckpt = read_checkpoint(Path(folder))
    alpha = float(ckpt.state["profile"]["target.alpha"])
    flat = load_file(str(ckpt.path / LORA_FILE))
    per_expert = {e: {k[len(e) + 1:]: v for k, v in flat.items() if k.startswith(e + ".")} for e in ckpt.state["experts"]}
    if ema:
        plugins = decode_tree(ckpt.state["tree"]["plugins"], load_file(str(ckpt.path / TENSORS_FILE)))
        per_expert = _ema_shadow(plugins, ckpt.path)
    meta = {"wantrain.step": str(ckpt.step), "wantrain.base_model": str(ckpt.state["profile"].get("model.name_or_path")),
            "wantrain.rank": str(ckpt.state["profile"]["target.rank"]), "wantrain.alpha": f"{alpha:g}",
            "wantrain.ema": "true" if ema else "false"}
    out = {}
    for expert, state in per_expert.items():
        comfy = lora.to_comfy(state, alpha, torch.float32)
        w = parse_tensors(comfy, {**meta, "wantrain.expert": expert})
        w.layout = "wantrain checkpoint"
        out[expert] = w
    return out


def _ema_shadow(plugins: dict[str, Any], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA plugin's shadow (``{"shadow": {expert: {parameter name: tensor}}}``), in lora_state names."""
    candidates = [plugins.get("ema"), *plugins.values()]
    for entry in candidates:
        if isinstance(entry, dict) and isinstance(entry.get("shadow"), dict):
            return {e: {re.sub(r"\.default(?=\.weight$)", "", n): t for n, t in ts.items()}
                    for e, ts in entry["shadow"].items()}
    raise WantrainError(ProfileProblem("--ema", "this checkpoint holds no EMA weights", str(where),
                                       'enable the "ema" plugin in the run, or export without --ema'))


# ---------------------------------------------------------------- writing


def comfy_tensors(w: LoraWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in w.modules.items():
        block, path = re.match(r"^blocks\.(\d+)\.(.+)$", name).groups()
        base = f"diffusion_model.blocks.{block}.{lora.DIFFUSERS_TO_COMFY[path]}"
        out[f"{base}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{base}.lora_B.weight"] = b.to(dtype).contiguous()
        out[f"{base}.alpha"] = torch.tensor(w.alphas[name], dtype=dtype)
    return out


def diffusers_tensors(w: LoraWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT names under ``transformer.``, the scale ``alpha / rank`` folded into lora_B."""
    out = {}
    for name, (a, b) in w.modules.items():
        scale = w.alphas[name] / a.shape[0]
        out[f"transformer.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"transformer.{name}.lora_B.weight"] = (b.float() * scale if scale != 1.0 else b).to(dtype).contiguous()
    return out


def write_layout(w: LoraWeights, fmt: str, path: Path, dtype: torch.dtype | None = None) -> Path:
    dtype = dtype or w.dtype
    meta = {k: v for k, v in w.metadata.items() if k != "lora_adapter_metadata"}
    meta.update({"format": "pt", "wantrain.layout": fmt})
    if w.expert:
        meta["wantrain.expert"] = w.expert
    if fmt == "diffusers":
        rank = w.ranks[0]
        meta.update({"wantrain.alpha": f"{rank:g}", "ss_network_alpha": f"{rank:g}",
                     "wantrain.alpha_folded": ",".join(sorted({f"{a:g}" for a in w.alphas.values()}))})
        tensors = diffusers_tensors(w, dtype)
    else:
        tensors = comfy_tensors(w, dtype)
    return lora.write_atomic(tensors, path, meta)


def export(source: str | Path, fmt: str, out: str | Path, ema: bool = False, dtype: str | None = None) -> list[Path]:
    """``wantrain export``: a LoRA file -> one file; a checkpoint folder -> one file per expert in ``out``."""
    source, out = Path(source), Path(out)
    torch_dtype = model.DTYPES[dtype] if dtype else None
    if source.is_dir():
        written = []
        weights = read_checkpoint_weights(source, ema=ema)
        name = json.loads((source / "state.json").read_text(encoding="utf-8")).get("name", "lora")
        step = int(source.name.removeprefix("step_")) if source.name.startswith("step_") else None
        for expert, w in weights.items():
            fname = lora.lora_filename(name, expert, step) if step is not None else f"{name}_{expert}.safetensors"
            written.append(write_layout(w, fmt, out / fname, torch_dtype))
        return written
    if ema:
        raise WantrainError(ProfileProblem("--ema", "needs a checkpoint folder (checkpoints/step_N)", str(source),
                                           "LoRA files already hold the weights they were saved with"))
    w = read_lora(source)
    if out.is_dir():
        out = out / source.name
    return [write_layout(w, fmt, out, torch_dtype)]


# ---------------------------------------------------------------- lora-info


def describe(path: str | Path) -> list[str]:
    """``wantrain lora-info``: layout, expert, modules, rank, alpha and metadata."""
    path = Path(path)
    if path.is_dir():
        lines = [f"{path}: resume checkpoint"]
        for expert, w in read_checkpoint_weights(path).items():
            lines += ["", *_describe_one(w)]
        return lines
    return [str(path), *_describe_one(read_lora(path))]


def _describe_one(w: LoraWeights) -> list[str]:
    blocks = sorted({int(n.split(".")[1]) for n in w.modules})
    kinds = sorted({n.split(".", 2)[2] for n in w.modules}, key=lambda k: list(lora.DIFFUSERS_TO_COMFY).index(k))
    alphas = sorted(set(w.alphas.values()))
    ranks = w.ranks
    scale = ", ".join(f"{a / r:g}" for a in alphas for r in ranks) if len(alphas) * len(ranks) <= 4 else "varies"
    lines = [
        f"layout: {w.layout}",
        f"expert: {w.expert or 'unknown (no metadata, no high_noise/low_noise in the name)'}",
        f"dtype: {str(w.dtype).removeprefix('torch.')}",
        f"modules: {len(w.modules)} ({len(blocks)} blocks x {len(kinds)}: {', '.join(kinds)})",
        f"rank: {', '.join(map(str, ranks))}",
        f"alpha: {', '.join(f'{a:g}' for a in alphas)} (scale alpha/rank = {scale})",
    ]
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


# ---------------------------------------------------------------- init_from


def resolve_init_path(value: str, profile_source: str | None) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not profile_source:
        return path
    beside = Path(profile_source).resolve().parent / path
    return beside if beside.exists() else path


def init_sources(path: Path, trained: list[str]) -> dict[str, LoraWeights]:
    """Which weights each trained expert starts from: a checkpoint folder, a
    file and its high_noise/low_noise partner, or one file for every expert."""
    if path.is_dir():
        return read_checkpoint_weights(path)
    if not path.is_file():
        raise WantrainError(ProfileProblem("target.init_from", "file not found", str(path),
                                           "give a LoRA .safetensors file or a checkpoints/step_N folder"))
    first = read_lora(path)
    if first.expert is None:
        log.info("init_from: %s names no expert; loading it into %s", path.name, " and ".join(trained))
        return {e: first for e in trained}
    out = {first.expert: first}
    other = "low_noise" if first.expert == "high_noise" else "high_noise"
    partner = path.with_name(path.name.replace(first.expert, other))
    if partner != path and partner.is_file():
        out[other] = read_lora(partner)
    return out


def fit_to_target(w: LoraWeights, target, where: str = "target.init_from") -> dict[str, torch.Tensor]:
    """Check rank and modules against ``[target]``; fp32 tensors at ``target.alpha``."""
    problems = []
    if w.ranks != [target.rank]:
        problems.append(ProfileProblem(where, f"has rank {', '.join(map(str, w.ranks))}, target.rank is {target.rank}",
                                       fix=f"set target.rank = {w.ranks[0]}" if len(w.ranks) == 1 else ""))
    extra = sorted({n.split(".", 2)[2] for n in w.modules} - set(target.modules))
    if extra:
        problems.append(ProfileProblem(where, "holds weights for modules target.modules does not list", extra,
                                       "add them to target.modules"))
    if problems:
        raise WantrainError(problems)
    return w.delta_state(target.alpha)


def load_init_from(run) -> None:
    """``[target] init_from``: copy an existing LoRA into the freshly attached
    adapters (before ``after_adapters_attached``; a resumed run then overwrites them)."""
    value = run.profile.target.init_from
    if not value:
        return
    path = resolve_init_path(value, run.profile.source)
    sources = init_sources(path, run.trained)
    for expert in run.trained:
        w = sources.get(expert)
        if w is None:
            log.warning("init_from: %s holds no %s weights; that expert starts fresh", path, expert)
            continue
        if w.skipped:
            log.warning("init_from: ignoring %d tensors wantrain does not train (e.g. %s)", len(w.skipped), w.skipped[0])
        state = fit_to_target(w, run.profile.target)
        try:
            lora.load_lora_state(run.experts[expert], state)
        except (KeyError, ValueError) as exc:
            raise WantrainError(ProfileProblem("target.init_from", f"does not fit this model: {exc.args[0]}", str(path),
                                               "use a LoRA trained for Wan 2.2 A14B (or the same model)")) from None
        log.info("init_from: %s starts from %s (%s layout, %d modules)", expert, path, w.layout, len(w.modules))
