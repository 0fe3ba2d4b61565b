"""The sample plugin and ``wantrain sample``: real renders of the tiny model,
read back with PyAV; determinism; training unaffected by previews."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from wantrain import lora, registry
from wantrain.formats import safetensors as st
from wantrain.plugins.sample import render as sampling
from wantrain.plugins.sample.command import load_for_sampling
from wantrain.commands.cli import main
from wantrain.run import CoreHooks
from wantrain.loop import train
from wantrain.profile import load_profile

PROMPTS = ["a [trigger] clip", "two shapes drifting"]
SAMPLE = {"prompts": PROMPTS, "width": 48, "height": 32, "num_frames": 5, "steps": 4, "every": 2, "seed": 3}

# Inside generate_samples it draws from every RNG and flips every module to
# train mode: the sample plugin must undo all of it around the event.
MESSY_WRAPPER = textwrap.dedent(
    """
    import random
    import numpy as np
    import torch
    from wantrain import hookimpl

    class Plugin:
        @hookimpl(wrapper=True)
        def generate_samples(self, run):
            torch.rand(3); torch.rand(3, generator=run.generator); np.random.rand(); random.random()
            for module in run.experts.values():
                module.train()
            return (yield)
    """
)


def _data(tiny_model, demo_data, out: Path, plugins: dict) -> dict:
    from conftest import BASE_PROFILE

    data = copy.deepcopy(BASE_PROFILE)
    data["job"]["output_dir"] = str(out)
    data["model"]["name_or_path"] = str(tiny_model)
    data["datasets"][0]["folder"] = str(demo_data)
    data["training"]["lr"] = 1e-2  # a LoRA that visibly moves in 4 steps
    data["plugins"] = plugins
    return data


@pytest.fixture(scope="module")
def sampled(tiny_model, demo_data, tmp_path_factory):
    """4 steps with previews at start (base), 2 and 4, and a wrapper that messes with state."""
    root = tmp_path_factory.mktemp("sampled")
    (root / "messy.py").write_text(MESSY_WRAPPER)
    plugins = {"enabled": ["sample", str(root / "messy.py")], "sample": dict(SAMPLE)}
    run = train(load_profile(data=_data(tiny_model, demo_data, root / "out", plugins)))
    return run


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_previews_are_written_and_decode_to_frames_and_size(sampled):
    samples = sampled.output_dir / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["base", "step_000000002", "step_000000004"]
    for folder in samples.iterdir():
        assert sorted(p.name for p in folder.glob("*.mp4")) == ["0.mp4", "1.mp4"]
        for path in folder.glob("*.mp4"):
            frames = _decode(path)
            assert frames.shape == (5, 32, 48, 3), path
        assert (folder / "prompts.txt").read_text().splitlines() == ["0.mp4\ta sks clip", "1.mp4\ttwo shapes drifting"]
    assert sampled.extras["samples"]["step"] == 4
    assert sampled.extras["samples"]["paths"] == [str(samples / "step_000000004" / f"{i}.mp4") for i in (0, 1)]


def test_previews_with_the_trained_lora_differ_from_the_base(sampled):
    samples = sampled.output_dir / "samples"
    for i in (0, 1):
        base = _decode(samples / "base" / f"{i}.mp4").astype(int)
        trained = _decode(samples / "step_000000004" / f"{i}.mp4").astype(int)
        assert np.abs(base - trained).mean() > 1.0, f"preview {i} looks like the base model"


def test_same_seed_same_previews_other_seed_differs(sampled, tmp_path):
    settings = sampling.settings_from(sampled.profile.plugin_config("sample"))
    again = sampling.render(sampled, settings, tmp_path / "again")
    # the in-training render of the last step used the same weights and seed
    last = sampled.output_dir / "samples" / "step_000000004"
    assert [Path(p).read_bytes() for p in again] == [(last / f"{i}.mp4").read_bytes() for i in (0, 1)]
    other = sampling.render(sampled, sampling.settings_from(settings, prompts=(PROMPTS[0],), seed=4), tmp_path / "other")
    assert Path(other[0]).read_bytes() != Path(again[0]).read_bytes()


def test_training_after_previews_is_bit_identical(sampled, tiny_model, demo_data, tmp_path):
    plain = train(load_profile(data=_data(tiny_model, demo_data, tmp_path / "plain", {"enabled": []})))
    assert not (plain.output_dir / "samples").exists()
    for expert in ("high_noise", "low_noise"):
        a = lora.lora_state(sampled.experts[expert])
        b = lora.lora_state(plain.experts[expert])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), expert
        assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_training_state_is_restored_after_a_render_that_changes_it(sampled):
    run = sampled
    module = run.experts["high_noise"]
    module.train()
    before = (run.generator.get_state(), torch.get_rng_state())
    with sampling.training_state_preserved(run):
        torch.rand(5, generator=run.generator)
        torch.rand(5)
        module.eval()
        torch.set_grad_enabled(False)
    assert torch.equal(run.generator.get_state(), before[0]) and torch.equal(torch.get_rng_state(), before[1])
    assert module.training and all(m.training for m in module.modules())
    assert torch.is_grad_enabled()
    module.eval()


def test_cli_renders_the_final_pair_like_the_last_preview(sampled, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sample", str(sampled.output_dir / "profile.toml"), "--lora", str(sampled.output_dir / "t"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "0.mp4"), str(out / "1.mp4")]
    last = sampled.output_dir / "samples" / "step_000000004"
    # fp32 files (save_dtype) -> the same bits as the in-training render of step 4
    assert [(out / f"{i}.mp4").read_bytes() for i in (0, 1)] == [(last / f"{i}.mp4").read_bytes() for i in (0, 1)]


def test_cli_prompt_option_and_lazy_experts(sampled, tmp_path):
    profile = sampled.profile
    files = sampling.lora_paths(str(sampled.output_dir / "t_high_noise.safetensors"))
    assert sorted(files) == ["high_noise", "low_noise"]
    run = load_for_sampling(profile, files)
    assert run.experts == {}  # experts load on first use, LoRA attached as they load
    settings = sampling.settings_from(profile.plugin_config("sample"), prompts=("[trigger] only",), steps=2)
    paths = sampling.render(run, settings, tmp_path)
    assert [Path(p).name for p in paths] == ["0.mp4"]
    assert (tmp_path / "prompts.txt").read_text() == "0.mp4\tsks only\n"
    for expert in ("high_noise", "low_noise"):
        a, b = lora.lora_state(run.experts[expert]), lora.lora_state(sampled.experts[expert])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_file_alpha_is_honoured_per_module(sampled, tmp_path):
    from safetensors.torch import save_file

    from wantrain import model

    tensors, _ = st.read(sampled.output_dir / "t_high_noise.safetensors")
    q0 = "diffusion_model.blocks.0.self_attn.q.alpha"
    tensors = {k: torch.tensor(16.0 if k == q0 else 2.0) if k.endswith(".alpha") else v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "x_high_noise.safetensors"))
    module = model.load_expert(sampled.source, "high_noise", torch.float32)
    sampling.attach_lora_file(module, tmp_path / "x_high_noise.safetensors")
    scales = {name: layer.scaling[lora.ADAPTER] for name, layer in lora.lora_layers(module)}
    assert scales.pop("blocks.0.attn1.to_q") == 16 / 4  # rank 4
    assert set(scales.values()) == {2 / 4}
    state = lora.lora_state(module)
    assert torch.equal(state["blocks.1.ffn.net.2.lora_B.weight"], tensors["diffusion_model.blocks.1.ffn.2.lora_B.weight"])


def test_cli_errors_are_one_line(sampled, tmp_path, capsys):
    profile_path = str(sampled.output_dir / "profile.toml")
    assert main(["sample", profile_path, "--lora", str(tmp_path / "nope")]) == 2
    assert "error: --lora: no LoRA file found" in capsys.readouterr().err
    assert main(["sample", profile_path, "--lora", str(sampled.output_dir / "t"), "--set", "plugins.sample.num_frames=6"]) == 2
    assert "error: plugins.sample.num_frames: must be 1 or 4n+1" in capsys.readouterr().err


def test_trigger_in_prompts_needs_a_trigger_word(profile_data):
    profile_data["job"].pop("trigger_word")
    profile_data["plugins"] = {"enabled": ["sample"], "sample": {"prompts": ["[Trigger] walking"]}}
    profile = load_profile(data=profile_data)
    pm = registry.make_plugin_manager(profile, core=CoreHooks())
    problems = [p for found in pm.hook.check_profile(profile=profile) for p in (found or [])]
    assert [p.line() for p in problems] == [
        'error: plugins.sample.prompts: a prompt uses [trigger] but job.trigger_word is not set; '
        'set job.trigger_word = "sks" (your token) or remove [trigger] from the prompts'
    ]


def test_config_validation_messages(profile_data):
    from wantrain.errors import ProfileError

    profile_data["plugins"] = {"enabled": ["sample"], "sample": {"prompts": [], "width": 40, "guidance_low": 0.5}}
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    text = str(err.value)
    assert "plugins.sample.prompts: must not be empty" in text
    assert "plugins.sample.width: must be a multiple of 16" in text and "use 32 or 48" in text
    assert "plugins.sample.guidance_low: must be in [1, inf]" in text


@pytest.mark.parametrize("every,at_end,expected", [(2, True, [2, 4, 5]), (0, True, [5]), (2, False, [2, 4]), (0, False, [])])
def test_when_previews_are_due(every, at_end, expected):
    from wantrain.plugins.sample import Config, due

    config = Config(prompts=("x",), every=every, at_end=at_end)
    assert [s for s in range(1, 6) if due(config, s, 5)] == expected


class _Module(torch.nn.Module):
    """Stands in for a component; ``where`` plays its device (no CUDA here)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = torch.device(where)

    def to(self, device):
        self.where = torch.device(device)
        return self


