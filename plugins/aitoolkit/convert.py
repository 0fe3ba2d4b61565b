"""ai-toolkit job config (YAML) -> wantrain profile (TOML data).

Every key of the source is accounted for, one of three ways:

- **mapped**: its value lands in a profile key (the table at the end of
  ``docs/import.md`` lists them);
- **no-op**: its value is what wantrain does anyway (``train_unet: true``,
  ``noise_scheduler: flowmatch``, ``mask_path: null``) -- nothing to say;
- **not carried over**: a line ``not carried over: <yaml path>: <why>``.

A key ai-toolkit does not know (a typo) or a value wantrain cannot express
at all (another architecture, several processes) is an error: one
:class:`~wantrain.errors.ProfileProblem` per key, all reported together.
"""

from __future__ import annotations

from typing import Any

import attrs

from wantrain.errors import ProfileProblem, WantrainError

#: a 4-bit ARA spec is ``"<qtype>|<hub repo>/<file>"``
ARA_SEP = "|"
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}
TRANSFORMER_QTYPES = {"qfloat8": "qfloat8", "float8": "qfloat8", "qint8": "qint8", "int8": "qint8", "uint8": "qint8",
                      "qint4": "qint4", "uint4": "qint4", "int4": "qint4"}
LOWER_BITS = {"uint2", "uint3", "qint2", "int2", "int3"}  # below 4 bits: wantrain's lowest is 4
MIDDLE_BITS = {"uint5", "uint6", "uint7"}
TE_QTYPES = {"qfloat8": "qfloat8", "float8": "qfloat8", "qint8": "qint8", "int8": "qint8", "uint8": "qint8"}
OPTIMIZERS = {"adamw8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "adam8bit": "adamw8bit",
              "adamw": "adamw", "adam": "adamw", "adafactor": "adafactor"}
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine",
              "cosine_with_restarts": "cosine"}
TIMESTEP_TYPES = {"linear": "linear", "sigmoid": "sigmoid", "shift": "shift", "weighted": "weighted",
                  "lognorm_blend": "logit_normal", "flux_shift": "shift"}
BIAS = {"balanced": "balanced", "content": "high_noise", "style": "low_noise"}
ARCHES = {"wan22_14b": "wan22_t2v_a14b", "wan22_14b_t2v": "wan22_t2v_a14b", "wan22_14b_i2v": "wan22_i2v_a14b",
          "wan22_5b": "wan22_ti2v_5b"}
ONE_EXPERT = "wan22_ti2v_5b"  # no second expert: no multistage, no parked expert
PLUGIN_ORDER = ("quantize", "offload", "multistage", "timesteps", "text_cache", "dop", "diff_guidance", "ema",
                "latent_cache", "checkpoints", "sample", "tensorboard", "progress")

NOOP = object()  # marks "any value is fine": the key is informational
#: keys wantrain does not carry over: ``key: (values that change nothing, why)``.
#: A value in the first tuple is silently fine (it is what wantrain does anyway).
Dropped = dict[str, tuple[tuple, str]]

