"""Every profile error path prints its golden one-line message."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from wantrain.errors import ProfileError
from wantrain.profile import load_profile

MINIMAL = {"job": {"name": "x"}, "datasets": [{"folder": "d"}]}


def errors(data=None, overrides=(), path=None):
    with pytest.raises(ProfileError) as info:
        load_profile(path, list(overrides), data=data if path is None else None)
    return info.value.lines()


def test_valid_minimal_profile_gets_defaults():
    p = load_profile(data=MINIMAL)
    assert p.job.output_dir == "output/x"
    assert p.training.optimizer == "adamw" and p.target.rank == 16 and p.datasets[0].num_frames == 33


@pytest.mark.parametrize(
    "override, golden",
    [
        ("training.steps=1.9", "error: training.steps: expected an integer (got 1.9); write a whole number such as 200"),
        ('training.steps="200"', "error: training.steps: expected an integer (got '200'); write a whole number such as 200"),
        ("training.steps=true", "error: training.steps: expected an integer (got true); write a whole number such as 200"),
        ('model.gradient_checkpointing="false"', "error: model.gradient_checkpointing: expected true or false (got 'false'); write true or false (no quotes)"),
        ("job.name=3", 'error: job.name: expected a string (got 3); write a quoted string such as "text"'),
        ("training.lr=true", "error: training.lr: expected a number (got true); write a number such as 0.5"),
        ("training.optimizr=\"adam\"", "error: training.optimizr: unknown key (got 'adam'); did you mean 'optimizer'?"),
        ('training.optimizer="adam"', "error: training.optimizer: must be one of 'adamw', 'adamw8bit', 'adafactor', 'prodigy', 'came', 'adamw_schedulefree' or \"module:Class\" (got 'adam'); did you mean 'adamw'?"),
        ("target.rank=0", "error: target.rank: must be greater than 0 (got 0); use a positive number"),
        ("datasets[0].num_frames=10", "error: datasets[0].num_frames: must be 1 or 4n+1 (Wan's VAE packs 4 frames per latent frame) (got 10); use 9 or 13"),
        ("datasets[0].caption_dropout=1.5", "error: datasets[0].caption_dropout: must be in [0, 1] (got 1.5); pick a value in [0, 1]"),
        ("datasets[0].resolutions=[500]", "error: datasets[0].resolutions: each resolution must be a multiple of 16, at least 16 (got 500); use e.g. 256, 512 or 768"),
        ('job.device="gpu"', "error: job.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got 'gpu'); use device = \"auto\""),
        ("trainig.steps=3", "error: trainig: unknown section; did you mean 'training'?"),
        ('plugins.enabled=["no_such_plugin"]', None),
        ('plugins.sample.every=5', "error: plugins.sample: table for a plugin that is not enabled; add \"sample\" to plugins.enabled or remove the table"),
        ("training.warmup_steps=5000", "error: training.warmup_steps: must be smaller than training.steps (got 5000); use fewer than 2000"),
        ('target.modules=["attn1.to_qq"]', "error: target.modules: unknown LoRA target (got 'attn1.to_qq'); did you mean 'attn1.to_q'?"),
        ("steps", "error: --set: expected KEY=VALUE (got 'steps'); write --set training.steps=200"),
    ],
)
def test_golden_messages(override, golden):
    lines = errors(MINIMAL, [override])
    if golden is None:
        assert len(lines) == 1 and lines[0].startswith("error: plugins.enabled: unknown plugin (got 'no_such_plugin'); known: ")
    else:
        assert lines == [golden]


def test_required_keys():
    assert errors({"datasets": [{}]}) == [
        'error: job: is required; add [job] with name = "my_lora"',
        "error: datasets[0].folder: is required; add folder = ... under [datasets]",
    ]


def test_all_problems_reported_at_once():
    lines = errors(MINIMAL, ["training.steps=1.9", "training.lr=-1", 'training.lr_scheduler="cosin"', "target.rank=0", "training.foo=1"])
    assert len(lines) == 5
    assert "error: training.lr_scheduler: must be one of 'constant', 'linear', 'cosine' (got 'cosin'); did you mean 'cosine'?" in lines


def test_extends_and_set(tmp_path):
    (tmp_path / "base.toml").write_text('[job]\nname = "base"\nseed = 1\n[training]\nsteps = 10\nlr = 0.001\n[[datasets]]\nfolder = "a"\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[job]\nname = "child"\n[training]\nsteps = 20\n')
    p = load_profile(tmp_path / "child.toml", ["training.lr=0.5", 'job.trigger_word="ohwx"'])
    assert (p.job.name, p.job.seed, p.training.steps, p.training.lr, p.job.trigger_word) == ("child", 1, 20, 0.5, "ohwx")
    assert p.datasets[0].folder == "a"
    assert 'name = "child"' in p.to_toml() and "extends" not in p.to_toml()


def test_extends_errors(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    assert errors(path=tmp_path / "a.toml") == ["error: extends: circular extends (got 'a.toml -> b.toml -> a.toml'); remove one of the links"]
    (tmp_path / "c.toml").write_text('extends = "missing.toml"\n')
    (line,) = errors(path=tmp_path / "c.toml")
    assert line.startswith("error: extends: file not found (got ") and line.endswith("missing.toml'); check the path")


def test_bad_toml_syntax(tmp_path):
    (tmp_path / "bad.toml").write_text("[job\nname = 1\n")
    (line,) = errors(path=tmp_path / "bad.toml")
    assert line.startswith("error: bad.toml: not valid TOML: ") and line.endswith("; fix the syntax at that line")


def test_cli_prints_lines_exit_2_no_traceback(tmp_path):
    (tmp_path / "p.toml").write_text(textwrap.dedent("""
        [job]
        name = "x"
        [training]
        steps = 1.5
        optimizer = "sgd"
        [[datasets]]
        folder = "d"
    """))
    proc = subprocess.run([sys.executable, "-m", "wantrain", "check", str(tmp_path / "p.toml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: training.steps: expected an integer (got 1.5); write a whole number such as 200",
        "error: training.optimizer: must be one of 'adamw', 'adamw8bit', 'adafactor', 'prodigy', 'came', 'adamw_schedulefree' or \"module:Class\" (got 'sgd'); use one of 'adamw', 'adamw8bit', 'adafactor', 'prodigy', 'came', 'adamw_schedulefree', or \"module:Class\" such as \"torch.optim:SGD\"",
    ]
