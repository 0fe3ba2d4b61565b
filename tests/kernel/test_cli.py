"""The command line's own behaviour: ``--version``, ``wantrain`` alone, and
third-party log noise kept from the user while real warnings stay."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from wantrain import __version__
from wantrain.commands.cli import build_parser, main, setup_logging


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"wantrain {__version__}"


def test_no_command_lists_every_command_with_one_line_each(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line for line in out if line.startswith("  ")}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(listed) == set(sub.choices)  # kernel and plugin commands (sample, import)
    assert {"run", "check", "estimate", "sample", "import"} <= set(listed)
    assert all(len(line.split(None, 1)) == 2 for line in listed.values())  # each has its help text


def test_bitsandbytes_kernels_notice_is_silenced_but_real_warnings_stay(caplog):
    setup_logging(False)
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
                      "Please make sure you already `pip install kernels` and the kernels >= 0.11.1")
        noisy.warning("a real problem")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == ["a real problem"]


def test_real_cli_shows_no_kernels_notice(tmp_path):
    """Importing bitsandbytes through a command prints no notice about `kernels`."""
    code = ("import sys; from wantrain.commands.cli import setup_logging; setup_logging(False); "
            "import bitsandbytes")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stderr
