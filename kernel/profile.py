"""Profiles: TOML -> frozen attrs sections through one strict cattrs converter.

A profile is read in four steps, and every problem found on the way is
collected so that the user sees all of them at once:

1. parse the TOML (``tomllib``), following ``extends = "base.toml"`` chains;
2. apply ``--set a.b=value`` overrides (values parsed as TOML);
3. structure the kernel sections (``job``, ``model``, ``target``,
   ``training``, ``datasets``) with :data:`converter`;
4. structure each ``[plugins.<name>]`` table with that plugin's ``Config``
   (the registry resolves the plugins, see :mod:`wantrain.registry`).

The converter is strict: unknown keys are errors with a did-you-mean, and no
value is coerced between int, float, bool and str (an int is accepted where
a float is expected -- TOML writes ``alpha = 16`` -- and nowhere else).
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from .errors import ProfileError, ProfileProblem
from .formats.toml import apply_overrides, dump_toml, read_toml

# --------------------------------------------------------------------------
# validators whose messages survive into the error line


class _Invalid(ValueError):
    """A validator's complaint: what, the value, the fix (and the field, once known)."""

    def __init__(self, what: str, got: Any, fix: str, field: str | None = None):
        super().__init__(what)
        self.what, self.got, self.fix, self.field = what, got, fix, field


def _named(check: Callable) -> Callable:
    """Attach the attribute's name to a validator's complaint (attrs runs
    validators in __init__, where cattrs no longer knows the field)."""

    def wrapper(inst, attr, value):
        try:
            check(inst, attr, value)
        except _Invalid as exc:
            exc.field = exc.field or attr.name
            raise

    wrapper.__wrapped__ = check
    return wrapper




def one_of(*allowed: str) -> Callable:
    def check(inst, attr, value):
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "use one of " + ", ".join(map(repr, allowed))
            raise _Invalid(f"must be one of {', '.join(map(repr, allowed))}", value, hint)

    return _named(check)


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False) -> Callable:
    def check(inst, attr, value):
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)
        )
        if bad:
            left = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}")
            right = ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]")
            raise _Invalid(f"must be in {left}, {right}", value, f"pick a value in {left}, {right}")

    return _named(check)


@_named
def positive(inst, attr, value):
    if value is not None and value <= 0:
        raise _Invalid("must be greater than 0", value, "use a positive number")


@_named
def optimizer_name(inst, attr, value):
    from .optimizers import NAMES

    if value not in NAMES and not (value.count(":") == 1 and all(value.split(":"))):
        close, names = difflib.get_close_matches(value, NAMES, n=1), ", ".join(map(repr, NAMES))
        raise _Invalid(f'must be one of {names} or "module:Class"', value, f"did you mean {close[0]!r}?" if close else
                       f'use one of {names}, or "module:Class" such as "torch.optim:SGD"')


@_named
def non_negative(inst, attr, value):
    if value is not None and value < 0:
        raise _Invalid("must be 0 or more", value, "use 0 or a positive number")


@_named
def non_empty(inst, attr, value):
    if not value:
        raise _Invalid("must not be empty", value, "give at least one value")


#: longest job.name: the LoRA files add "_<step:09d>_<tag>_high_noise_raw.safetensors"
#: (~50 characters) and most filesystems stop at 255 bytes
MAX_NAME = 100


@_named
def file_name_part(inst, attr, value):
    """A name that becomes part of file names inside the output folder."""
    bad = any(c in "/\\" or ord(c) < 32 or c == "\x7f" for c in value)  # separators, NUL, newlines, ...
    if bad or ".." in value or value.startswith(".") or len(value.encode()) > MAX_NAME:
        raise _Invalid(f"must be a plain file name part: no '/', '\\', NUL or control characters, no '..', "
                       f"no leading '.', at most {MAX_NAME} bytes", value,
                       'use letters, digits, "_" or "-", e.g. name = "my_lora"')