@pytest.fixture
def fake_placement(monkeypatch):
    monkeypatch.setattr(sampling, "_device_of", lambda m: m.where)

    def make(experts: dict[str, str], device: str = "cuda", placed_by=None):
        return SimpleNamespace(device=torch.device(device), text_encoder=_Module(device), vae=_Module(device),
                               experts={k: _Module(v) for k, v in experts.items()},
                               experts_placed_by_plugin=placed_by is not None, activate_expert=placed_by)

    return make


def test_components_take_turns_when_one_is_parked(fake_placement):
    run = fake_placement({"high_noise": "cuda", "low_noise": "cpu"})  # an offload plugin parked low_noise
    placement = sampling.Placement(run, ["high_noise", "low_noise"])
    assert placement.turns

    def on_device():
        return sorted(n for n, m in sampling._components(run).items() if m.where.type == "cuda")

    placement.visit("text_encoder")
    assert on_device() == ["text_encoder"]
    placement.visit("low_noise")
    assert on_device() == ["low_noise"]
    placement.visit("vae")
    assert on_device() == ["vae"]
    placement.restore()
    assert on_device() == ["high_noise", "text_encoder", "vae"]


def test_an_expert_loaded_for_previews_waits_on_the_cpu(fake_placement):
    run = fake_placement({"high_noise": "cuda"})  # only high noise trained; low noise loads on demand
    placement = sampling.Placement(run, ["high_noise", "low_noise"])
    assert placement.turns
    placement.visit("low_noise")
    run.experts["low_noise"] = _Module("cuda")  # what require_expert does
    placement.restore()
    assert {n: m.where.type for n, m in sampling._components(run).items()} == {
        "text_encoder": "cuda", "vae": "cuda", "high_noise": "cuda", "low_noise": "cpu"}


