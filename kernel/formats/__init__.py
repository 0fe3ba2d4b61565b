"""Every file layout wantrain reads or writes, in one place.

===================  =============================================================  ====================================
layout               tensor names (one module; ``{i}`` = block)                     alpha (scale = alpha / rank)
===================  =============================================================  ====================================
``comfyui`` (ours)   ``diffusion_model.blocks.{i}.self_attn.q.lora_A.weight``,      ``.alpha`` scalar per module
                     ``.lora_B.weight``, ``.alpha`` (original Wan module names)     (none: = rank)
``comfyui-down-up``  the same with ``lora_down`` / ``lora_up``                      ``.alpha`` per module
``kohya``            ``lora_unet_blocks_{i}_self_attn_q.lora_down.weight`` /        ``.alpha`` per module (none: = rank)
                     ``lora_up`` / ``.alpha`` (kohya, musubi-tuner; diffusers
                     module names with underscores accepted too)
``diffusers``        ``transformer.blocks.{i}.attn1.to_q.lora_A.weight`` (PEFT;     the ``lora_adapter_metadata``
                     also ``transformer_2.``, ``base_model.model.``, no prefix,     metadata entry, else
                     ``.default`` before ``.weight``)                               ``adapter_config.json`` beside
                                                                                    the file, else = rank
``diffusion-pipe``   ``diffusion_model.blocks.{i}.self_attn.q.lora_A.weight`` /     ``lora_alpha`` (and
                     ``lora_B`` in ``adapter_model.safetensors``, no ``.alpha``,    ``alpha_pattern``) of the
                     with the PEFT ``adapter_config.json`` beside it                ``adapter_config.json``
``ai-toolkit``       both experts in one file: ``diffusion_model.transformer_1.``   none written (ai-toolkit forces
                     (high noise) / ``diffusion_model.transformer_2.`` (low         alpha = rank): scale 1; an
                     noise) + ``blocks.{i}.self_attn.q.lora_A.weight`` /            ``.alpha`` is honoured
                     ``lora_B``; also without ``diffusion_model.``, and with
                     diffusers module names
checkpoint folder    ``checkpoints/step_N/lora.safetensors``:                       ``target.alpha`` of the
                     ``<expert>.blocks.{i}.attn1.to_q.lora_A.weight`` (fp32)        checkpoint's state.json
===================  =============================================================  ====================================

What the tools write (read from their sources):

- **diffusion-pipe** (tdrussell/diffusion-pipe ``models/wan/wan.py``,
  ``models/wan.py``, ``models/base.py``, ``utils/saver.py``): the adapter is
  PEFT on the original Wan model (``WanModel``; every ``nn.Linear`` of a
  ``WanAttentionBlock``). ``Saver.save_adapter`` collects the trainable
  parameters' names with ``.default`` removed; ``WanPipeline.save_adapter``
  calls ``peft_config.save_pretrained(save_dir)`` (``adapter_config.json``
  with ``r`` and ``lora_alpha``) and writes ``adapter_model.safetensors``
  with every name prefixed ``diffusion_model.`` ("ComfyUI format") and
  metadata ``{"format": "pt"}`` -- no ``.alpha`` tensors, so the alpha is
  read from the config beside the file. One expert per run (Wan 2.2 trains
  high and low noise in separate runs), so the file names no expert.
- **ai-toolkit** (ostris/ai-toolkit
  ``extensions_built_in/diffusion_models/wan22/wan22_14b_model.py``,
  ``toolkit/models/wan21/wan_lora_convert.py``, ``toolkit/lora_special.py``,
  ``toolkit/util/quantize.py``): Wan 2.2 14B trains
  ``DualWanTransformer3DModel(transformer_1=high noise, transformer_2=low
  noise)``; the network is in PEFT format for transformers (no ``.alpha``,
  alpha forced to the rank), its keys ``transformer.transformer_1.blocks...``
  go through ``convert_to_original`` (``transformer.`` ->
  ``diffusion_model.``, ``attn1`` -> ``self_attn``, ``to_q`` -> ``q``,
  ``ffn.net.0.proj`` -> ``ffn.0`` ...): the combined file holds
  ``diffusion_model.transformer_1.blocks.{i}.self_attn.q.lora_A.weight``.
  With ``split_multistage_loras`` it writes ``<name>_high_noise`` /
  ``<name>_low_noise`` files instead (``.transformer_1.`` removed: our
  ComfyUI names without ``.alpha``). Its accuracy-recovery adapters are
  loaded through the same conversion (``convert_lora_weights_before_load``),
  so an ARA of both experts carries ``transformer_1.`` / ``transformer_2.``
  in its names.

ARA files (:mod:`.ara`) use the same names for any linear layer of an expert
(also ``head.head`` / ``proj_out`` and the embedders).

Modules:

- :mod:`.safetensors` -- the one serializer (canonical header: the same
  tensors and metadata give the same bytes), the one atomic writer
  (temporary name, fsync, rename) and the one reader.
- :mod:`.lora` -- module-name maps, :class:`~.lora.LoraWeights`, reading
  every layout above, writing ``comfyui`` (ours, ``.alpha`` kept) and
  ``diffusers`` (alpha folded into ``lora_B``), our files' metadata,
  ``lora-info`` lines, :func:`~.lora.read_lora_sources` (``[target]
  init_from`` and ``wantrain sample --lora``).
- :mod:`.ara` -- ARA files: read (per expert), write (the SVD cache).
- :mod:`.state` -- the resume state's files and its tensor/JSON tree.
- :mod:`.toml` -- profile files: TOML with its ``extends`` chain, ``--set``
  overrides, and the ``profile.toml`` a run writes.
- :mod:`.wan_original` -- the original Wan single-file layout of the model
  itself (ComfyUI's expert, VAE and UMT5 files; fp8 and scaled fp8): names
  to and from Diffusers, configs from shapes, reading and writing.
- :mod:`.sources` -- where a component's tensors come from (Diffusers
  shards or a single file) for the streaming loaders, and ``[model]``'s
  single-file keys (checks, loading).

Who calls what: the trainer writes LoRA pairs with ``lora.to_comfy`` +
``lora.metadata`` + ``safetensors.write_atomic`` (``wantrain.run``) and the
resume state with ``state.write_files`` (``wantrain.resume``);
``wantrain export`` reads with ``lora.read_file`` / ``lora.read_checkpoint``
and writes with ``lora.write``; ``wantrain lora-info`` is ``lora.describe``;
``init_from`` (``wantrain.lora.load_init_from``) and ``wantrain sample
--lora`` read with ``lora.read_lora_sources``; the quantize plugin reads
and writes ARA files with :mod:`.ara`.
"""