PROCESS_DROPPED: Dropped = {
    "performance_log_every": ((None,), "wantrain reports s/step in the progress bar and TensorBoard"),
    "sqlite_db_path": ((NOOP,), "the ai-toolkit UI's job database"),
    "logging": ((None, {}), "wantrain logs to TensorBoard (plugin tensorboard) and the progress bar"),
    "slider": ((None, {}), "sliders are not a wantrain LoRA kind"),
    "fizgig_slider": ((None, {}), "sliders are not a wantrain LoRA kind"),
    "flow_dpo": ((None, {}), "DPO training is not in wantrain"),
    "adapter": ((None, {}), "adapters other than LoRA are not in wantrain"),
    "embedding": ((None, {}), "textual inversion is not in wantrain"),
    "validation": ((None, {}), "wantrain has no validation loss yet"),
}
MODEL_DROPPED: Dropped = {
    "quantize_kwargs": ((None, {}), "module patterns differ; wantrain keeps embeddings, norms and the head in high "
                                    "precision (plugins.quantize.exclude)"),
    "low_vram_layer_streaming": ((None, False), "use plugins.offload.layers"),
    "layer_offloading_text_encoder_percent": ((NOOP,), "wantrain does not stream the text encoder; text_cache frees it "
                                                       "after encoding"),
    "assistant_lora_path": ((None, ""), "wantrain trains without an assistant LoRA"),
    "inference_lora_path": ((None, ""), "previews use only the LoRA in training"),
    "unconditional_lora_path": ((None, ""), "not in wantrain"),
    "text_encoder_path": ((None, ""), "the text encoder comes from the model folder"),
    "vae_path": ((None, ""), "the VAE comes from the model folder"),
    "compile": ((None, False), "wantrain does not torch.compile yet"),
    "block_compile": ((None, False), "wantrain does not torch.compile yet"),
    "compile_mode": ((NOOP,), "wantrain does not torch.compile yet"),
    "compile_fullgraph": ((NOOP,), "wantrain does not torch.compile yet"),
    "compile_dynamic": ((NOOP,), "wantrain does not torch.compile yet"),
    "cache_size_limit": ((NOOP,), "wantrain does not torch.compile yet"),
    "split_model_over_gpus": ((None, False), "use torchrun (data parallel) instead"),
    "is_v2": ((None, False), "Stable Diffusion option"),
    "is_xl": ((None, False), "Stable Diffusion option"),
    "is_v_pred": ((None, False), "Stable Diffusion option"),
    "experimental_xl": ((None, False), "Stable Diffusion option"),
    "use_text_encoder_1": ((None, True), "Stable Diffusion option"),
    "use_text_encoder_2": ((None, True), "Stable Diffusion option"),
}
NETWORK_DROPPED: Dropped = {
    "conv": ((None, 0), "Wan's LoRA targets are linear layers only"),
    "conv_alpha": ((NOOP,), "Wan's LoRA targets are linear layers only"),
    "lokr_full_rank": ((None, False), "wantrain has no LoKr yet"),
    "lokr_factor": ((None, -1), "wantrain has no LoKr yet"),
    "dropout": ((None, 0, 0.0), "wantrain has no LoRA dropout"),
    "normalize": ((None, False), "not in wantrain"),
    "save_magnitude_less_lora": ((None, False), "not in wantrain"),
    "transformer_only": ((None, True), "wantrain trains the transformer experts only"),
}
SAVE_DROPPED: Dropped = {
    "save_format": ((None, "safetensors"), "wantrain writes ComfyUI-layout safetensors; `wantrain export --format "
                                           "diffusers` writes the diffusers layout"),
    "push_to_hub": ((None, False), "wantrain does not upload; use `huggingface-cli upload`"),
    "hf_repo_id": ((None, ""), "wantrain does not upload"),
    "hf_private": ((NOOP,), "wantrain does not upload"),
    "record_low_window_size": ((NOOP,), "no best-loss saves in wantrain"),
    "record_low_start_step": ((NOOP,), "no best-loss saves in wantrain"),
    "sample_on_record_low": ((None, False), "no best-loss saves in wantrain"),
    "max_record_low_saves_to_keep": ((NOOP,), "no best-loss saves in wantrain"),
}
DATASET_DROPPED: Dropped = {
    "type": ((None, "image"), "wantrain datasets are folders of images and clips"),
    "dataset_path": ((None, ""), "use folder_path"),
    "network_weight": ((None, 1, 1.0), "wantrain has no per-dataset LoRA strength"),
    "mask_path": ((None, ""), "wantrain has no loss masks yet"),
    "mask_min_value": ((NOOP,), "wantrain has no loss masks yet"),
    "alpha_mask": ((None, False), "wantrain has no loss masks yet"),
    "controls": ((None, []), "control inputs are for other architectures"),
    "control_path": ((None, ""), "control inputs are for other architectures"),
    "control_path_1": ((None, ""), "control inputs are for other architectures"),
    "control_path_2": ((None, ""), "control inputs are for other architectures"),
    "control_path_3": ((None, ""), "control inputs are for other architectures"),
    "do_audio": ((None, False), "Wan 2.2 A14B has no audio"),
    "audio_normalize": ((NOOP,), "Wan 2.2 A14B has no audio"),
    "audio_preserve_pitch": ((NOOP,), "Wan 2.2 A14B has no audio"),
    "fps": ((None, 16), 'wantrain plays samples at Wan\'s 16 fps (frame_sampling = "fps" keeps real speed)'),
    "auto_frame_count": ((None, False), "wantrain uses num_frames for every clip"),
    "random_triggers": ((None, []), "not in wantrain"),
    "token_dropout_rate": ((None, 0, 0.0), "not in wantrain"),
    "shuffle_tokens": ((None, False), "not in wantrain"),
    "random_scale": ((None, False), "wantrain never rescales beyond its bucket"),
    "random_crop": ((None, False), "wantrain centre-crops"),
    "scale": ((None, 1, 1.0), "not in wantrain"),
    "buckets": ((None, True), "wantrain always buckets by aspect ratio"),
    "bucket_tolerance": ((NOOP,), "wantrain's buckets are multiples of 16"),
    "augments": ((None, []), "not in wantrain"),
    "augmentations": ((None, []), "not in wantrain"),
    "shuffle_augmentations": ((None, False), "not in wantrain"),
    "poi": ((None, ""), "wantrain centre-crops"),
    "batch_size": ((None, 1), "set training.batch_size"),
}
TRAIN_DROPPED: Dropped = {
    "train_unet": ((None, True), "wantrain always trains the transformer"),
    "train_text_encoder": ((None, False), "wantrain does not train UMT5"),
    "noise_scheduler": ((None, "flowmatch"), "wantrain trains flow matching"),
    "text_encoder_lr": ((NOOP,), "wantrain does not train UMT5"),
    "embedding_lr": ((NOOP,), "no embedding training"),
    "adapter_lr": ((NOOP,), "no adapter training"),
    "lr_scheduler_params": ((None, {}), "wantrain's schedules take only training.warmup_steps"),
    "min_denoising_steps": ((None, 0), "use plugins.timesteps"),
    "max_denoising_steps": ((None, 999, 1000), "use plugins.timesteps"),
    "xformers": ((None, False), "wantrain uses PyTorch SDPA"),
    "sdp": ((None, False, True), "wantrain uses PyTorch SDPA"),
    "min_snr_gamma": ((None,), "not used with flow matching"),
    "noise_offset": ((None, 0, 0.0), "not in wantrain"),
    "weight_jitter": ((None, 0, 0.0), "not in wantrain"),
    "merge_network_on_save": ((None, False), "not in wantrain"),
    "start_step": ((None,), "wantrain resumes from its own checkpoints (`--resume`)"),
    "free_u": ((None, False), "not in wantrain"),
    "adapter_assist_name_or_path": ((None, ""), "not in wantrain"),
    "noise_multiplier": ((None, 1, 1.0), "not in wantrain"),
    "img_multiplier": ((None, 1, 1.0), "not in wantrain"),
    "short_and_long_captions": ((None, False), "not in wantrain"),
    "single_item_batching": ((None, False), "use training.gradient_accumulation"),
    "match_adapter_assist": ((None, False), "not in wantrain"),
    "match_adapter_chance": ((None, 0, 0.0), "not in wantrain"),
    "loss_target": ((None, "noise"), "wantrain's target is flow matching's noise - x0"),
    "inverted_mask_prior": ((None, False), "no loss masks in wantrain"),
    "inverted_mask_prior_multiplier": ((NOOP,), "no loss masks in wantrain"),
    "bypass_guidance_embedding": ((None, False), "Wan has no guidance embedding"),
    "do_cfg": ((None, False), "not in wantrain"),
    "do_random_cfg": ((None, False), "not in wantrain"),
    "blank_prompt_preservation": ((None, False), "not in wantrain (DOP is: diff_output_preservation)"),
    "blank_prompt_preservation_multiplier": ((NOOP,), "not in wantrain"),
    "frequency_loss_type": ((None, "none"), "not in wantrain"),
    "frequency_loss_weight": ((NOOP,), "not in wantrain"),
    "frequency_loss_cutoff": ((NOOP,), "not in wantrain"),
    "frequency_loss_min_period": ((NOOP,), "not in wantrain"),
    "frequency_loss_max_period": ((NOOP,), "not in wantrain"),
    "frequency_loss_transition": ((NOOP,), "not in wantrain"),
    "frequency_loss_patch_size": ((NOOP,), "not in wantrain"),
    "frequency_loss_activation_offload": ((NOOP,), "not in wantrain"),
    "audio_loss_multiplier": ((NOOP,), "Wan 2.2 A14B has no audio"),
    "max_loss": ((None,), "not in wantrain"),
    "validation_config": ((None, {}), "wantrain has no validation loss yet"),
    "do_guidance_loss": ((None, False), "not in wantrain"),
    "guidance_loss_target": ((NOOP,), "not in wantrain"),
    "force_first_sample": ((None, False), "mapped through skip_first_sample"),
}
SAMPLE_DROPPED: Dropped = {
    "sampler": ((None, "flowmatch"), "previews use Wan's flow-matching sampler"),
    "walk_seed": ((None, False), "previews use one fixed seed so steps are comparable"),
    "network_multiplier": ((None, 1, 1.0), "previews apply the LoRA at strength 1"),
    "guidance_rescale": ((None, 0, 0.0), "not in wantrain"),
    "format": ((NOOP,), "previews are H.264 mp4 files"),
    "ext": ((NOOP,), "previews are H.264 mp4 files"),
    "sample_start_step": ((None, 0), "previews run every plugins.sample.every steps from the start"),
    "comfy": ((NOOP,), "previews render in wantrain, not through ComfyUI"),
    "duration": ((None,), "set num_frames"),
    "adapter_conditioning_scale": ((NOOP,), "not in wantrain"),
}
SAMPLE_ITEM_KEYS = ("prompt", "width", "height", "neg", "seed", "guidance_scale", "sample_steps", "fps", "num_frames",
                    "duration", "ctrl_img", "ctrl_idx", "network_multiplier", "ctrl_img_1", "ctrl_img_2", "ctrl_img_3")