def test_nothing_moves_when_everything_fits(fake_placement):
    run = fake_placement({"high_noise": "cuda", "low_noise": "cuda"})
    placement = sampling.Placement(run, ["high_noise", "low_noise"])
    assert not placement.turns
    placement.visit("vae")
    assert all(m.where.type == "cuda" for m in sampling._components(run).values())
    cpu_run = fake_placement({"high_noise": "cpu"}, device="cpu")
    assert not sampling.Placement(cpu_run, ["high_noise", "low_noise"]).turns


def test_an_offload_manager_places_the_experts(fake_placement):
    asked = []  # what run.activate_expert hands to a plugin implementing activate_expert
    run = fake_placement({"high_noise": "cuda", "low_noise": "cpu"}, placed_by=asked.append)
    placement = sampling.Placement(run, ["high_noise", "low_noise"])
    placement.visit("low_noise")
    assert asked == ["low_noise"]
    assert {n: m.where.type for n, m in sampling._components(run).items()} == {
        "text_encoder": "cpu", "vae": "cpu", "high_noise": "cuda", "low_noise": "cpu"}  # experts left to it
    placement.visit("vae")
    placement.restore()
    assert asked == ["low_noise"]
    assert {n: m.where.type for n, m in sampling._components(run).items()} == {
        "text_encoder": "cuda", "vae": "cuda", "high_noise": "cuda", "low_noise": "cpu"}