def nearest_frame_counts(n: int) -> tuple[int, int]:
    """The two valid frame counts (1 or 4k+1) around ``n``."""
    lower = max(1, ((n - 1) // 4) * 4 + 1)
    return lower, lower + 4


@_named
def frame_count(inst, attr, value):
    if value < 1 or (value - 1) % 4 != 0:
        lo, hi = nearest_frame_counts(max(value, 1))
        fix = f"use {lo} or {hi}" if lo != hi else f"use {lo}"
        raise _Invalid("must be 1 or 4n+1 (Wan's VAE packs 4 frames per latent frame)", value, fix)


# --------------------------------------------------------------------------
# kernel sections

DEFAULT_MODEL = "ai-toolkit/Wan2.2-T2V-A14B-Diffusers-bf16"
LORA_MODULES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)


def _default_output_dir(job: "JobConfig") -> str:
    return f"output/{job.name}"


@attrs.frozen(kw_only=True)
class JobConfig:
    name: str = attrs.field(validator=[non_empty, file_name_part])
    output_dir: str = attrs.field(default=attrs.Factory(_default_output_dir, takes_self=True))
    device: str = attrs.field(default="auto")  # "auto" | "cpu" | "cuda" | "cuda:N"
    trigger_word: str | None = None
    seed: int = 42

    @device.validator
    def _device(self, attr, value):
        if value not in ("auto", "cpu", "cuda", "mps") and not value.startswith("cuda:"):
            raise _Invalid("must be 'auto', 'cpu', 'cuda' or 'cuda:N'", value, 'use device = "auto"', attr.name)


@attrs.frozen(kw_only=True)
class ModelConfig:
    arch: str = attrs.field(default="wan22_t2v_a14b", validator=one_of("wan22_t2v_a14b", "wan22_i2v_a14b", "wan22_ti2v_5b"))
    name_or_path: str = DEFAULT_MODEL
    #: original-layout single files (ComfyUI's) instead of name_or_path's components; docs/memory.md
    high_noise: str | None = attrs.field(default=None, validator=attrs.validators.optional(non_empty))
    low_noise: str | None = attrs.field(default=None, validator=attrs.validators.optional(non_empty))
    text_encoder: str | None = attrs.field(default=None, validator=attrs.validators.optional(non_empty))
    vae: str | None = attrs.field(default=None, validator=attrs.validators.optional(non_empty))
    tokenizer: str | None = attrs.field(default=None, validator=attrs.validators.optional(non_empty))
    dtype: str = attrs.field(default="bf16", validator=one_of("bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = True
    attention: str = "auto"  # "sdpa", "flash", "flash3", ...: checked by wantrain.attention (docs/attention.md)
    max_sequence_length: int = attrs.field(default=512, validator=positive)
    #: TI2V-5B: share of samples trained image-to-video (start frame); None = 0.5
    i2v_probability: float | None = attrs.field(default=None, validator=attrs.validators.optional(in_range(0, 1)))
    #: I2V-A14B: also condition on each sample's last frame (first/last-frame LoRAs)
    last_frame: bool = False


@attrs.frozen(kw_only=True)
class TargetConfig:
    type: str = attrs.field(default="lora", validator=one_of("lora", "dora", "lokr", "loha"))  # docs/adapters.md
    rank: int = attrs.field(default=16, validator=positive)
    lokr_factor: int = attrs.field(default=-1, validator=in_range(-1))  # LoKr: Kronecker factor; -1 = near sqrt
    lokr_full_rank: bool = False  # LoKr: w2 a full matrix (LyCORIS full_matrix); alpha then unused
    alpha: float = attrs.field(default=16.0, validator=positive)
    modules: tuple[str, ...] = attrs.field(default=LORA_MODULES, validator=non_empty)
    save_dtype: str = attrs.field(default="bf16", validator=one_of("bf16", "fp16", "fp32"))
    #: start from an existing LoRA file (ours, diffusers/PEFT, kohya/musubi), or a table
    #: {high_noise = "...", low_noise = "..."} with a file per expert; see docs/checkpoints.md
    init_from: str | dict[str, str] | None = None


@attrs.frozen(kw_only=True)
class TrainingConfig:
    batch_size: int = attrs.field(default=1, validator=positive)
    gradient_accumulation: int = attrs.field(default=1, validator=positive)
    steps: int = attrs.field(default=2000, validator=positive)
    optimizer: str = attrs.field(default="adamw", validator=optimizer_name)  # a name or "module:Class": docs/optimizers.md
    optimizer_args: dict[str, Any] = attrs.field(factory=dict, hash=False)  # keyword arguments of the optimizer
    lr: float = attrs.field(default=1e-4, validator=positive)
    lr_scheduler: str = attrs.field(default="constant", validator=one_of("constant", "linear", "cosine"))
    warmup_steps: int = attrs.field(default=0, validator=non_negative)
    weight_decay: float = attrs.field(default=1e-4, validator=non_negative)
    max_grad_norm: float = attrs.field(default=1.0, validator=non_negative)  # 0 = no clipping
    loss: str = attrs.field(default="mse", validator=one_of("mse", "huber"))
    num_workers: int = attrs.field(default=2, validator=non_negative)  # decoding processes; 0 = in the loop
    compile: bool = False  # torch.compile each transformer block (one graph for all): wantrain.compilation
    #: a step whose loss or gradient norm is nan/inf: "stop" the run (exit 2) or "skip" its update
    on_nonfinite: str = attrs.field(default="stop", validator=one_of("stop", "skip"))
    #: with "skip": more skipped steps than this in one `wantrain run` stops it
    max_nonfinite_steps: int = attrs.field(default=10, validator=non_negative)


@attrs.frozen(kw_only=True)
class DatasetConfig:
    folder: str = attrs.field(validator=non_empty)
    weight: float = attrs.field(default=1.0, validator=positive)
    repeats: int = attrs.field(default=1, validator=positive)
    default_caption: str | None = None
    caption_ext: str = attrs.field(default="txt", validator=non_empty)
    caption_dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))
    resolutions: tuple[int, ...] = attrs.field(default=(512,), validator=non_empty)
    num_frames: int = attrs.field(default=33, validator=frame_count)
    frame_sampling: str = attrs.field(default="uniform", validator=one_of("uniform", "fps"))
    flip_x: bool = False
    flip_y: bool = False
    is_regularization: bool = False
    #: "held_out": never trained on (a plugin may measure it, e.g. docs/plugins/validation.md)
    role: str = attrs.field(default="train", validator=one_of("train", "held_out"))
    #: prior preservation: the loss of this dataset's batches is multiplied by it (regularization datasets only)
    prior_loss_weight: float = attrs.field(default=1.0, validator=non_negative)
    cache_latents: bool = False

    @prior_loss_weight.validator
    def _prior_loss_weight(self, attr, value):
        if value != 1.0 and not self.is_regularization:
            raise _Invalid("only used by is_regularization = true datasets", value,
                           "set is_regularization = true, or remove prior_loss_weight", attr.name)

    @resolutions.validator
    def _resolutions(self, attr, value):
        for r in value:
            if r < 16 or r % 16:
                raise _Invalid("each resolution must be a multiple of 16, at least 16", r, "use e.g. 256, 512 or 768", attr.name)


@attrs.frozen(kw_only=True)
class DistributedConfig:
    """``[distributed]``: read only when torchrun starts 2+ processes (docs/distributed.md)."""

    strategy: str = attrs.field(default="ddp", validator=one_of("ddp", "fsdp"))  # fsdp: frozen base sharded per block
    sequence_parallel: int = attrs.field(default=1, validator=positive)  # processes splitting one clip's tokens
    timeout_minutes: float = attrs.field(default=30.0, validator=positive)  # a stuck collective ends the job


@attrs.frozen(kw_only=True)
class PluginsConfig:
    """``[plugins]``: which plugins run, in order, and each one's settings."""

    enabled: tuple[str, ...] = ()
    configs: Mapping[str, Any] = attrs.field(factory=dict, eq=False)


@attrs.frozen(kw_only=True)
class Profile:
    job: JobConfig
    model: ModelConfig = attrs.Factory(ModelConfig)
    target: TargetConfig = attrs.Factory(TargetConfig)
    training: TrainingConfig = attrs.Factory(TrainingConfig)
    datasets: tuple[DatasetConfig, ...] = ()
    plugins: PluginsConfig = attrs.Factory(PluginsConfig)
    distributed: DistributedConfig = attrs.Factory(DistributedConfig)
    #: the resolved TOML document (after extends and --set), as a dict
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    #: where it was read from (None when built in code)
    source: str | None = attrs.field(default=None, eq=False)

    def plugin_config(self, name: str) -> Any:
        return self.plugins.configs.get(name)

    @property
    def base_dir(self) -> Path | None:
        """The folder of the profile file (None when built in code)."""
        return Path(self.source).resolve().parent if self.source else None

    def resolve_path(self, value: str | Path) -> Path:
        """A path written in the profile (see :func:`resolve_beside`)."""
        return resolve_beside(value, self.base_dir)

    def to_toml(self) -> str:
        return dump_toml(self.raw)


def resolve_beside(value: str | Path, base_dir: Path | None) -> Path:
    """Every path a profile holds (dataset folders, init_from, plugin files,
    ARA files, cache folders) is resolved this one way: ``~`` expanded; an
    absolute path, or one that exists from the current folder, as it is;
    otherwise the path beside the profile file (``base_dir``) when that
    exists; else as written, so an error names what the user wrote."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return path
    beside = base_dir / path
    return beside if beside.exists() else path


KERNEL_SECTIONS = {
    "job": JobConfig,
    "model": ModelConfig,
    "target": TargetConfig,
    "training": TrainingConfig,
    "distributed": DistributedConfig,
}
TOP_LEVEL_KEYS = ("extends", "job", "model", "target", "training", "datasets", "plugins", "distributed")


# --------------------------------------------------------------------------
# the converter


def _strict(kind: type, what: str, example: str) -> Callable:
    def structure(value, _type):
        ok = type(value) is kind or (kind is float and type(value) is int)
        if not ok:
            raise _Invalid(f"expected {what}", value, f"write {example}")
        return float(value) if kind is float else value

    return structure


def make_converter() -> cattrs.Converter:
    """The one strict converter used for kernel sections and plugin Configs."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict(int, "an integer", "a whole number such as 200"))
    conv.register_structure_hook(float, _strict(float, "a number", "a number such as 0.5"))
    conv.register_structure_hook(bool, _strict(bool, "true or false", "true or false (no quotes)"))
    conv.register_structure_hook(str, _strict(str, "a string", 'a quoted string such as "text"'))
    conv.register_structure_hook_func(lambda t: t == INIT_FROM, _init_from)
    return conv


INIT_FROM = str | dict[str, str] | None


def _init_from(value, _type):
    """``[target] init_from``: a path, or a table with a path per expert."""
    fix = 'write init_from = "file.safetensors" or {high_noise = "a.safetensors", low_noise = "b.safetensors"}'
    if value is not None and type(value) is not str and type(value) is not dict:
        raise _Invalid("expected a path or a table {high_noise = ..., low_noise = ...}", value, fix)
    if type(value) is dict and (not value or set(value) - {"high_noise", "low_noise"}):
        raise _Invalid("a table takes only high_noise and low_noise", value, fix)
    for expert, path in (value.items() if type(value) is dict else ()):
        if type(path) is not str:
            raise _Invalid("expected a string", path, 'write a quoted path such as "a.safetensors"', expert)
    return value


converter = make_converter()


def _fields_of(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)] if attrs.has(cls) else []