@attrs.define
class Conversion:
    """The profile (TOML data), the lines about what did not carry over, and
    the problems that stop the conversion."""

    profile: dict[str, Any] = attrs.Factory(dict)
    dropped: list[str] = attrs.Factory(list)
    problems: list[ProfileProblem] = attrs.Factory(list)
    plugins: dict[str, dict[str, Any]] = attrs.Factory(dict)
    sampling: bool = True  # train.disable_sampling turns previews off
    at_start: bool | None = None  # train.skip_first_sample
    #: each dataset's do_i2v (None: not given), for the TI2V-5B's i2v_probability
    do_i2v: list[bool | None] = attrs.Factory(list)

    def put(self, dotted: str, value: Any) -> None:
        """Set ``job.name`` or ``plugins.quantize.transformer`` in the profile."""
        head, *rest = dotted.split(".")
        table = self.plugins.setdefault(rest.pop(0), {}) if head == "plugins" else self.profile.setdefault(head, {})
        for key in rest[:-1]:
            table = table.setdefault(key, {})
        table[rest[-1]] = value

    def enable(self, plugin: str) -> None:
        self.plugins.setdefault(plugin, {})

    def drop(self, where: str, why: str) -> None:
        self.dropped.append(f"not carried over: {where}: {why}")

    def error(self, where: str, what: str, got: Any = ProfileProblem._MISSING, fix: str = "") -> None:
        self.problems.append(ProfileProblem(where, what, got, fix))


