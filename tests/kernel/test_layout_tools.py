"""Which tool loads which layout: ``lora-info`` names them, ``export --help``
says which ``--format`` is for which tool."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from wantrain.commands import export
from wantrain.formats import lora as lora_format


def _ours(tmp_path):
    """A small file in our layout (two blocks, rank 2, alpha 4)."""
    tensors = {}
    for i in range(2):
        base = f"diffusion_model.blocks.{i}.self_attn.q"
        tensors[f"{base}.lora_A.weight"] = torch.randn(2, 8)
        tensors[f"{base}.lora_B.weight"] = torch.randn(8, 2)
        tensors[f"{base}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "x_high_noise.safetensors"
    save_file(tensors, str(path))
    return path


def test_lora_info_names_the_tools_that_load_each_layout(tmp_path):
    ours = _ours(tmp_path)
    assert "loads in: ComfyUI, diffusers" in lora_format.describe(ours)
    out = tmp_path / "d_high_noise.safetensors"
    export.export(str(ours), "diffusers", str(out))
    assert "loads in: diffusers (not ComfyUI's loader; export --format comfyui for ComfyUI)" in lora_format.describe(out)


def test_export_help_says_which_format_is_for_which_tool():
    proc = subprocess.run([sys.executable, "-m", "wantrain", "export", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "comfyui: ComfyUI and diffusers" in text and "diffusers: diffusers/PEFT only, not ComfyUI" in text