def _problems_from(exc: BaseException, where: str, cls: type | None, value: Any) -> list[ProfileProblem]:
    """Flatten a cattrs exception tree into one problem per leaf."""
    out: list[ProfileProblem] = []
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = _fields_of(exc.cl)
        for key in sorted(exc.extra_fields):
            close = difflib.get_close_matches(key, allowed, n=1)
            fix = f"did you mean {close[0]!r}?" if close else "remove it; known keys: " + ", ".join(allowed)
            out.append(ProfileProblem(_join(where, key), "unknown key", value.get(key) if isinstance(value, dict) else ProfileProblem._MISSING, fix))
        return out
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        for sub in exc.exceptions:
            sub_where, sub_value, sub_cls = where, value, None
            for note in getattr(sub, "__notes__", []):
                name = getattr(note, "name", None)
                if name is None:
                    name = getattr(note, "index", None)
                if name is None:
                    continue
                sub_where = _join(where, name)
                try:
                    sub_value = value[name]
                except (KeyError, IndexError, TypeError):
                    sub_value = ProfileProblem._MISSING
                sub_cls = getattr(note, "type", None)
            out.extend(_problems_from(sub, sub_where, sub_cls, sub_value))
        return out
    if isinstance(exc, KeyError):
        field = exc.args[0] if exc.args else "?"
        return [ProfileProblem(where, "is required", fix=f"add {field} = ...")]
    if isinstance(exc, _Invalid):
        if exc.field and not where.endswith(f".{exc.field}"):
            where = _join(where, exc.field)
        return [ProfileProblem(where, exc.what, exc.got, exc.fix)]
    if isinstance(exc, ValueError) and str(exc):
        return [ProfileProblem(where, str(exc), value)]
    return [ProfileProblem(where, f"invalid value ({type(exc).__name__}: {exc})", value)]