class Section:
    """One YAML mapping being read: ``take`` marks keys as used; ``finish``
    accounts for the rest (no-op, not carried over, or unknown)."""

    def __init__(self, conv: Conversion, where: str, data: Any, dropped: Dropped | None = None):
        self.conv, self.where, self.dropped = conv, where, dropped or {}
        if data is None:
            data = {}
        if not isinstance(data, dict):
            conv.error(where, "must be a mapping", data, "see ai-toolkit's config/examples")
            data = {}
        self.data, self.used = data, set()

    def has(self, key: str) -> bool:
        return key in self.data

    def take(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def typed(self, key: str, kind: type | tuple, default: Any = None) -> Any:
        """``take`` with a type check (bool is not an int here)."""
        value = self.take(key, default)
        if value is None or value is default:
            return value
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, str):  # PyYAML reads `lr: 1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            self.conv.error(self.path(key), f"expected {' or '.join(k.__name__ for k in kinds)}", value)
            return default
        return value

    def finish(self, known: tuple[str, ...] = ()) -> None:
        for key, value in self.data.items():
            if key in self.used or key in known:
                continue
            if key in self.dropped:
                noop, why = self.dropped[key]
                if NOOP not in noop and not any(value == v and type(value) is type(v) or value is v for v in noop):
                    self.conv.drop(self.path(key), why)
            else:
                self.conv.error(self.path(key), "unknown key", value, "not an ai-toolkit key; check the spelling")


def convert(data: Any, name_hint: str = "my_lora") -> Conversion:
    """Convert a parsed ai-toolkit job config. Raises :class:`WantrainError`
    with every problem found; otherwise returns the conversion (profile data
    in ``profile``, with ``[plugins]`` filled in)."""
    conv = Conversion()
    top = Section(conv, "job config", data, {"meta": ((None, {}), "ai-toolkit's own metadata")})
    job_kind = top.take("job")
    if job_kind != "extension":
        conv.error("job", "expected an ai-toolkit training job", job_kind, "the file starts with `job: extension`")
    config = Section(conv, "config", top.take("config"))
    if top.has("meta"):
        conv.drop("meta", "ai-toolkit's own metadata (wantrain stores the resolved profile in every LoRA file)")
        top.used.add("meta")
    top.finish()
    name = config.typed("name", str) or name_hint
    processes = config.take("process")
    config.finish()
    if not isinstance(processes, list) or not processes:
        conv.error("config.process", "expected a list with one training process", processes)
    elif len(processes) > 1:
        conv.error("config.process", "wantrain converts one process per job", len(processes),
                   "split the job into one file per process")
    else:
        _process(conv, Section(conv, "config.process[0]", processes[0], PROCESS_DROPPED), name)
    if conv.problems:
        raise WantrainError(conv.problems)
    enabled = [p for p in PLUGIN_ORDER if p in conv.plugins]
    conv.profile["plugins"] = {"enabled": enabled, **{p: conv.plugins[p] for p in enabled}}
    return conv


def _process(conv: Conversion, proc: Section, name: str) -> None:
    kind = proc.take("type")
    if kind not in ("sd_trainer", "diffusion_trainer", "ui_trainer"):
        conv.error(proc.path("type"), "wantrain converts LoRA training processes", kind, "use type: sd_trainer")
    folder = proc.typed("training_folder", str) or "output"
    conv.put("job.name", name)
    conv.put("job.output_dir", f"{folder.rstrip('/')}/{name}")
    if proc.typed("trigger_word", str):
        conv.put("job.trigger_word", proc.data["trigger_word"])
    device = proc.typed("device", str)
    if device:
        conv.put("job.device", device if device in ("cpu", "cuda") or device.startswith("cuda:") else "auto")
    _model(conv, Section(conv, proc.path("model"), proc.take("model"), MODEL_DROPPED))
    _network(conv, Section(conv, proc.path("network"), proc.take("network"), NETWORK_DROPPED))
    _save(conv, Section(conv, proc.path("save"), proc.take("save"), SAVE_DROPPED))
    _train(conv, Section(conv, proc.path("train"), proc.take("train"), TRAIN_DROPPED))
    datasets = proc.take("datasets") or []
    if not isinstance(datasets, list) or not datasets:
        conv.error(proc.path("datasets"), "expected a list of datasets", datasets, "add - folder_path: /path/to/clips")
    else:
        conv.profile["datasets"] = [_dataset(conv, Section(conv, proc.path(f"datasets[{i}]"), d, DATASET_DROPPED))
                                    for i, d in enumerate(datasets)]
        _i2v(conv, proc.path("datasets"))
    if proc.has("sample"):
        _sample(conv, Section(conv, proc.path("sample"), proc.take("sample"), SAMPLE_DROPPED))
    conv.enable("tensorboard")
    conv.enable("progress")
    proc.finish()


