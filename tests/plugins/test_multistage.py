"""multistage: which experts train, turn length in optimizer steps (also
with gradient accumulation), the boundary, one-expert runs, resume position."""

from __future__ import annotations

import textwrap

import pytest

from wantrain.errors import ProfileError
from wantrain.loop import setup, train
from wantrain.plugins import multistage as ms
from wantrain.profile import load_profile

H, L = "high_noise", "low_noise"

RECORDER = textwrap.dedent("""
    from wantrain import hookimpl
    class Plugin:
        def __init__(self):
            self.steps, self.micro, self.switches = [], [], []
        @hookimpl
        def before_expert_switch(self, run, old, new):
            self.switches.append((run.step, old, new, run.active_expert))
        @hookimpl
        def compute_extra_losses(self, run, batch, ctx):
            self.micro.append((run.step, ctx.expert, ctx.timesteps.tolist()))
        @hookimpl
        def on_step(self, run, step, metrics):
            self.steps.append(metrics["expert"])
""")


def _train(profile_data, tmp_path, multistage: dict, **training):
    recorder = tmp_path / "rec_ms.py"
    recorder.write_text(RECORDER)
    profile_data["training"].update(training)
    profile_data["plugins"] = {"enabled": ["multistage", str(recorder)], "multistage": multistage}
    run = train(load_profile(data=profile_data))
    return run, run.pm.get_plugin(str(recorder))


# ------------------------------------------------ the schedule


def _schedule(experts, switch_every, steps, position=None):
    position = position or ms.Position()
    return [ms.advance(position, experts, switch_every, s) for s in range(steps)]


def test_switch_every_counts_steps():
    assert _schedule([H, L], 1, 4) == [H, L, H, L]
    assert _schedule([H, L], 3, 8) == [H, H, H, L, L, L, H, H]
    assert _schedule([L], 2, 5) == [L] * 5


def test_asking_twice_for_a_step_gives_the_same_answer():
    pos = ms.Position()
    assert [ms.advance(pos, [H, L], 2, s) for s in (0, 0, 1, 1, 2, 2, 3)] == [H, H, H, H, L, L, L]


@pytest.mark.parametrize("stop", [1, 2, 3, 5])
def test_resume_continues_the_turn(stop):
    """Resume from the saved position, and from no position at all, both
    continue exactly like the uninterrupted schedule."""
    full = _schedule([H, L], 3, 9)
    plugin = ms.Plugin(ms.Config(switch_every=3))
    for s in range(stop):
        plugin.select_expert(run=None, step=s)
    state = plugin.state_dict()  # its own state only: the kernel keys it by the registered name
    restored = ms.Plugin(ms.Config(switch_every=3))
    restored.load_state_dict(state=state)
    fresh = ms.Plugin(ms.Config(switch_every=3))
    assert [restored.select_expert(run=None, step=s) for s in range(stop, 9)] == full[stop:]
    assert [fresh.select_expert(run=None, step=s) for s in range(stop, 9)] == full[stop:]


def test_saved_position_wins_when_switch_every_changes():
    """The turn in progress is finished with the new length, not recomputed from the step."""
    pos = ms.Position(expert=L, since=4)  # a turn of L began at step 4 (switch_every was 4)
    assert [ms.advance(pos, [H, L], 2, s) for s in (5, 6, 7)] == [L, H, H]


# ------------------------------------------------ config errors


def test_no_expert_is_an_error(profile_data):
    profile_data["plugins"] = {"enabled": ["multistage"], "multistage": {"high_noise": False, "low_noise": False}}
    with pytest.raises(ProfileError) as err:
        setup(load_profile(data=profile_data))
    assert str(err.value) == ("error: plugins.multistage: trains no expert (high_noise and low_noise are both false); "
                              "set high_noise = true or low_noise = true")


def test_bad_values_are_profile_errors(profile_data):
    profile_data["plugins"] = {"enabled": ["multistage"], "multistage": {"switch_every": 0, "boundary": 1.5, "high_noise": "yes"}}
    with pytest.raises(ProfileError) as err:
        load_profile(data=profile_data)
    text = str(err.value)
    assert "plugins.multistage.switch_every: must be greater than 0 (got 0)" in text
    assert "plugins.multistage.boundary: must be in (0, 1) (got 1.5)" in text
    assert "plugins.multistage.high_noise: expected true or false (got 'yes')" in text


# ------------------------------------------------ training


def test_turns_with_gradient_accumulation(profile_data, tmp_path):
    """switch_every counts optimizer steps; every micro-batch of a step trains that step's expert."""
    expected = [H, H, L, L, H]
    run, rec = _train(profile_data, tmp_path, {"switch_every": 2}, steps=5, gradient_accumulation=2)
    assert rec.steps == expected
    assert [e for _, e, _ in rec.micro] == [e for e in expected for _ in range(2)]
    assert [(step, old, new) for step, old, new, _ in rec.switches] == [(0, None, H), (2, H, L), (4, L, H)]
    for _, expert, ts in rec.micro:
        lo, hi = run.expert_range(expert)
        assert all(lo <= t <= hi for t in ts)


