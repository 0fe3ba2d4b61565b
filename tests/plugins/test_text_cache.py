"""text_cache: every caption encoded once up front, files keyed by text and
encoder identity, the same states (and the same training) as the encoder,
reuse across runs; unload = trigger-word-only training with the encoder gone."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import attrs
import pytest
import torch
from safetensors import safe_open

from wantrain import model
from wantrain.formats import safetensors as st
from wantrain.errors import WantrainError
from wantrain.loop import train
from wantrain.plugins import text_cache as tc
from wantrain.profile import load_profile

# counts text-encoder forwards, keeps the text states each micro-batch trained with
RECORDER = textwrap.dedent("""
    from wantrain import hookimpl
    class Plugin:
        def __init__(self):
            self.forwards, self.at_steps, self.states = [0], [], []
        @hookimpl
        def after_text_encoder_load(self, run, module):
            module.register_forward_hook(lambda *a: self.forwards.__setitem__(0, self.forwards[0] + 1))
        @hookimpl
        def compute_extra_losses(self, run, batch, ctx):
            self.states.append((list(batch.captions), ctx.text_states.detach().clone()))
        @hookimpl
        def on_step(self, run, step):
            self.at_steps.append(self.forwards[0])
""")


def _train(profile_data, tmp_path, cache: dict | None, name="out", steps=3, **dataset):
    rec = tmp_path / "rec_tc.py"
    rec.write_text(RECORDER)
    profile_data["job"]["output_dir"] = str(tmp_path / name)
    profile_data["training"]["steps"] = steps
    profile_data["datasets"][0].update(dataset)
    enabled = (["text_cache"] if cache is not None else []) + [str(rec)]
    profile_data["plugins"] = {"enabled": enabled, **({"text_cache": cache} if cache is not None else {})}
    run = train(load_profile(data=profile_data))
    return run, run.pm.get_plugin(str(rec))


def _captions(run) -> set[str]:
    return {item.template.replace("[trigger]", "sks") for ds in run.data.datasets for item in ds.items}


def test_every_caption_cached_once_and_training_is_unchanged(profile_data, tmp_path):
    folder = tmp_path / "shared_cache"
    plain, plain_rec = _train(profile_data, tmp_path, None, name="plain")
    cached, rec = _train(profile_data, tmp_path, {"folder": str(folder)}, name="cached")
    captions = _captions(cached)
    files = sorted(folder.glob("*.safetensors"))
    assert len(captions) == 7 and len(files) == len(captions)
    texts = set()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            meta, states = fh.metadata(), fh.get_tensor("states")
        texts.add(meta["text"])
        assert path.stem == tc.prompt_key(meta["identity"], meta["text"])
        direct = model.encode_text(cached.tokenizer, cached.text_encoder, [meta["text"]], 32, "cpu", torch.float32)[0]
        assert 0 < states.shape[0] < 32 and torch.equal(tc.pad(states, 32), direct)  # padding trimmed, same bits
    assert texts == captions
    # no encoder forward during training: everything was encoded before step 1
    assert rec.at_steps[0] == rec.at_steps[-1] and rec.at_steps[0] >= 1
    assert plain_rec.at_steps[-1] - plain_rec.at_steps[0] == 2  # the kernel encodes every micro-batch
    for (caps_a, a), (caps_b, b) in zip(plain_rec.states, rec.states):
        assert caps_a == caps_b and torch.equal(a, b)
    for expert in cached.trained:
        a = st.read(plain.output_dir / f"t_{expert}.safetensors")[0]
        b = st.read(cached.output_dir / f"t_{expert}.safetensors")[0]
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a second run with the same folder encodes nothing
    again, rec2 = _train(profile_data, tmp_path, {"folder": str(folder)}, name="again", steps=1)
    assert again.pm.get_plugin("text_cache").store.encoded == 0 and rec2.forwards[0] == 0
    assert sorted(folder.glob("*.safetensors")) == files


def test_the_key_follows_the_encoder_identity(profile_data, tmp_path):
    run, _ = _train(profile_data, tmp_path, {}, steps=1)
    base = SimpleNamespace(profile=run.profile, text_encoder=run.text_encoder)
    longer = SimpleNamespace(profile=attrs.evolve(run.profile, model=attrs.evolve(run.profile.model, max_sequence_length=64)),
                             text_encoder=run.text_encoder)
    bf16 = SimpleNamespace(profile=attrs.evolve(run.profile, model=attrs.evolve(run.profile.model, dtype="bf16")),
                           text_encoder=run.text_encoder)
    ids = {tc.encoder_identity(r) for r in (base, longer, bf16)}
    assert len(ids) == 3 and tc.encoder_identity(base) == run.pm.get_plugin("text_cache").store.identity
    assert tc.prompt_key(tc.encoder_identity(base), "a") != tc.prompt_key(tc.encoder_identity(base), "b")
    assert (run.output_dir / "cache" / "text_embeddings").is_dir()  # the default folder


def test_unload_trains_on_the_trigger_word_with_the_encoder_gone(profile_data, tmp_path, tiny_model):
    profile_data["training"]["batch_size"] = 2
    run, rec = _train(profile_data, tmp_path, {"unload": True}, steps=2, caption_dropout=0.5)
    assert run.text_encoder is None
    tokenizer, encoder = model.load_text_encoder(model.ModelSource(str(tiny_model)), torch.float32)
    trigger, empty = model.encode_text(tokenizer, encoder, ["sks", ""], 32, "cpu", torch.float32)
    seen = []
    for captions, states in rec.states:
        for caption, s in zip(captions, states):
            assert torch.equal(s, empty if caption == "" else trigger)
            seen.append(caption)
    assert "" in seen and any(c not in ("", "sks") for c in seen)  # both kinds met, real captions replaced
    with pytest.raises(WantrainError, match=r"text_cache: the text encoder was unloaded \(unload = true\) before 'a new prompt'"):
        run.encode_prompts(["a new prompt"])