def _join(where: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def structure_section(data: Any, cls: type, where: str) -> tuple[Any, list[ProfileProblem]]:
    """Structure ``data`` into ``cls``; return (object or None, problems)."""
    if not isinstance(data, dict):
        return None, [ProfileProblem(where, "must be a table", data, f"write [{where}] with keys under it")]
    required = [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING]
    problems = [
        ProfileProblem(_join(where, name), "is required", fix=f"add {name} = ... under [{where.split('[')[0]}]")
        for name in required
        if name not in data
    ]
    filled = {**{n: _placeholder(cls, n) for n in required if n not in data}, **data}
    try:
        # validators are run one by one below, so that every bad value of
        # the table is reported, not just the first
        with attrs.validators.disabled():
            obj = converter.structure(filled, cls)
    except Exception as exc:  # noqa: BLE001 - translated into problems
        found = _problems_from(exc, where, cls, data)
        return None, problems + found + _validate_rest(filled, cls, where, found)
    problems += _run_validators(obj, where)
    return (None if problems else obj), problems


def _validate_rest(filled: dict, cls: type, where: str, found: list[ProfileProblem]) -> list[ProfileProblem]:
    """After type errors, still run the validators of the keys that were fine."""
    bad = {p.where[len(where) + 1 :].split(".")[0].split("[")[0] for p in found}
    rest = {k: (_placeholder(cls, k) if k in bad else v) for k, v in filled.items() if k in attrs.fields_dict(cls)}
    try:
        with attrs.validators.disabled():
            obj = converter.structure(rest, cls)
    except Exception:  # noqa: BLE001 - nothing more to learn
        return []
    return [p for p in _run_validators(obj, where) if p.where[len(where) + 1 :].split("[")[0] not in bad]


def _run_validators(obj: Any, where: str) -> list[ProfileProblem]:
    problems = []
    for field in attrs.fields(type(obj)):
        if field.validator is None:
            continue
        value = getattr(obj, field.name)
        try:
            field.validator(obj, field, value)
        except _Invalid as exc:
            problems.append(ProfileProblem(_join(where, field.name), exc.what, exc.got, exc.fix))
        except (ValueError, TypeError) as exc:
            problems.append(ProfileProblem(_join(where, field.name), str(exc), value))
    return problems


def _placeholder(cls: type, name: str) -> Any:
    """A stand-in of the field's type for a missing or ill-typed value, so the
    other fields' validators can still run. The annotation is a string until
    cattrs has resolved the class's types, the type itself afterwards."""
    kind = attrs.fields_dict(cls)[name].type
    return {"int": 1, "float": 1.0, "bool": False, "str": "x"}.get(getattr(kind, "__name__", kind), "x")


# --------------------------------------------------------------------------
# the whole profile


def structure_kernel(data: dict) -> tuple[dict, list[ProfileProblem]]:
    """Structure the kernel sections of a resolved TOML document."""
    problems: list[ProfileProblem] = []
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
            fix = f"did you mean {close[0]!r}?" if close else "known sections: " + ", ".join(TOP_LEVEL_KEYS[1:])
            problems.append(ProfileProblem(key, "unknown section", ProfileProblem._MISSING, fix))
    parts: dict[str, Any] = {}
    for name, cls in KERNEL_SECTIONS.items():
        if name not in data:
            if name == "job":
                problems.append(ProfileProblem("job", "is required", fix='add [job] with name = "my_lora"'))
            continue
        obj, found = structure_section(data[name], cls, name)
        problems += found
        if obj is not None:
            parts[name] = obj
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list):
        problems.append(ProfileProblem("datasets", "must be an array of tables", datasets, "write [[datasets]] blocks"))
        datasets = []
    structured = []
    for i, entry in enumerate(datasets):
        obj, found = structure_section(entry, DatasetConfig, f"datasets[{i}]")
        problems += found
        if obj is not None:
            structured.append(obj)
    parts["datasets"] = tuple(structured)
    return parts, problems


