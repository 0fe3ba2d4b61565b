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


# ---------------------------------------------------------------- the reference page


def reference_sections() -> dict[str, str]:
    """``docs/hooks.md``'s section of every event, rendered from the spec:
    signature, kind, docstring -- so the page cannot drift from the code.
    (``python tests/kernel/test_hookspecs.py`` prints the whole list.)"""
    out = {}
    for name in spec_order():
        fn = getattr(specs, name)
        opts = fn.wantrain_spec
        kind = "first result" if opts.get("firstresult") else ("collected" if "*collected" in (fn.__doc__ or "") else "notify")
        out[name] = f"### `{name}`\n\n```python\n{signature(name)}\n```\n\nKind: **{kind}**.\n\n{inspect.getdoc(fn)}\n"
    return out


def signature(name: str) -> str:
    """``name(args) -> result`` as written in hookspecs.py (one line)."""
    lines = Path(specs.__file__).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":"))
    return " ".join(line.strip() for line in lines[start:end + 1])[4:-1]


def spec_order() -> list[str]:
    """The events in the order (and phases) of ``hookspecs.py``."""
    source = Path(specs.__file__).read_text()
    return [line[4:].split("(")[0] for line in source.splitlines() if line.startswith("def ") and line[4:].split("(")[0] in SPECS]


def phases() -> list[tuple[str, list[str]]]:
    source = Path(specs.__file__).read_text().splitlines()
    out: list[tuple[str, list[str]]] = []
    for line in source:
        if line.startswith("# ----") and line.strip("# -"):
            out.append((line.strip("# -"), []))
        elif line.startswith("def ") and out:
            out[-1][1].append(line[4:].split("(")[0])
    return out


@pytest.mark.parametrize("name", SPECS)
def test_reference_section_matches_the_spec(name):
    text = (ROOT / "docs" / "hooks.md").read_text()
    assert reference_sections()[name] in text, f"docs/hooks.md: regenerate the section of {name} (python {Path(__file__).relative_to(ROOT)})"


if __name__ == "__main__":  # pragma: no cover - prints the "Every event" part of docs/hooks.md
    sections = reference_sections()
    for phase, names in phases():
        print(f"## Events: {phase}\n")
        for n in names:
            print(sections[n])
