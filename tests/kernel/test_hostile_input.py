"""Issue 11 items 6-8: user mistakes and hostile files end in one ``error:``
line (exit 2), never a traceback or a hang; messages say what is true."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from wantrain.commands.cli import main as cli
from wantrain.errors import WantrainError
from wantrain.formats import lora as lora_format
from wantrain.formats import safetensors as st
from wantrain.formats import snapshot
from wantrain.profile import load_profile

A, B = torch.randn(4, 8), torch.zeros(8, 4)
COMFY = "diffusion_model.blocks.0.self_attn.q"
DIFF = "transformer.blocks.0.attn1.to_q"


def one_error_line(capsys, argv) -> str:
    """Run the CLI; assert exit 2 and exactly one error line, no traceback; return it."""
    rc = cli(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, (rc, err)
    return errors[0]


def write_profile(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "p.toml"
    path.write_text(tomli_w.dumps(data))
    return str(path)


# ---------------------------------------------------------------- item 6: LoRA files

BAD_FILES = {
    "two-element alpha": ({f"{COMFY}.lora_A.weight": A, f"{COMFY}.lora_B.weight": B, f"{COMFY}.alpha": torch.tensor([1.0, 2.0])}, {}),
    "rank 0": ({f"{COMFY}.lora_A.weight": torch.zeros(0, 8), f"{COMFY}.lora_B.weight": torch.zeros(8, 0)}, {}),
    "0-d tensors": ({f"{COMFY}.lora_A.weight": torch.tensor(1.0), f"{COMFY}.lora_B.weight": torch.tensor(2.0)}, {}),
    "mismatched rank": ({f"{COMFY}.lora_A.weight": A, f"{COMFY}.lora_B.weight": torch.zeros(8, 3)}, {}),
    "invalid adapter metadata JSON": ({f"{DIFF}.lora_A.weight": A, f"{DIFF}.lora_B.weight": B}, {"lora_adapter_metadata": "{not json"}),
    "adapter metadata not a table": ({f"{DIFF}.lora_A.weight": A, f"{DIFF}.lora_B.weight": B}, {"lora_adapter_metadata": "[1, 2]"}),
    "alpha_pattern not a table": ({f"{DIFF}.lora_A.weight": A, f"{DIFF}.lora_B.weight": B},
                                  {"lora_adapter_metadata": json.dumps({"alpha_pattern": [1]})}),
    "lora_alpha not a number": ({f"{DIFF}.lora_A.weight": A, f"{DIFF}.lora_B.weight": B},
                                {"lora_adapter_metadata": json.dumps({"lora_alpha": "x"})}),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_lora_file_is_one_line_in_lora_info_export_and_init_from(case, tmp_path, capsys):
    tensors, meta = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    st.write_atomic(tensors, path, meta)
    one_error_line(capsys, ["lora-info", str(path)])
    one_error_line(capsys, ["export", str(path), "--format", "comfyui", "-o", str(tmp_path / "o.safetensors")])
    with pytest.raises(WantrainError):  # init_from and `sample --lora` read through this
        lora_format.read_lora_sources(path, ["high_noise", "low_noise"], where="target.init_from")


def test_invalid_adapter_config_json_is_one_line(tmp_path, capsys):
    st.write_atomic({f"{COMFY}.lora_A.weight": A, f"{COMFY}.lora_B.weight": B}, tmp_path / "adapter_model.safetensors", {})
    (tmp_path / "adapter_config.json").write_text("{bad")
    line = one_error_line(capsys, ["lora-info", str(tmp_path / "adapter_model.safetensors")])
    assert "adapter_config.json" in line


def test_sample_lora_on_a_non_lora_file_is_one_line(tmp_path):
    from wantrain.plugins.sample.render import lora_paths

    (tmp_path / "notes.safetensors").write_text("hello")
    st.write_atomic({"x": A}, tmp_path / "other.safetensors", {})
    (tmp_path / "folder").mkdir()
    for bad in ("notes.safetensors", "other.safetensors", "folder"):
        with pytest.raises(WantrainError) as info:
            lora_paths(str(tmp_path / bad))
        assert len(info.value.lines()) == 1


# ---------------------------------------------------------------- item 7: hostile files


def test_catastrophic_alpha_pattern_does_not_hang(tmp_path, capsys):
    # each takes hours against "blocks.0.attn1.to_q" with re.fullmatch (exponential backtracking)
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": 4, "alpha_pattern": {"((.+)+)+X": 2, r"(.|\w|\W)*(.|\w|\W)*X": 3}})}
    name = "blocks.0.attn1.to_q"
    st.write_atomic({f"{DIFF}.lora_A.weight": A, f"{DIFF}.lora_B.weight": B}, tmp_path / "evil.safetensors", meta)
    t0 = time.perf_counter()
    assert lora_format._alpha_for(name, json.loads(meta["lora_adapter_metadata"]), 4) == 4.0
    assert cli(["lora-info", str(tmp_path / "evil.safetensors")]) == 0
    assert time.perf_counter() - t0 < 5


def test_alpha_pattern_matches_module_name_suffixes():
    config = {"lora_alpha": 4, "alpha_pattern": {"attn1.to_q": 2, "blocks.1.attn1.to_k": 3}}
    assert lora_format._alpha_for("blocks.0.attn1.to_q", config, 4) == 2.0
    assert lora_format._alpha_for("blocks.1.attn1.to_k", config, 4) == 3.0
    assert lora_format._alpha_for("blocks.11.attn1.to_k", config, 4) == 4.0  # not a suffix at a dot
    assert lora_format._alpha_for("blocks.2.self_attn.q", {"alpha_pattern": {"self_attn.q": 8}}, 4) == 8.0


def test_lora_info_escapes_terminal_control_codes(tmp_path, capsys):
    meta = {"evil\x1b[2J": "x\x1b]0;pwned\x07\ny\rz\x9b"}
    st.write_atomic({f"{COMFY}.lora_A.weight": A, f"{COMFY}.lora_B.weight": B, f"{COMFY}.alpha": torch.tensor(4.0)},
                    tmp_path / "esc\x1b[31m.safetensors", meta)
    assert cli(["lora-info", str(tmp_path / "esc\x1b[31m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\x9b")
    assert "\\x1b[2J" in out and "\\n" in out  # shown, escaped, on the metadata line
    assert all(line.strip() for line in out.splitlines())


def test_docs_say_py_plugins_run_as_the_users_code():
    root = Path(__file__).resolve().parents[2]
    text = " ".join(((root / "docs" / "hooks.md").read_text() + (root / "docs" / "profiles.md").read_text()).split())
    assert "on every command that reads the profile" in text


# ---------------------------------------------------------------- item 6: profiles and plugins


def test_set_with_an_index_into_a_table_is_one_line(profile_data, tmp_path, capsys):
    path = write_profile(tmp_path, profile_data)
    line = one_error_line(capsys, ["check", path, "--set", "training[0].steps=3"])
    assert "training" in line
    one_error_line(capsys, ["check", path, "--set", "datasets.folder=3"])
    one_error_line(capsys, ["check", path, "--set", "datasets[5].folder='x'"])


def test_lr_nan_is_one_line(profile_data, tmp_path, capsys):
    path = write_profile(tmp_path, profile_data)
    assert "training.lr" in one_error_line(capsys, ["check", path, "--set", "training.lr=nan"])


PLUGIN_FILES = {
    "syntax error": "def oops(:\n",
    "import error": "import no_such_module_for_wantrain_tests\n",
    "raises at import": "raise RuntimeError('boom')\n",
    "hookimpl with an extra argument": (
        "from wantrain import hookimpl\n\n\nclass Plugin:\n    @hookimpl\n    def on_step(self, run, step, extra_arg):\n        pass\n"),
}


@pytest.mark.parametrize("case", sorted(PLUGIN_FILES))
def test_broken_plugin_file_is_one_line(case, profile_data, tmp_path, capsys):
    (tmp_path / "mine.py").write_text(PLUGIN_FILES[case])
    profile_data["plugins"] = {"enabled": ["mine.py"]}
    line = one_error_line(capsys, ["check", write_profile(tmp_path, profile_data)])
    assert 'plugins."mine.py"' in line or "mine.py" in line


def test_output_dir_that_is_a_file_is_one_line(profile_data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    profile_data["job"]["output_dir"] = str(tmp_path / "a_file")
    path = write_profile(tmp_path, profile_data)
    assert "job.output_dir" in one_error_line(capsys, ["check", path])
    assert "job.output_dir" in one_error_line(capsys, ["run", path])


def test_rank_wider_than_the_model_is_refused_by_check(profile_data, tmp_path, capsys):
    profile_data["target"]["rank"] = 129  # the tiny model's layers are 128 wide
    line = one_error_line(capsys, ["check", write_profile(tmp_path, profile_data)])
    assert "target.rank" in line and "128" in line
    profile_data["target"]["rank"] = 128
    assert cli(["check", write_profile(tmp_path, profile_data)]) == 0


def test_rank_wider_than_the_layers_is_refused_at_load(tiny_model):
    from wantrain import lora, model

    module = model.load_expert(model.ModelSource(str(tiny_model)), "high_noise", torch.float32)
    with pytest.raises(WantrainError) as info:
        lora.attach_lora(module, 129, 129.0, ["attn1.to_q", "ffn.net.0.proj"], seed=0)
    assert "target.rank" in info.value.lines()[0] and "128" in info.value.lines()[0]


# ---------------------------------------------------------------- item 8: messages that mislead


def _plugin_lines(profile_data, plugins) -> list[str]:
    profile_data["plugins"] = plugins
    with pytest.raises(WantrainError) as info:
        load_profile(data=profile_data)
    return info.value.lines()


def test_plugin_typo_hint_points_the_right_way(profile_data):
    # the table is right, the enabled name is the typo: do not suggest renaming the table to the typo
    lines = _plugin_lines(profile_data, {"enabled": ["checkpoint"], "checkpoints": {"every": 2}})
    assert not any("[plugins.checkpoint]" in line for line in lines), lines
    table = [line for line in lines if line.startswith("error: plugins.checkpoints:")]
    assert table and "'checkpoint'" in table[0] and "plugins.enabled" in table[0], lines
    # the enabled name is right, the table is the typo: rename the table
    lines = _plugin_lines(profile_data, {"enabled": ["checkpoints"], "checkpoint": {"every": 2}})
    assert any("did you mean [plugins.checkpoints]?" in line for line in lines), lines


def test_file_plugin_table_names_are_quoted(profile_data, tmp_path):
    (tmp_path / "my_cfg.py").write_text("X = 1\n")
    profile_data["job"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "p.toml"
    profile_data["plugins"] = {"enabled": ["my_cfg.py"], "my_cfg.pyy": {"a": 1}, "other.py": {"a": 1}}
    path.write_text(tomli_w.dumps(profile_data))
    with pytest.raises(WantrainError) as info:
        load_profile(path)
    text = "\n".join(info.value.lines())
    assert '[plugins."my_cfg.py"]' in text and 'plugins."my_cfg.pyy"' in text and 'plugins."other.py"' in text, text
    assert "[plugins.my_cfg.py]" not in text


def test_lora_info_on_a_folder_speaks_of_its_argument(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = one_error_line(capsys, ["lora-info", str(tmp_path / "empty")])
    assert "--resume" not in line and "init_from" not in line, line
    assert line.startswith("error: lora-info")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.json").write_text("{")
    line = one_error_line(capsys, ["lora-info", str(tmp_path / "bad")])
    assert "--resume" not in line, line
    doc = {"format": "wantrain.resume", "version": 1, "step": "abc", "name": "t", "experts": ["high_noise"],
           "profile": {}, "tree": {}}
    (tmp_path / "bad" / "state.json").write_text(json.dumps(doc))
    line = one_error_line(capsys, ["lora-info", str(tmp_path / "bad")])
    assert "--resume" not in line and "'step'" in line, line


def test_estimate_refuses_a_missing_local_path(profile_data, tmp_path, capsys):
    profile_data["model"]["name_or_path"] = str(tmp_path / "no_such_model")
    line = one_error_line(capsys, ["estimate", write_profile(tmp_path, profile_data)])
    assert "model.name_or_path" in line
    from wantrain.commands.estimate import configs_for

    assert "built-in" in configs_for("Wan-AI/Wan2.2-T2V-A14B-Diffusers")[3]  # a hub id still uses the shipped config
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(WantrainError):  # an existing folder without a transformer config
        configs_for(str(tmp_path / "empty_model"))
    for local in ("./models/wan", "../wan", "~/no_such_wan_folder", "/opt/wan", "models/wan/2.2"):
        with pytest.raises(WantrainError):
            configs_for(local if not local.startswith("/") else str(tmp_path / "nope"))


def test_unreadable_caption_is_blamed_on_the_caption_file(tmp_path, monkeypatch):
    from wantrain.data.captions import read_caption
    from wantrain.data.media import MediaError
    from wantrain.profile import DatasetConfig

    (tmp_path / "clip.png").write_bytes(b"")
    (tmp_path / "clip.txt").write_text("a caption")
    real = Path.read_bytes

    def denied(self):
        if self.suffix == ".txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    cfg = DatasetConfig(folder=str(tmp_path))
    with pytest.raises(MediaError) as info:
        read_caption(tmp_path / "clip.png", cfg)
    assert "clip.txt" in str(info.value) and "Permission denied" in str(info.value)


def test_loss_summary_of_short_runs_does_not_repeat_one_number():
    from wantrain.loop import loss_summary

    assert loss_summary([4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]) == "loss: first 2 steps avg 3.5000 -> last 2 steps avg 1.5000"
    assert loss_summary([2.0], [2.0]) == "loss: 2.0000 (1 step)"
    losses = [float(i) for i in range(300)]
    assert loss_summary(losses[:100], losses[-50:]) == "loss: first 50 steps avg 24.5000 -> last 50 steps avg 274.5000"
    assert loss_summary(losses[:99], losses[49:99]) == "loss: first 49 steps avg 24.0000 -> last 50 steps avg 73.5000"


def test_docs_agree_with_resume_on_a_changed_dataset():
    root = Path(__file__).resolve().parents[2]
    data_md, ckpt_md = (root / "docs" / "data.md").read_text(), (root / "docs" / "checkpoints.md").read_text()
    assert "datasets" in snapshot.BREAKING  # a changed [[datasets]] setting is refused ...
    assert "A changed dataset or seed\n  still resumes" not in data_md  # ... which data.md used to deny
    for text in (data_md, ckpt_md):
        text = " ".join(text.split())
        assert "is refused" in text and "files in a dataset's folder" in text