def _dtype(conv: Conversion, where: str, value: Any) -> str | None:
    if value is None:
        return None
    found = DTYPES.get(str(value).lower())
    if found is None:
        conv.error(where, "unknown dtype", value, "use bf16, fp16 or fp32")
    return found


def _model(conv: Conversion, model: Section) -> None:
    if model.typed("name_or_path", str):
        conv.put("model.name_or_path", model.data["name_or_path"])
    arch = model.typed("arch", str)
    if arch is not None and arch not in ARCHES:
        conv.error(model.path("arch"), "not a Wan 2.2 architecture", arch, f"wantrain trains {', '.join(ARCHES)}")
    elif arch:
        conv.put("model.arch", ARCHES[arch])
    one = ARCHES.get(arch) == ONE_EXPERT
    if model.has("dtype"):
        conv.put("model.dtype", _dtype(conv, model.path("dtype"), model.take("dtype")))
    _quantize(conv, model)
    if model.typed("low_vram", bool):
        if one:
            conv.drop(model.path("low_vram"), "the TI2V-5B has one expert: nothing to park (plugins.offload.layers streams blocks)")
        else:
            conv.put("plugins.offload.experts", True)
    if model.typed("layer_offloading", bool):
        share = model.typed("layer_offloading_transformer_percent", (int, float), 1.0)
        conv.put("plugins.offload.layers", float(min(max(share, 0.0), 1.0)))
    else:
        model.take("layer_offloading_transformer_percent")
    kwargs = Section(conv, model.path("model_kwargs"), model.take("model_kwargs"))
    high = kwargs.typed("train_high_noise", bool, True)
    low = kwargs.typed("train_low_noise", bool, True)
    kwargs.finish()
    if not (high or low):
        conv.error(kwargs.where, "trains neither expert", {"train_high_noise": high, "train_low_noise": low},
                   "set one of them to true")
    if one and not (high and low):
        conv.drop(kwargs.where, "the TI2V-5B has one expert; it is trained")
    elif not (high and low):
        conv.put("plugins.multistage.high_noise", high)
        conv.put("plugins.multistage.low_noise", low)
    model.finish()


def _quantize(conv: Conversion, model: Section) -> None:
    quantize, qtype = model.typed("quantize", bool, False), model.typed("qtype", str)
    if quantize:
        spec, _, ara = (qtype or "qfloat8").partition(ARA_SEP)
        spec = spec.strip().lower()
        mapped = TRANSFORMER_QTYPES.get(spec)
        if spec in LOWER_BITS:
            mapped = "qint4"
            conv.drop(model.path("qtype"), f"{spec}: wantrain's lowest is 4-bit; trains qint4 with a recovery adapter")
        elif spec in MIDDLE_BITS:
            mapped = "qint8"
            conv.drop(model.path("qtype"), f"{spec}: wantrain has 4 and 8 bits; trains qint8")
        elif mapped is None:
            conv.error(model.path("qtype"), "unknown quantization type", qtype, "use qfloat8, uint4 or qint8")
            return
        if mapped == "qint4":  # wantrain's 4-bit recipe always has a recovery adapter (plain qint4 loses accuracy)
            mapped = "qint4+ara"
            conv.put("plugins.quantize.ara", "svd")
        if ara:
            conv.drop(model.path("qtype"), f"ARA file {ara.strip()}: trained for torchao's uint4 grid "
                                           "(groups of 64), not quanto's qint4; wantrain computes its own (ara = \"svd\")")
        conv.put("plugins.quantize.transformer", mapped)  # (quantize: false -> qtype does not matter)
    if model.typed("quantize_te", bool, False):
        qtype_te = (model.typed("qtype_te", str) or "qfloat8").lower()
        mapped = TE_QTYPES.get(qtype_te)
        if mapped is None and qtype_te in TRANSFORMER_QTYPES or qtype_te in LOWER_BITS or qtype_te in MIDDLE_BITS:
            mapped = "qint8"
            conv.drop(model.path("qtype_te"), f"{qtype_te}: wantrain quantizes the text encoder to 8 bits at most; qint8")
        elif mapped is None:
            conv.error(model.path("qtype_te"), "unknown quantization type", qtype_te, "use qfloat8 or qint8")
            return
        if "transformer" not in conv.plugins.get("quantize", {}):
            conv.put("plugins.quantize.transformer", "none")
        conv.put("plugins.quantize.text_encoder", mapped)
    else:
        model.take("qtype_te")


