"""Every profile in profiles/ loads, opens with its explanatory comment, and
passes ``wantrain check`` (dataset and model paths pointed at test data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wantrain.commands import estimate as est
from wantrain.commands.check import check
from wantrain.profile import load_profile
from wantrain.run import open_run

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p for p in (ROOT / "profiles").glob("*.toml"))
#: the recipes of the other archs (issue 13) and the card each is made for
ARCH_RECIPES = {"i2v_motion_24gb": 24, "i2v_char_24gb": 24, "i2v_motion_h100": 80,
                "ti2v5b_char_24gb": 24, "ti2v5b_motion_24gb": 24}


@pytest.fixture(scope="module")
def arch_models(tiny_model, tmp_path_factory):
    """A tiny model per ``[model] arch`` (each profile is checked against its own arch's layout)."""
    from wantrain.commands.tiny import make_tiny_model

    made = {"wan22_t2v_a14b": tiny_model}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(tmp_path_factory.mktemp(arch), seed=0, arch=arch)
        return made[arch]
    return get


def test_the_recipes_exist():
    names = {p.stem for p in PROFILES}
    for kind in ("char", "style", "motion"):
        for tier in ("24gb", "48gb", "h100"):
            assert f"{kind}_{tier}" in names
    assert "demo_cpu" in names
    assert set(ARCH_RECIPES) | {"demo_i2v_cpu"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_opens_with_how_to_run_it(path):
    head = path.read_text().split("\n[", 1)[0]
    assert head.startswith("#"), "a profile opens with a comment"
    assert f"wantrain run profiles/{path.name}" in head or "make demo" in head


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_passes_check(path, arch_models, demo_data, tmp_path):
    raw = load_profile(path)
    overrides = [f'model.name_or_path="{arch_models(raw.model.arch)}"', f'job.output_dir="{tmp_path}"']
    if raw.job.trigger_word is None:  # the demo captions use [trigger]
        overrides.append('job.trigger_word="sks"')
    overrides += [f'datasets[{i}].folder="{demo_data}"' for i in range(len(raw.datasets))]
    if raw.model.arch == "wan22_i2v_a14b":  # stills are skipped: the 2 s demo clips must fill the frames
        overrides += [f"datasets[{i}].num_frames=25" for i in range(len(raw.datasets)) if raw.datasets[i].num_frames > 25]
    profile = load_profile(path, overrides)
    assert check(profile) == []


def test_cli_check_ok(tiny_model, demo_data, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "wantrain", "check", str(ROOT / "profiles" / "demo_cpu.toml"),
         "--set", f'model.name_or_path="{tiny_model}"', "--set", f'datasets[0].folder="{demo_data}"',
         "--set", f'job.output_dir="{tmp_path}"'],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")


def test_cli_check_reports_missing_paths(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "wantrain", "check", str(ROOT / "profiles" / "demo_cpu.toml"),
         "--set", f'model.name_or_path="{tmp_path}/nope"', "--set", f'datasets[0].folder="{tmp_path}/nothing"',
         "--set", f'job.output_dir="{tmp_path}/out"'],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert any(l.startswith("error: model.name_or_path: ") for l in lines), lines
    assert any(l.startswith("error: datasets[0].folder: ") for l in lines), lines


@pytest.mark.parametrize("name", sorted(ARCH_RECIPES))
def test_arch_recipes_fit_their_card(name, tmp_path):
    """``wantrain estimate`` of the recipe as shipped (a hub id: the built-in configs, no download)."""
    profile = load_profile(ROOT / "profiles" / f"{name}.toml", [f'job.output_dir="{tmp_path}"'])
    e, s, _, origin = est.estimate_profile(profile, open_run(profile, purpose="inspect").pm, ARCH_RECIPES[name])
    assert e.fits, e.table()
    assert origin.startswith("built-in Wan 2.2 I2V-A14B" if name.startswith("i2v") else "built-in Wan 2.2 TI2V-5B")
    if name.startswith("ti2v5b"):  # the 5B fits a 24 GB card in bf16: no 4-bit
        assert s.weight_bytes is None and s.experts == 1
