"""Every event is documented for plugin authors and exercised by a test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import wantrain.hookspecs as specs

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted(n for n in dir(specs) if hasattr(getattr(specs, n), "wantrain_spec"))


def test_the_users_event_names_exist():
    assert {"on_step", "before_expert_switch", "on_save"} <= set(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_spec_has_docstring_with_contract(name):
    doc = inspect.getdoc(getattr(specs, name)) or ""
    assert "Fires" in doc or "fires" in doc.lower(), f"{name}: say when it fires"
    assert ":return:" in doc, f"{name}: say what to return"
    firstresult = getattr(specs, name).wantrain_spec.get("firstresult", False)
    assert ("*first result*" in doc) == firstresult, f"{name}: the docstring's return contract must match firstresult"


@pytest.mark.parametrize("name", SPECS)
def test_spec_is_in_the_docs(name):
    text = (ROOT / "docs" / "hooks.md").read_text()
    assert f"### `{name}`" in text, f"docs/hooks.md has no section for {name}"


@pytest.mark.parametrize("name", SPECS)
def test_spec_has_a_test(name):
    here = Path(__file__).resolve()
    for path in (ROOT / "tests").rglob("test_*.py"):
        if path.resolve() != here and name in path.read_text():
            return
    pytest.fail(f"no test mentions the event {name}")