def _network(conv: Conversion, net: Section) -> None:
    kind = net.typed("type", str, "lora")
    if kind.lower() == "lokr":
        conv.drop(net.path("type"), "wantrain has no LoKr yet; trains a LoRA of rank linear")
    elif kind.lower() not in ("lora", "locon"):
        conv.error(net.path("type"), "wantrain trains LoRA", kind, "use type: lora")
    linear, rank = net.typed("linear", int), net.typed("rank", int)
    linear_alpha, alpha = net.typed("linear_alpha", (int, float)), net.typed("alpha", (int, float))
    if linear or rank:
        conv.put("target.rank", linear or rank)
    if net.data:  # ai-toolkit's alpha defaults to 1.0, not to the rank
        conv.put("target.alpha", linear_alpha if linear_alpha is not None else alpha if alpha is not None else 1.0)
    if net.typed("pretrained_lora_path", str):
        conv.put("target.init_from", net.data["pretrained_lora_path"])
    kwargs = net.take("network_kwargs") or {}
    if not isinstance(kwargs, dict):
        conv.error(net.path("network_kwargs"), "must be a mapping", kwargs)
    for key, value in kwargs.items():
        if value not in (None, [], {}, ""):
            conv.drop(f"{net.path('network_kwargs')}.{key}", "wantrain targets per-block modules (target.modules); "
                                                           "no per-layer filters or lr multipliers")
    net.finish()


def _save(conv: Conversion, save: Section) -> None:
    dtype = _dtype(conv, save.path("dtype"), save.take("dtype", save.take("save_dtype")))
    if dtype:
        conv.put("target.save_dtype", dtype)
        conv.put("plugins.checkpoints.dtype", dtype)
    every = save.typed("save_every", int)
    if every:
        conv.put("plugins.checkpoints.every", every)
    keep = save.typed("max_step_saves_to_keep", int)
    if keep is not None:
        conv.put("plugins.checkpoints.keep", max(keep, 0))
    conv.enable("checkpoints")
    save.finish()


def _train(conv: Conversion, train: Section) -> None:
    for key, dest in (("batch_size", "training.batch_size"), ("steps", "training.steps")):
        if train.typed(key, int) is not None:
            conv.put(dest, train.data[key])
    accumulation = train.typed("gradient_accumulation", int) or train.typed("gradient_accumulation_steps", int)
    train.take("gradient_accumulation_steps")
    if accumulation:
        conv.put("training.gradient_accumulation", accumulation)
    lr = train.typed("unet_lr", (int, float)) or train.typed("lr", (int, float))
    train.take("lr")
    if lr is not None:
        conv.put("training.lr", float(lr))
    _optimizer(conv, train)
    norm = train.typed("max_grad_norm", (int, float))
    if norm is not None:
        conv.put("training.max_grad_norm", float(norm))
    if train.has("dtype"):
        conv.put("model.dtype", _dtype(conv, train.path("dtype"), train.take("dtype")))
    if train.typed("gradient_checkpointing", bool) is not None:
        conv.put("model.gradient_checkpointing", train.data["gradient_checkpointing"])
    loss = train.typed("loss_type", str, "mse")
    if loss != "mse":
        conv.drop(train.path("loss_type"), f"{loss}: wantrain has mse and huber; trains mse")
    _timesteps(conv, train)
    every = train.typed("switch_boundary_every", int)
    if conv.profile.get("model", {}).get("arch") == ONE_EXPERT:
        if every and every > 1:
            conv.drop(train.path("switch_boundary_every"), "the TI2V-5B has one expert: nothing to switch")
    else:
        if every:
            conv.put("plugins.multistage.switch_every", every)
        conv.enable("multistage")
    _extras(conv, train)
    if train.typed("disable_sampling", bool, False):
        conv.sampling = False
    if train.typed("skip_first_sample", bool, False):
        conv.at_start = False
    train.finish()


def _optimizer(conv: Conversion, train: Section) -> None:
    name = train.typed("optimizer", str)
    if name is not None:
        mapped = OPTIMIZERS.get(name.lower())
        if mapped is None:
            why = f"{name}: wantrain has adamw8bit, adamw and adafactor; uses adamw8bit"
            if conv.profile.get("training", {}).get("lr", 0.0) >= 0.1:  # prodigy & co: lr is a multiplier (~1)
                conv.put("training.lr", 1e-4)
                why += " at lr 1e-4 (the source's lr is an adaptive optimizer's multiplier)"
            conv.drop(train.path("optimizer"), why)
            mapped = "adamw8bit"
        conv.put("training.optimizer", mapped)
    params = Section(conv, train.path("optimizer_params"), train.take("optimizer_params"))
    decay = params.typed("weight_decay", (int, float))
    if decay is not None:
        conv.put("training.weight_decay", float(decay))
    for key, value in params.data.items():
        if key not in params.used:
            conv.drop(params.path(key), "wantrain's optimizers use their defaults besides lr and weight_decay")
    scheduler = train.typed("lr_scheduler", str)
    if scheduler is not None:
        mapped = SCHEDULERS.get(scheduler)
        if mapped is None or scheduler == "cosine_with_restarts":
            conv.drop(train.path("lr_scheduler"), f"{scheduler}: wantrain has constant, linear and cosine; uses "
                                                  f"{mapped or 'constant'}")
        conv.put("training.lr_scheduler", mapped or "constant")
    params = train.data.get("lr_scheduler_params") or {}
    warmup = params.get("warmup_steps", params.get("num_warmup_steps")) if isinstance(params, dict) else None
    if isinstance(warmup, int) and not isinstance(warmup, bool):
        conv.put("training.warmup_steps", warmup)
        train.take("lr_scheduler_params")
        rest = [k for k in params if k not in ("warmup_steps", "num_warmup_steps")]
        for key in rest:
            conv.drop(f"{train.path('lr_scheduler_params')}.{key}", "wantrain's schedules take only warmup_steps")