def test_one_expert_loads_and_writes_only_that_expert(profile_data, tmp_path):
    run, rec = _train(profile_data, tmp_path, {"high_noise": False}, steps=3)
    assert set(run.experts) == {L} and run.trained == [L] and set(run.lora_parameters) == {L}
    assert rec.steps == [L, L, L] and [s[1:3] for s in rec.switches] == [(None, L)]
    assert all(t < 875 for _, _, ts in rec.micro for t in ts)
    out = run.output_dir
    assert (out / "t_low_noise.safetensors").is_file() and not (out / "t_high_noise.safetensors").exists()
    # only the trained expert's adapter is in the optimizer
    assert sum(p.numel() for g in run.optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in run.lora_parameters[L])


def test_boundary_moves_the_expert_ranges(profile_data, tmp_path):
    run, rec = _train(profile_data, tmp_path, {"boundary": 0.5, "switch_every": 1}, steps=4, batch_size=3)
    assert run.boundary == 0.5 and run.expert_range(H) == (500.0, 1000.0)
    highs = [t for _, e, ts in rec.micro if e == H for t in ts]
    lows = [t for _, e, ts in rec.micro if e == L for t in ts]
    assert min(highs) >= 500 and max(lows) < 500
    assert min(highs) < 875  # the high-noise expert now trains below the model's own boundary


# ------------------------------------------------ per-expert settings


def test_each_expert_trains_in_its_own_param_group_at_its_own_lr(profile_data, tmp_path):
    """One optimizer param group per expert, each at its lr (base lr of the
    schedule too); the step count, the timestep range and the logged lr follow."""
    per_expert = {H: {"lr": 3e-3, "steps": 1, "t_min": 950.0}, L: {"lr": 5e-4, "t_max": 100.0}}
    run, rec = _train(profile_data, tmp_path, {"switch_every": 1, "per_expert": per_expert},
                      lr=1e-3, steps=4, lr_scheduler="cosine")
    groups = run.optimizer.param_groups
    assert [g["expert"] for g in groups] == [H, L]
    assert [g["initial_lr"] for g in groups] == [3e-3, 5e-4]
    assert run.lr_scheduler.base_lrs == [3e-3, 5e-4]
    assert [{id(p) for p in g["params"]} for g in groups] == [{id(p) for p in run.lora_parameters[e]} for e in (H, L)]
    assert rec.steps == [H, L, L, L]  # high noise: 1 step; the rest to low noise
    for step, expert, ts in rec.micro:
        assert all((950 <= t <= 1000) if expert == H else (0 <= t <= 100) for t in ts), (expert, ts)
    assert run.last_metrics["lr"] == pytest.approx(groups[1]["lr"])


def test_quota_schedules_take_turns_and_respect_counts():
    assert ms.quota_schedule([H, L], {H: 2, L: 6}, 2, 8) == [H, H, L, L, L, L, L, L]
    assert ms.quota_schedule([H, L], {H: 3, L: 3}, 1, 6) == [H, L, H, L, H, L]
    assert ms.squeeze(875.0, 875.0, 1000.0, 950.0, 1000.0) == 950.0
    assert ms.squeeze(1000.0, 875.0, 1000.0, 950.0, 1000.0) == 1000.0


def test_per_expert_mistakes_are_one_line_each(profile_data):
    from wantrain.run import open_run

    profile_data["plugins"] = {"enabled": ["multistage"], "multistage": {"per_expert": {
        H: {"lr": -1.0, "steps": 2, "share": 0.5}, "mid": {"lr": 1e-4}, L: {"t_min": 300.0, "t_max": 200.0}}}}
    with pytest.raises(ProfileError) as info:
        open_run(load_profile(data=profile_data), purpose="inspect")
    text = str(info.value)
    for line in ("plugins.multistage.per_expert.high_noise.lr: must be greater than 0",
                 "plugins.multistage.per_expert.high_noise: sets both steps and share",
                 "plugins.multistage.per_expert.mid: is not an expert",
                 "plugins.multistage.per_expert.low_noise.t_min: must be below t_max"):
        assert line in text, text
    # counts for every trained expert that leave steps over: the run would train past them
    profile_data["plugins"]["multistage"] = {"per_expert": {H: {"steps": 1}, L: {"steps": 2}}}
    with pytest.raises(ProfileError, match=r"per_expert: steps/share of every trained expert add up to 3, fewer than "
                                           r"training.steps = 4; raise them, or set training.steps = 3"):
        open_run(load_profile(data=profile_data), purpose="inspect")
