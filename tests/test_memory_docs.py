"""docs/memory.md's memory figures come from ``wantrain estimate``: the tier
table (one row per shipped character recipe) and the 24 GB report are
generated regions of the page, and this test fails when they are stale.

Regenerate them after changing the estimate or a recipe:

    .venv/bin/python tests/test_memory_docs.py
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "memory.md"
#: (tier, recipe) rows of the table
TIERS = (("24 GB (4090, 5090, A6000-class)", "char_24gb.toml"), ("48 GB (A6000 Ada, L40S)", "char_48gb.toml"),
         ("80 GB (H100)", "char_h100.toml"))
REPORT = ("char_24gb.toml", 24)
REGION = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def estimate_output(recipe: str, vram: float | None = None) -> str:
    """What ``wantrain estimate profiles/<recipe> [--vram-gb N]`` prints."""
    from wantrain.commands.cli import main

    argv = ["estimate", str(ROOT / "profiles" / recipe)] + (["--vram-gb", f"{vram:g}"] if vram else [])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _peak(text: str) -> tuple[float, float, str]:
    m = re.search(r"^peak \((\w+)\)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    return float(m.group(2)), float(m.group(3)), m.group(1)


def tier_table() -> str:
    from wantrain.profile import load_profile

    lines = ["| tier | recipe | `[plugins.quantize]` | `[plugins.offload]` | video | estimated peak GPU | host RAM |",
             "|---|---|---|---|---|---|---|"]
    for tier, recipe in TIERS:
        profile = load_profile(ROOT / "profiles" / recipe)
        configs = profile.plugins.configs
        q = configs.get("quantize")
        quant = f'`transformer = "{q.transformer}"`, `text_encoder = "{q.text_encoder}"`' if q else "off (bf16)"
        if q is not None and q.uses_ara:
            quant += f', `ara = "{q.ara}"`'
        o = configs.get("offload")
        off = f"`experts = {str(o.experts).lower()}`, `layers = {o.layers:g}`" if o else "off"
        ds = profile.datasets[0]
        gpu, host, phase = _peak(estimate_output(recipe))
        phase = "" if phase == "training" else f" ({phase} phase)"
        lines.append(f"| {tier} | `profiles/{recipe}` | {quant} | {off} | {max(ds.resolutions)} px, {ds.num_frames} frames "
                     f"| {gpu:.1f} GiB{phase} | {host:.1f} GiB |")
    return "\n".join(lines) + "\n"


def report_block() -> str:
    recipe, vram = REPORT
    text = estimate_output(recipe, vram).rstrip("\n")
    return f"```\n$ wantrain estimate profiles/{recipe} --vram-gb {vram}\n{text}\n```\n"


def generated() -> dict[str, str]:
    return {"tiers": tier_table(), "estimate_24gb": report_block()}


def regenerate(text: str, parts: dict[str, str]) -> str:
    return REGION.sub(lambda m: m.group(1) + parts.get(m.group(2), m.group(3)) + m.group(4), text)


def test_memory_tables_are_generated_from_wantrain_estimate():
    text = PAGE.read_text()
    found = {m.group(2): m.group(3) for m in REGION.finditer(text)}
    assert set(found) == {"tiers", "estimate_24gb"}, found.keys()
    for name, want in generated().items():
        assert found[name] == want, f"docs/memory.md: the {name} table is stale; run .venv/bin/python tests/test_memory_docs.py"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    PAGE.write_text(regenerate(PAGE.read_text(), generated()))
    print(f"regenerated the memory tables in {PAGE.relative_to(ROOT)}")
