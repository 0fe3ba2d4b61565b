"""Every profile in profiles/ loads, opens with its explanatory comment, and
passes ``wantrain check`` (dataset and model paths pointed at test data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wantrain.commands.check import check
from wantrain.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p for p in (ROOT / "profiles").glob("*.toml"))


def test_the_recipes_exist():
    names = {p.stem for p in PROFILES}
    for kind in ("char", "style", "motion"):
        for tier in ("24gb", "48gb", "h100"):
            assert f"{kind}_{tier}" in names
    assert "demo_cpu" in names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_opens_with_how_to_run_it(path):
    head = path.read_text().split("\n[", 1)[0]
    assert head.startswith("#"), "a profile opens with a comment"
    assert f"wantrain run profiles/{path.name}" in head or "make demo" in head


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_passes_check(path, tiny_model, demo_data, tmp_path):
    raw = load_profile(path)
    overrides = [f'model.name_or_path="{tiny_model}"', f'job.output_dir="{tmp_path}"']
    if raw.job.trigger_word is None:  # the demo captions use [trigger]
        overrides.append('job.trigger_word="sks"')
    overrides += [f'datasets[{i}].folder="{demo_data}"' for i in range(len(raw.datasets))]
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