def load_profile(path: str | Path | None = None, overrides: list[str] = (), *, data: dict | None = None) -> Profile:
    """Read, merge, override and validate a profile; raise ProfileError with
    every problem at once. Plugins are resolved here too (no weights load)."""
    from . import registry  # the registry structures plugin tables

    if data is None:
        data = read_toml(Path(path))
    else:
        data = copy.deepcopy(data)
    data = apply_overrides(data, list(overrides))
    nonfinite = nonfinite_numbers(data, "")
    parts, problems = structure_kernel(data)
    enabled, configs, plugin_problems = registry.structure_plugins(data.get("plugins", {}), base_dir=_base_dir(path))
    problems += plugin_problems
    if problems or nonfinite:  # one line per key: a nan/inf key's other complaints are dropped
        raise ProfileError(nonfinite + [p for p in problems if p.where not in {q.where for q in nonfinite}])
    profile = Profile(
        **parts,
        plugins=PluginsConfig(enabled=enabled, configs=configs),
        raw=data,
        source=str(path) if path else None,
    )
    problems = _cross_checks(profile)
    if problems:
        raise ProfileError(problems)
    return profile


def nonfinite_numbers(value: Any, where: str) -> list[ProfileProblem]:
    """nan / inf anywhere in the document (plugin tables included), one problem per key."""
    if isinstance(value, float) and not math.isfinite(value):
        return [ProfileProblem(where, "must be a finite number", value, "nan and inf are not allowed; write a number such as 0.5")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nonfinite_numbers(v, _join(where, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nonfinite_numbers(v, _join(where, i))]
    return []


def _base_dir(path) -> Path:
    return Path(path).resolve().parent if path else Path.cwd()


def _cross_checks(profile: Profile) -> list[ProfileProblem]:
    problems = []
    tcfg = profile.training
    if tcfg.warmup_steps >= tcfg.steps and tcfg.warmup_steps > 0:
        problems.append(
            ProfileProblem("training.warmup_steps", "must be smaller than training.steps", tcfg.warmup_steps, f"use fewer than {tcfg.steps}")
        )
    arch, mcfg = profile.model.arch, profile.model
    if mcfg.last_frame and arch != "wan22_i2v_a14b":
        problems.append(ProfileProblem("model.last_frame", f"needs arch = \"wan22_i2v_a14b\" (the arch is {arch})", True,
                                       'remove last_frame, or set [model] arch = "wan22_i2v_a14b"'))
    if isinstance(profile.target.init_from, dict) and arch == "wan22_ti2v_5b":  # one expert: one file
        problems.append(ProfileProblem("target.init_from", f"is a table of experts; {arch} has one expert", "{...}",
                                       'write init_from = "file.safetensors"'))
    if mcfg.i2v_probability is not None and arch != "wan22_ti2v_5b":
        problems.append(ProfileProblem("model.i2v_probability", f"only mixes text/image-to-video for arch = \"wan22_ti2v_5b\" (the arch is {arch})",
                                       mcfg.i2v_probability, "remove i2v_probability"))
    from . import adapters
    from .optimizers import problems as optimizer_problems  # the class and its arguments, before any weight loads

    problems += optimizer_problems(tcfg) + adapters.profile_problems(profile.target)
    unknown = [m for m in profile.target.modules if m not in LORA_MODULES]
    for m in unknown:
        close = difflib.get_close_matches(m, LORA_MODULES, n=1)
        fix = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(LORA_MODULES)
        problems.append(ProfileProblem("target.modules", "unknown LoRA target", m, fix))
    return problems
