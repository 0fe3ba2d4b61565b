"""wantrain estimate: counts on a config small enough to check by hand, the
real A14B config (no weights), fit / suggestions, and the CLI."""

from __future__ import annotations

import pytest

from wantrain.commands import estimate as est
from wantrain.plugins.quantize import WEIGHT_BYTES
from wantrain.plugins.quantize.loader import DEFAULT_EXCLUDE
from wantrain.profile import DEFAULT_MODEL, LORA_MODULES, load_profile
from wantrain.run import open_run

# dim 16 (2 heads x 8), ffn 32, one block, patch 1x2x2
HAND = dict(
    patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    text_dim=8, freq_dim=4, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=64,
)


def test_counts_checked_by_hand():
    c = est.count_transformer(HAND, True, DEFAULT_EXCLUDE, LORA_MODULES)
    # 8 attention linears 16x16 + ffn 16->32 and 32->16: 8*256 + 2*512 weights
    assert c.quantized == 3072
    # sum of (in + out): 8 * 32 + 2 * 48
    assert c.quantized_io == 352 and c.lora_io == 352
    assert (c.dim, c.ffn, c.blocks, c.patch) == (16, 32, 1, 4)
    s = est.Settings(weight_bytes=WEIGHT_BYTES["qint4"], quantize_exclude=DEFAULT_EXCLUDE, rank=4, modules=LORA_MODULES)
    assert est.expert_weight_bytes(s, c) == 3072 * 0.53125 + 2 * c.other + 4 * c.fp32
    # nothing is quantized without the plugin
    assert est.count_transformer(HAND, False, DEFAULT_EXCLUDE, LORA_MODULES).quantized == 0


def test_activations_checked_by_hand():
    s = est.Settings(dtype="bf16", modules=LORA_MODULES, frames=33, height=512, width=512)
    per_token, per_text = est.block_activation_bytes(s, 16, 32)
    # bf16, the LoRA computing in bf16 on all ten targets (rank 16): 42 d + 4 f per video token, the fp32
    # rope cos/sin (1024) and norm statistics (36), 8 lora_A outputs; 10 d per text token (+ 2 lora_A, rstd)
    assert (per_token, per_text) == (42 * 16 + 4 * 32 + 1024 + 36 + 8 * 2 * 16, 10 * 16 + 2 * 2 * 16 + 4)
    assert est.video_tokens(s, 4) == 9 * 64 * 64 // 4 == 9216
    c = est.count_transformer(HAND, False, (), LORA_MODULES)
    outside, work = 9216 * 8 * 16, 9216 * (16 * 16 + 4 * 32)
    assert est.activation_bytes(s, c) == 1 * 9216 * 2 * 16 + 9216 * per_token + 512 * per_text + outside + work
    no_ckpt = est.Settings(dtype="bf16", modules=LORA_MODULES, checkpointing=False)
    assert est.activation_bytes(no_ckpt, c) == 9216 * per_token + 512 * per_text + outside + work
    # an fp32 model: 4 bytes everywhere
    fp32 = est.Settings(dtype="fp32", modules=LORA_MODULES)
    assert est.block_activation_bytes(fp32, 16, 32)[0] == (32 + 20 + 8) * 16 + 8 * 32 + 1024 + 36 + 8 * 4 * 16


def test_a14b_config_counts_14b_per_expert():
    c = est.count_transformer(est.A14B_TRANSFORMER, True, DEFAULT_EXCLUDE, LORA_MODULES)
    total = c.quantized + c.other + c.fp32
    assert 14.0e9 < total < 14.6e9
    assert c.quantized / total > 0.97  # the block linears are nearly everything
    assert c.lora_io * 16 * 4 / 2**30 == pytest.approx(0.286, abs=0.01)  # rank-16 fp32 LoRA per expert


def _profile(profile_data, **plugins):
    data = dict(profile_data)
    data["model"] = {**data["model"], "name_or_path": DEFAULT_MODEL, "dtype": "bf16", "gradient_checkpointing": True}
    data["datasets"] = [{**data["datasets"][0], "resolutions": [512], "num_frames": 33}]
    data["plugins"] = {"enabled": list(plugins), **{k: v for k, v in plugins.items() if v}}
    return load_profile(data=data)