def _timesteps(conv: Conversion, train: Section) -> None:
    kind = train.typed("timestep_type", str)
    bias = train.typed("content_or_style", str)
    if kind is None and bias is None:
        return
    if kind is not None:
        mapped = TIMESTEP_TYPES.get(kind)
        if mapped is None:
            conv.drop(train.path("timestep_type"), f"{kind}: not in plugins.timesteps; uses sigmoid")
            mapped = "sigmoid"
        elif kind in ("lognorm_blend", "flux_shift"):
            conv.drop(train.path("timestep_type"), f"{kind}: approximated by type = {mapped!r}")
        conv.put("plugins.timesteps.type", mapped)
    if bias is not None:
        if bias not in BIAS:
            conv.error(train.path("content_or_style"), "expected balanced, content or style", bias)
            return
        conv.put("plugins.timesteps.bias", BIAS[bias])
    conv.enable("timesteps")


def _extras(conv: Conversion, train: Section) -> None:
    """EMA, DOP, differential guidance and the text encoder's caching."""
    ema = Section(conv, train.path("ema_config"), train.take("ema_config"))
    if ema.typed("use_ema", bool, False):
        decay = ema.typed("ema_decay", (int, float))
        conv.put("plugins.ema.decay", float(decay) if decay is not None else 0.99)
    else:
        ema.take("ema_decay")
    ema.finish()
    if train.typed("diff_output_preservation", bool, False):
        conv.enable("dop")
        multiplier = train.typed("diff_output_preservation_multiplier", (int, float))
        if multiplier is not None:
            conv.put("plugins.dop.multiplier", float(multiplier))
        cls = train.typed("diff_output_preservation_class", str)
        if cls:
            conv.put("plugins.dop.preservation_class", cls)
    else:
        train.take("diff_output_preservation_multiplier")
        train.take("diff_output_preservation_class")
    if train.typed("do_differential_guidance", bool, False):
        scale = train.typed("differential_guidance_scale", (int, float))
        conv.put("plugins.diff_guidance.scale", float(scale) if scale is not None else 3.0)
    else:
        train.take("differential_guidance_scale")
    if train.typed("cache_text_embeddings", bool, False):
        conv.enable("text_cache")
    if train.typed("unload_text_encoder", bool, False):
        conv.put("plugins.text_cache.unload", True)


def _i2v(conv: Conversion, where: str) -> None:
    """ai-toolkit's per-dataset ``do_i2v`` (train from the first frame, else
    text-to-video): for the TI2V-5B, ``[model] i2v_probability`` -- the share
    of datasets that set it, since wantrain mixes per sample, not per
    dataset; the I2V-A14B always trains from the start frame; T2V never."""
    arch = conv.profile.get("model", {}).get("arch")
    if arch == ONE_EXPERT:  # ai-toolkit's default is do_i2v = true (its dataset config)
        flags = [True if f is None else bool(f) for f in conv.do_i2v]
        share = sum(flags) / len(flags)
        conv.put("model.i2v_probability", share)
        if 0 < share < 1:
            conv.drop(f"{where}[*].do_i2v", f"set per dataset; wantrain mixes per sample: i2v_probability = {share:g} "
                                            "(the share of datasets that set it)")
    elif arch != "wan22_i2v_a14b" and any(f for f in conv.do_i2v):  # set explicitly: a default says nothing
        conv.drop(f"{where}[*].do_i2v", "a text-to-video model has no start frame")


