"""``wantrain estimate`` for every ``[model] arch``: the shipped configs count
the real models (built on the meta device with diffusers' own classes), the
Wan 2.2 VAE's 16x compression gives the TI2V-5B 4x fewer tokens per frame,
the 5B is one expert (nothing to switch or park) with per-token timesteps."""

from __future__ import annotations

import attrs
import pytest

from wantrain.commands import estimate as est
from wantrain.errors import ProfileError
from wantrain.profile import LORA_MODULES, load_profile
from wantrain.run import open_run

GiB = 2**30
HUB = {"wan22_t2v_a14b": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan22_i2v_a14b": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
       "wan22_ti2v_5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}
#: ``vae/config.json`` of Wan2.2-TI2V-5B-Diffusers without latents_mean / latents_std (scripts/convert_wan_to_diffusers.py)
VAE22 = dict(base_dim=160, z_dim=48, is_residual=True, in_channels=12, out_channels=12, decoder_base_dim=256,
             scale_factor_temporal=4, scale_factor_spatial=16, patch_size=2)


def _profile(profile_data, arch, resolution=512, frames=33, **plugins):
    data = dict(profile_data)
    data["model"] = {**data["model"], "arch": arch, "name_or_path": HUB[arch], "dtype": "bf16", "gradient_checkpointing": True}
    data["datasets"] = [{**data["datasets"][0], "resolutions": [resolution], "num_frames": frames,
                         "cache_latents": "latent_cache" in plugins}]
    data["plugins"] = {"enabled": list(plugins), **{k: v for k, v in plugins.items() if v}}
    return load_profile(data=data)


def _estimate(profile, vram=None):
    return est.estimate_profile(profile, open_run(profile, purpose="inspect").pm, vram)


def test_the_shipped_configs_count_the_real_models():
    counts = {}
    for arch, config in est.TRANSFORMERS.items():
        c = est.count_transformer(config, False, (), LORA_MODULES)
        counts[arch] = c.quantized + c.other + c.fp32
    # I2V: 20 more input channels into the 5120-wide 1x2x2 patch embedding, nothing else
    assert counts["wan22_i2v_a14b"] - counts["wan22_t2v_a14b"] == 20 * 4 * 5120
    assert 4.95e9 < counts["wan22_ti2v_5b"] < 5.05e9  # "5B"
    c5 = est.count_transformer(est.TI2V_5B_TRANSFORMER, False, (), LORA_MODULES)
    assert (c5.dim, c5.ffn, c5.blocks) == (3072, 14336, 30)
    # rank-16 fp32 LoRA on every block linear: 30 x (8 x 6144 + 2 x 17408) x 16 x 4 bytes
    assert c5.lora_io == 30 * (8 * 6144 + 2 * 17408)


def test_the_wan22_vae_constant_is_its_real_size():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    with init_empty_weights():
        vae = AutoencoderKLWan(**VAE22)
    assert sum(p.numel() for p in vae.parameters()) == est.WAN22_VAE_PARAMS
    assert est.VAE_PARAMS["wan22_ti2v_5b"] * 4 / GiB == pytest.approx(2.63, abs=0.01)  # fp32


def test_tokens_follow_the_arch_vae(profile_data):
    """1280x704 (the 5B's native size), 121 frames: 31 latent frames; 16x VAE -> 44x80 latents -> 880 tokens
    per latent frame, the 8x VAE of the A14B 4x as many at the same size."""
    size = {}
    for arch in HUB:
        s = est.kernel_settings(_profile(profile_data, arch, resolution=960, frames=121))
        s = attrs.evolve(s, width=1280, height=704)
        size[arch] = est.video_tokens(s, 4)
    assert size["wan22_ti2v_5b"] == 31 * 44 * 80 // 4 == 27280
    assert size["wan22_t2v_a14b"] == size["wan22_i2v_a14b"] == 4 * size["wan22_ti2v_5b"]


def test_per_token_timesteps_cost_fp32_modulation_per_block():
    plain = est.Settings(modules=LORA_MODULES)
    per_token = attrs.evolve(plain, per_token_timesteps=True)
    a, b = est.block_activation_bytes(plain, 3072, 14336), est.block_activation_bytes(per_token, 3072, 14336)
    assert b[0] - a[0] == 8 * 4 * 3072 and b[1] == a[1]  # 6 x dim modulation + 2 x (1 + scale), fp32, per video token
    c = est.count_transformer(est.TI2V_5B_TRANSFORMER, False, (), LORA_MODULES)
    tokens = est.video_tokens(plain, 4)
    extra = est.activation_bytes(per_token, c) - est.activation_bytes(plain, c)
    assert extra == tokens * 8 * 4 * 3072 + tokens * (7 * 2 + 12) * 3072  # one block recomputes + each block's inputs


def test_the_5b_is_one_expert_and_needs_no_4bit_on_24gb(profile_data):
    prof = _profile(profile_data, "wan22_ti2v_5b", resolution=640, frames=81, text_cache={}, latent_cache={},
                    quantize={"transformer": "none", "text_encoder": "qint8"})
    e, s, _, origin = _estimate(prof, 24)
    assert origin == "built-in Wan 2.2 TI2V-5B config"
    assert (s.experts, s.experts_trained, s.experts_loaded, s.vae_spatial, s.per_token_timesteps) == (1, 1, 1, 16, True)
    assert e.fits and s.weight_bytes is None, e.table()
    assert e.rows[0][0] == "transformer weights x1 (bf16)" and 9.2 < e.rows[0][1] < 9.4  # 5.0e9 bf16 weights
    # too big for 24 GB: the remedies never offer parking an expert the 5B does not have
    big = _estimate(_profile(profile_data, "wan22_ti2v_5b", resolution=1024, frames=121), 24)[0]
    assert not big.fits and big.suggestions
    assert not any("experts = true" in t for t in big.suggestions), big.suggestions


def test_i2v_counts_as_two_a14b_experts(profile_data):
    t2v = _estimate(_profile(profile_data, "wan22_t2v_a14b"))
    i2v = _estimate(_profile(profile_data, "wan22_i2v_a14b"))
    assert i2v[1].experts == 2 and i2v[3] == "built-in Wan 2.2 I2V-A14B config"
    assert i2v[0].tokens == t2v[0].tokens == 9216
    assert i2v[0].gpu_peak - t2v[0].gpu_peak == pytest.approx(2 * 20 * 4 * 5120 * 2 / GiB)  # the wider patch embedding


@pytest.mark.parametrize("plugin, config, key", [("multistage", {}, "plugins.multistage"),
                                                 ("offload", {"experts": True}, "plugins.offload.experts")])
def test_expert_plugins_refuse_the_one_expert_arch(profile_data, plugin, config, key):
    with pytest.raises(ProfileError) as info:
        open_run(_profile(profile_data, "wan22_ti2v_5b", **{plugin: config}), purpose="inspect")
    assert [p.where for p in info.value.problems] == [key] and "one expert" in info.value.problems[0].what