def test_24gb_recipe_fits_and_a_naive_one_gets_suggestions(profile_data):
    recipe = _profile(profile_data, quantize={"transformer": "qint4+ara", "text_encoder": "qint8"}, offload={"experts": True},
                      text_cache={})
    e, _, notes, origin = est.estimate_profile(recipe, open_run(recipe, purpose="inspect").pm, 24)
    assert "built-in" in origin and e.tokens == 9216
    # each enabled plugin states its own change, in the profile's order
    assert [n.split(":")[0] for n in notes] == ["quantize", "offload", "text_cache"]
    assert "transformer qint4+ara, text encoder qint8" in notes[0]
    assert e.fits and 14 < e.gpu_peak < 24
    naive = _profile(profile_data)
    bad = est.estimate_profile(naive, open_run(naive, purpose="inspect").pm, 24)[0]
    assert not bad.fits and bad.gpu_peak > 60
    assert bad.suggestions and "peak" in bad.suggestions[-1]
    last_peak = float(bad.suggestions[-1].split("peak ")[1].split(" GiB")[0])
    assert last_peak <= 24


def test_cli_estimate(profile_data, tmp_path, capsys):
    import tomli_w

    from wantrain.commands.cli import main

    data = dict(profile_data)
    data["model"] = {**data["model"], "name_or_path": DEFAULT_MODEL, "dtype": "bf16", "gradient_checkpointing": True}
    data["datasets"] = [{**data["datasets"][0], "resolutions": [512], "num_frames": 33}]
    data["plugins"] = {"enabled": ["quantize", "offload"], "quantize": {"transformer": "qint4+ara"}, "offload": {"experts": True}}
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(data))
    assert main(["estimate", str(path), "--vram-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "9216 video tokens" in out and "fits: ~" in out and "transformer weights x1 (qint4+ara)" in out
    assert main(["estimate", str(path), "--vram-gb", "8"]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_a_plugin_adds_its_own_memory_lines_and_remedies(profile_data, tmp_path, capsys):
    """``estimate_memory`` / ``memory_remedies`` are the only way memory
    knowledge reaches the estimate: a tinkerer's plugin file uses both."""
    import tomli_w

    from wantrain.commands.cli import main

    (tmp_path / "stream_all.py").write_text(
        "from wantrain import hookimpl\n"
        "from wantrain.commands.estimate import Remedy\n\n"
        "@hookimpl\n"
        "def estimate_memory(memory):\n"
        "    return {'latents_cached': True, 'note': f'latents precomputed for {memory.frames} frames'}\n\n"
        "@hookimpl\n"
        "def memory_remedies(memory):\n"
        "    return [Remedy(1, 'halve the frames (stream_all)', {'frames': memory.frames // 2 + 1})]\n")
    data = dict(profile_data)
    data["model"] = {**data["model"], "name_or_path": DEFAULT_MODEL, "dtype": "bf16", "gradient_checkpointing": True}
    data["datasets"] = [{**data["datasets"][0], "resolutions": [512], "num_frames": 33}]
    data["plugins"] = {"enabled": ["stream_all.py"]}
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(data))
    assert main(["estimate", str(path), "--vram-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "stream_all.py: latents precomputed for 33 frames" in out
    assert "latents cached, off the GPU" in out
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("does not fit"))) + 1
    assert "halve the frames (stream_all)" in lines[first]  # order 1: before every built-in remedy


@pytest.mark.parametrize("optimizer, args", [("prodigy", {}), ("came", {}), ("adamw_schedulefree", {}),
                                             ("torch.optim:SGD", {"momentum": 0.9})])
def test_every_optimizer_is_estimated_and_prodigy_holds_the_most_state(profile_data, optimizer, args):
    """``wantrain estimate`` knows every optimizer (it raised KeyError for all but three)."""
    def lora_row(name, extra):
        profile_data["training"].update(optimizer=name, optimizer_args=extra, lr=1.0 if name == "prodigy" else 1e-4)
        profile = load_profile(data=profile_data)
        e = est.estimate_profile(profile, open_run(profile, purpose="inspect").pm)[0]
        return next(r for r in e.rows if r[0].startswith("LoRA rank"))

    row = lora_row(optimizer, args)
    adamw = lora_row("adamw", {})
    assert f"{optimizer} state" in row[0]
    if optimizer == "prodigy":
        assert row[1] > adamw[1]