def _dataset(conv: Conversion, ds: Section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    conv.do_i2v.append(ds.typed("do_i2v", bool))
    folder = ds.typed("folder_path", str)
    if not folder:
        conv.error(ds.path("folder_path"), "required", fix="the folder of images/clips with their caption files")
    out["folder"] = folder or ""
    if ds.typed("default_caption", str):
        out["default_caption"] = ds.data["default_caption"]
    ext = ds.typed("caption_ext", str) or ds.typed("caption_type", str)
    ds.take("caption_type")
    if ext:
        out["caption_ext"] = ext.lstrip(".")
    dropout = ds.typed("caption_dropout_rate", (int, float))
    if dropout:
        out["caption_dropout"] = float(dropout)
    out["resolutions"] = _resolutions(conv, ds)
    frames = ds.typed("num_frames", int)
    if frames is not None:
        out["num_frames"] = _frames(conv, ds.path("num_frames"), frames)
    shrink = ds.typed("shrink_video_to_frames", bool, True)
    out["frame_sampling"] = "uniform" if shrink else "fps"
    for key, dest in (("flip_x", "flip_x"), ("flip_y", "flip_y"), ("is_reg", "is_regularization")):
        if ds.typed(key, bool):
            out[dest] = True
    repeats = ds.typed("num_repeats", int)
    if repeats and repeats > 1:
        out["repeats"] = repeats
    if ds.typed("cache_latents_to_disk", bool) or ds.typed("cache_latents", bool):
        out["cache_latents"] = True
        conv.enable("latent_cache")
    ds.take("cache_latents")
    ds.finish()
    return out


def _resolutions(conv: Conversion, ds: Section) -> list[int]:
    value = ds.take("resolution", 512)
    values = value if isinstance(value, list) else [value]
    out = []
    for res in values:
        if isinstance(res, bool) or not isinstance(res, int) or res < 16:
            conv.error(ds.path("resolution"), "expected a side length in pixels (or a list of them)", value)
            return [512]
        if res % 16:
            conv.drop(ds.path("resolution"), f"{res}: sides are multiples of 16 in wantrain; uses {res // 16 * 16}")
        out.append(res // 16 * 16)
    return list(dict.fromkeys(out))


def _frames(conv: Conversion, where: str, frames: int) -> int:
    """1 or 4n+1 (Wan's VAE packs 4 frames per latent frame); others round down."""
    if frames <= 1:
        return 1
    valid = (frames - 1) // 4 * 4 + 1
    if valid != frames:
        conv.drop(where, f"{frames}: Wan needs 1 or 4n+1 frames; uses {valid}")
    return valid


def _sample(conv: Conversion, sample: Section) -> None:
    prompts = list(sample.take("prompts") or [])
    items = sample.take("samples") or []
    for i, item in enumerate(items if isinstance(items, list) else []):
        entry = Section(conv, f"{sample.path('samples')}[{i}]", item)
        if entry.typed("prompt", str):
            prompts.append(entry.data["prompt"])
        for key in entry.data:
            if key not in entry.used and key in SAMPLE_ITEM_KEYS and entry.data[key] not in (None, ""):
                conv.drop(entry.path(key), "per-prompt settings: previews use the sample table's settings")
                entry.used.add(key)
        entry.finish()
    every = sample.typed("sample_every", int)
    settings: dict[str, Any] = {}
    if every is not None:
        settings["every"] = max(every, 0)
    if conv.at_start is not None:
        settings["at_start"] = conv.at_start
    settings["prompts"] = [p for p in prompts if isinstance(p, str)]
    for key, dest in (("width", "width"), ("height", "height")):
        side = sample.typed(key, int)
        if side is not None:
            settings[dest] = max(16, side // 16 * 16)
            if side % 16:
                conv.drop(sample.path(key), f"{side}: preview sides are multiples of 16; uses {settings[dest]}")
    frames = sample.typed("num_frames", int)
    if frames is not None:
        settings["num_frames"] = _frames(conv, sample.path("num_frames"), frames)
    fps = sample.typed("fps", (int, float))
    if fps is not None:
        settings["fps"] = float(fps)
    if sample.typed("sample_steps", int) is not None:
        settings["steps"] = sample.data["sample_steps"]
    guidance = sample.typed("guidance_scale", (int, float))
    if guidance is not None:  # ai-toolkit uses one scale for both experts
        settings["guidance_high"] = settings["guidance_low"] = float(max(guidance, 1.0))
    if sample.typed("seed", int) is not None:
        settings["seed"] = sample.data["seed"]
    neg = sample.take("neg")
    if isinstance(neg, str) and neg:
        settings["negative_prompt"] = neg
    sample.finish()
    if not conv.sampling:
        return  # train.disable_sampling: no previews
    if not settings["prompts"]:
        conv.drop(sample.where, "no prompts: no previews")
    else:
        conv.plugins["sample"] = settings


SECTION_ORDER = ("job", "model", "target", "training", "datasets", "plugins")


def render(conv: Conversion, source: str, out: str | None) -> str:
    """The profile as TOML text, opening with how it was made, how to check
    it, and what did not carry over."""
    import tomli_w

    target = out or "profile.toml"
    head = [f"# Converted from the ai-toolkit job config {source}",
            f"# by `wantrain import ai-toolkit {source}`. Check it, then train it:",
            "#",
            f"#   wantrain check {target}",
            f"#   wantrain estimate {target} --vram-gb 24",
            f"#   wantrain run {target}",
            "#",
            "# Usually changed: datasets[0].folder, job.trigger_word, training.steps."]
    if conv.dropped:
        head += ["#", *(f"# {line}" for line in conv.dropped)]
    data = {key: conv.profile[key] for key in SECTION_ORDER if key in conv.profile}
    return "\n".join(head) + "\n\n" + tomli_w.dumps(data)
