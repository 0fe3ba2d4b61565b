"""``wantrain make-tiny-model``: a tiny random Wan-2.2-shaped model written in
exactly the Diffusers layout of the real model of each arch (``--arch``), so
tests and the CPU demos go through the same loading code.

Sizes: 4 heads x 32 dims, ffn 256, 4 layers, text dim 32 --
large enough that a rank-32 LoRA visibly learns a clip on a CPU.
Per arch, as the real ones: T2V-A14B two experts, 16 channels in; I2V-A14B
two experts, 36 channels in (16 noisy + 4 mask + 16 condition), boundary
0.9; TI2V-5B one transformer, 48 channels, the Wan 2.2 VAE (48 latent
channels, 16x spatial: a 2x2 pixel patch and three 2x downsamplings, residual
blocks), ``expand_timesteps``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import archs

TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
#: the Wan 2.2 VAE of the TI2V-5B, tiny
TINY_VAE22 = dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                  patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
TINY_TEXT = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32)
VOCAB_SIZE = 512

# A small corpus so the byte-level BPE learns common caption words; any text
# still tokenizes (bytes are the base alphabet), trigger words included.
_CORPUS = """
a video of a person walking in the park, the camera pans slowly to the left
a red circle moves across a blue background; a green square bounces up and down
close-up portrait of a woman smiling, soft light, film grain, shallow depth of field
a cat sitting on a windowsill while rain falls outside, cinematic, slow motion
style of an oil painting, thick brush strokes, warm colours, evening light
the man turns his head and looks at the camera, then walks away into the fog
drone shot over mountains at sunrise, clouds moving fast, aerial view, wide angle
""".strip()


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained here (no download), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(folder)


def make_tiny_model(folder: str | Path, seed: int = 0, arch: str = archs.DEFAULT) -> Path:
    """Write the tiny model of ``arch`` to ``folder`` (created). Same seed -> same weights."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    spec = archs.get(arch)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for expert_name in spec.experts:
            channels = dict(in_channels=spec.in_channels, out_channels=spec.latent_channels)
            expert = WanTransformer3DModel(**{**TINY_TRANSFORMER, **channels})
            _perturb_zero_init(expert)
            expert.save_pretrained(folder / spec.subfolders[expert_name], safe_serialization=True)
        vae = TINY_VAE22 if spec.latent_channels == 48 else TINY_VAE
        AutoencoderKLWan(**vae).save_pretrained(folder / "vae", safe_serialization=True)
        build_tokenizer(folder / "tokenizer")
        config = UMT5Config(vocab_size=VOCAB_SIZE, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **TINY_TEXT)
        UMT5EncoderModel(config).save_pretrained(folder / "text_encoder", safe_serialization=True)
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(_model_index(spec), indent=2) + "\n")
    return folder


def _perturb_zero_init(module: torch.nn.Module) -> None:
    """Diffusers zero-inits nothing in Wan, but random init leaves the
    modulation tables tiny; give them a random scale so a random tiny model
    is not a degenerate identity."""
    for name, param in module.named_parameters():
        if name.endswith("scale_shift_table"):
            param.data.normal_(0.0, 0.1)


def _model_index(spec: archs.Arch | None = None) -> dict:
    """``model_index.json`` as the hub's Wan 2.2 models have it."""
    spec = spec or archs.get(archs.DEFAULT)
    if spec.name == "wan22_i2v_a14b":
        return {**_t2v_index(), "_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9,
                "image_encoder": [None, None], "image_processor": [None, None]}
    if spec.single_expert:
        return {**_t2v_index(), "boundary_ratio": None, "expand_timesteps": True, "transformer_2": [None, None]}
    return _t2v_index()


def _t2v_index() -> dict:
    return {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.35.0",
        "boundary_ratio": 0.875,
        "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
