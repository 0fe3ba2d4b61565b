"""Issue 11 item 5: a damaged newest checkpoint does not block resuming. It
is checked before it is chosen (state.json fields typed, the safetensors files
open and hold what the state refers to) and skipped with a warning naming
what is wrong; ``--resume PATH`` to a damaged one is one error line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import tomli_w

from wantrain import resume
from wantrain.commands.cli import main as cli
from wantrain.errors import WantrainError
from wantrain.formats import safetensors as st
from wantrain.loop import train
from wantrain.profile import load_profile


@pytest.fixture(scope="module")
def trained(tiny_model, demo_data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    from tests.conftest import BASE_PROFILE  # noqa: PLC0415 - the shared base profile
    import copy

    data = copy.deepcopy(BASE_PROFILE)
    root = tmp_path_factory.mktemp("damaged")
    data["job"]["output_dir"] = str(root / "out")
    data["model"]["name_or_path"] = str(tiny_model)
    data["datasets"][0]["folder"] = str(demo_data)
    data["plugins"] = {"enabled": ["checkpoints"], "checkpoints": {"every": 2}}
    train(load_profile(data=data))
    return data, root / "out"


@pytest.fixture
def out(trained, tmp_path):
    data, src = trained
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    data = json.loads(json.dumps(data))
    data["job"]["output_dir"] = str(dst)
    (tmp_path / "p.toml").write_text(tomli_w.dumps(data))
    return dst


def newest(out: Path) -> Path:
    return resume.checkpoint_dir(out, 4)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_state(folder: Path, **changes) -> None:
    doc = json.loads((folder / "state.json").read_text())
    doc.update(changes)
    (folder / "state.json").write_text(json.dumps(doc))


def damage_tensor_ref(folder: Path) -> None:
    tensors, meta = st.read(folder / "tensors.safetensors")
    tensors.pop(sorted(tensors)[0])
    st.write_atomic(tensors, folder / "tensors.safetensors", meta)


def damage_expert(folder: Path) -> None:
    tensors, meta = st.read(folder / "lora.safetensors")
    st.write_atomic({k: v for k, v in tensors.items() if not k.startswith("low_noise.")}, folder / "lora.safetensors", meta)


DAMAGES = {
    "truncated tensors": (lambda f: truncate(f / "tensors.safetensors"), "tensors.safetensors"),
    "truncated lora": (lambda f: truncate(f / "lora.safetensors"), "lora.safetensors"),
    "step not a number": (lambda f: edit_state(f, step="abc"), "step"),
    "experts not a list": (lambda f: edit_state(f, experts="high_noise"), "experts"),
    "profile not a table": (lambda f: edit_state(f, profile=[1]), "profile"),
    "tree missing": (lambda f: edit_state(f, tree=None), "tree"),
    "missing tensor": (damage_tensor_ref, "tensors.safetensors"),
    "missing expert": (damage_expert, "low_noise"),
    "tensors file deleted": (lambda f: (f / "tensors.safetensors").unlink(), "tensors.safetensors"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_falls_back_to_previous(out, damage, caplog):
    do, named = DAMAGES[damage]
    do(newest(out))
    with caplog.at_level(logging.WARNING, logger="wantrain"):
        ckpt = resume.newest_checkpoint(out)
    assert ckpt is not None and ckpt.step == 2
    warned = [r.getMessage() for r in caplog.records if "step_000000004" in r.getMessage()]
    assert warned and named in warned[0], warned


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_explicit_resume_of_damaged_checkpoint_is_one_line(out, damage, capsys):
    do, named = DAMAGES[damage]
    do(newest(out))
    with pytest.raises(WantrainError) as info:
        resume.read_checkpoint(newest(out))
    assert len(info.value.lines()) == 1 and named in info.value.lines()[0]
    rc = cli(["run", str(out.parent / "p.toml"), "--resume", str(newest(out))])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == info.value.lines()


def test_intact_checkpoint_still_chosen(out):
    assert resume.newest_checkpoint(out).step == 4