def test_prompts_are_encoded_at_start_even_without_a_start_preview():
    from wantrain.plugins.sample import Config, Plugin

    asked = []
    run = SimpleNamespace(
        profile=SimpleNamespace(job=SimpleNamespace(trigger_word="sks")), text_encoder=None, vae=None, experts={},
        rng_state=lambda: None, set_rng_state=lambda state: None, encode_prompts=asked.append,
    )
    Plugin(Config(prompts=("[trigger] walks",), negative_prompt="blurry", at_start=False)).on_run_start(run=run)
    assert asked == [["sks walks", "blurry"]]  # text_cache (unload = true) needs them before it drops the encoder


# ---------------------------------------------------------------- sampler controls


def test_unipc_renders_differ_from_euler_and_are_deterministic(sampled, tmp_path):
    settings = sampling.settings_from(sampled.profile.plugin_config("sample"), prompts=(PROMPTS[0],))
    euler = sampling.render(sampled, settings, tmp_path / "euler")
    unipc = sampling.settings_from(settings, sampler="unipc")
    first = sampling.render(sampled, unipc, tmp_path / "unipc1")
    again = sampling.render(sampled, unipc, tmp_path / "unipc2")
    assert Path(first[0]).read_bytes() == Path(again[0]).read_bytes()
    assert np.abs(_decode(first[0]).astype(int) - _decode(euler[0]).astype(int)).mean() > 0.5


def test_unipc_is_configured_as_the_wan_pipelines_use_it():
    from diffusers import UniPCMultistepScheduler

    settings = sampling.SampleSettings(prompts=("x",), sampler="unipc", shift=5.0, steps=10)
    scheduler = sampling.make_scheduler(settings)
    assert isinstance(scheduler, UniPCMultistepScheduler)
    cfg = scheduler.config
    assert (cfg.prediction_type, cfg.use_flow_sigmas, cfg.flow_shift, cfg.num_train_timesteps) == ("flow_prediction", True, 5.0, 1000)
    assert len(scheduler.timesteps) == 10 and float(scheduler.timesteps[0]) > 990


def test_walk_seed_gives_prompt_i_the_noise_of_seed_plus_i():
    import attrs

    walk = sampling.SampleSettings(prompts=("a", "b", "c"), seed=5, walk_seed=True, width=32, height=32, num_frames=5)
    noise = sampling.initial_noise(walk, 3)
    for i in range(3):
        alone = sampling.initial_noise(attrs.evolve(walk, seed=5 + i, walk_seed=False), 1)[0]
        assert torch.equal(noise[i], alone)
    # the default is unchanged: one generator of the seed, drawn in prompt order
    default = sampling.initial_noise(attrs.evolve(walk, walk_seed=False), 3)
    generator = torch.Generator("cpu").manual_seed(5)
    assert all(torch.equal(default[i], torch.randn(sampling.latent_shape(walk), generator=generator)) for i in range(3))
    assert not torch.equal(default[1], noise[1])


def test_sampler_must_be_known(profile_data):
    profile_data["plugins"] = {"enabled": ["sample"], "sample": {"prompts": ["x"], "sampler": "dpm"}}
    with pytest.raises(Exception) as err:
        load_profile(data=profile_data)
    assert "plugins.sample.sampler" in str(err.value) and "euler" in str(err.value)


def test_the_default_start_image_of_a_stills_only_dataset_is_its_first_image(profile_data, demo_data, tmp_path):
    """A TI2V-5B character set of stills had no clip to take a start image from: the first preview raised."""
    import shutil

    from wantrain.plugins.sample.render import default_start_image
    from wantrain.profile import load_profile as _load

    stills = tmp_path / "stills"
    stills.mkdir()
    for p in sorted(demo_data.glob("still_*")):
        shutil.copy(p, stills / p.name)
    profile_data["datasets"][0]["folder"] = str(stills)
    assert default_start_image(_load(data=profile_data)) == str(stills / "still_00.png")
    profile_data["datasets"][0]["folder"] = str(demo_data)
    assert default_start_image(_load(data=profile_data)).endswith("clip_00.mp4")
