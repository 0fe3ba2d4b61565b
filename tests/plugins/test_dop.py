"""dop: the preservation term is multiplier * MSE(LoRA-on, LoRA-off) on the
class caption (recomputed here independently), dropped captions add
nothing, a missing trigger word is a clear error."""

from __future__ import annotations

import textwrap

import pytest

from wantrain.errors import ProfileError
from wantrain.loop import setup, train
from wantrain.plugins.dop import class_caption
from wantrain.profile import load_profile

# recomputes the expected preservation loss of every micro-batch with the kernel's
# own pieces (no DOP code), and collects the logged metrics
CHECKER = textwrap.dedent("""
    import torch
    from wantrain import hookimpl, lora, model

    class Plugin:
        def __init__(self):
            self.expected, self.metrics, self.class_captions = [], [], []

        @hookimpl
        def compute_extra_losses(self, run, batch, ctx):
            keep = [i for i, t in enumerate(batch.templates) if t is not None]
            if not keep:
                self.expected.append(0.0)
                return None
            captions = [batch.templates[i].replace("[trigger]", CLASS) for i in keep]
            self.class_captions.append(captions)
            states = model.encode_text(run.tokenizer, run.text_encoder, captions,
                                       run.profile.model.max_sequence_length, run.device, run.dtype)
            noisy, t = ctx.noisy[keep], ctx.timesteps[keep]
            with torch.no_grad():
                with lora.lora_disabled(run.experts[ctx.expert]):
                    prior = run.predict(ctx.expert, noisy, t, states)
                on = run.predict(ctx.expert, noisy, t, states)
            self.expected.append(MULTIPLIER * float(torch.nn.functional.mse_loss(on, prior)))

        @hookimpl
        def on_step(self, run, step, metrics):
            self.metrics.append(dict(metrics))
""")


def _train(profile_data, tmp_path, dop: dict, steps=3, **dataset):
    checker = tmp_path / "dop_check.py"
    checker.write_text(CHECKER.replace("CLASS", repr(dop.get("preservation_class", "person")))
                       .replace("MULTIPLIER", repr(dop.get("multiplier", 1.0))))
    profile_data["training"].update(steps=steps, batch_size=2)
    profile_data["datasets"][0].update(dataset)
    profile_data["plugins"] = {"enabled": ["dop", str(checker)], "dop": dop}
    run = train(load_profile(data=profile_data))
    return run, run.pm.get_plugin(str(checker))


def test_class_caption():
    assert class_caption("[trigger] dancing in the rain", "sks", "woman") == "woman dancing in the rain"
    assert class_caption("a photo of [TRIGGER], sks style", "sks", "dog") == "a photo of dog, dog style"
    assert class_caption("sksx and sks.", "sks", "cat") == "sksx and cat."  # whole words only


def test_preservation_loss_is_the_documented_term(profile_data, tmp_path):
    run, check = _train(profile_data, tmp_path, {"multiplier": 2.5, "preservation_class": "person"})
    logged = [m["loss/preservation"] for m in check.metrics]
    assert logged == pytest.approx(check.expected, rel=1e-4, abs=1e-9)
    assert max(logged) > 0  # the LoRA moved the output: the term is live
    for m in check.metrics:
        assert m["loss"] == pytest.approx(m["loss/main"] + m["loss/preservation"], rel=1e-6)
    assert all("person" in c and "sks" not in c for caps in check.class_captions for c in caps)
    # the class caption is announced to prompt caches through the caption_variants event
    assert run.pm.hook.caption_variants(run=run, template="[trigger] dancing, sks style") == [["person dancing, person style"]]


def test_dropped_captions_add_nothing(profile_data, tmp_path):
    run, check = _train(profile_data, tmp_path, {"multiplier": 1.0}, steps=2, caption_dropout=1.0)
    assert [m["loss/preservation"] for m in check.metrics] == [0.0, 0.0]
    assert all(m["loss"] == m["loss/main"] for m in check.metrics)


def test_needs_a_trigger_word(profile_data):
    profile_data["job"]["trigger_word"] = None
    del profile_data["job"]["trigger_word"]
    profile_data["plugins"] = {"enabled": ["dop"], "dop": {"preservation_class": "woman"}}
    with pytest.raises(ProfileError) as err:
        setup(load_profile(data=profile_data))
    assert str(err.value) == ('error: plugins.dop: needs job.trigger_word (DOP replaces the trigger by the class); '
                              'set [job] trigger_word = "sks"')


def test_bad_values(profile_data):
    profile_data["plugins"] = {"enabled": ["dop"], "dop": {"multiplier": -1, "preservation_class": ""}}
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    assert "plugins.dop.multiplier: must be 0 or more" in str(err.value)
    assert "plugins.dop.preservation_class: must not be empty" in str(err.value)
