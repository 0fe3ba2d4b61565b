"""latent_cache (issue 11 items 6 and 8): a moved project reuses its cache
(nothing in the key depends on where the model or the data live), and a cache
that cannot be written (read-only folder, full disk) is one error line."""

from __future__ import annotations

import errno
import shutil
from types import SimpleNamespace

import pytest
import torch

from wantrain.errors import WantrainError
from wantrain.plugins import latent_cache as lc


def fake_run(model_path):
    vae = SimpleNamespace(config={"z_dim": 16})
    return SimpleNamespace(vae=vae, profile=SimpleNamespace(model=SimpleNamespace(name_or_path=str(model_path))))


def test_identity_does_not_depend_on_where_the_model_lives(tiny_model, tmp_path):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model, moved)
    assert lc.vae_identity(fake_run(tiny_model)) == lc.vae_identity(fake_run(moved))
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    weights = next(p for p in (other / "vae").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # other VAE weights: another identity
    assert lc.vae_identity(fake_run(other)) != lc.vae_identity(fake_run(tiny_model))
    assert lc.vae_identity(fake_run("org/hub-model")) != lc.vae_identity(fake_run("org/other"))


def test_entries_of_an_older_format_are_removed(tmp_path):
    from wantrain.formats.safetensors import write_atomic

    store = lc.LatentStore(tmp_path, "id")
    write_atomic({"latents": torch.zeros(1)}, tmp_path / "old.safetensors", {"format": "wantrain-latents-1", "source": "x"})
    write_atomic({"latents": torch.zeros(1)}, tmp_path / "foreign.safetensors", {"format": "something-else"})
    assert store.prune_stale({}) == 1
    assert not (tmp_path / "old.safetensors").exists() and (tmp_path / "foreign.safetensors").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, "refused")

    monkeypatch.setattr(lc, "write_atomic", refuse)
    store = lc.LatentStore(tmp_path / "cache", "id")
    with pytest.raises(WantrainError) as info:
        store.put("key", torch.zeros(16, 1, 4, 4), "clip.mp4", "hash")
    (line,) = info.value.lines()
    assert str(tmp_path / "cache") in line and "plugins.latent_cache.folder" in line


def test_a_stale_entry_that_cannot_be_deleted_is_one_line(tmp_path, monkeypatch):
    from wantrain.formats.safetensors import write_atomic

    write_atomic({"latents": torch.zeros(1)}, tmp_path / "old.safetensors", {"format": "wantrain-latents-1"})

    def refuse(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(lc.Path, "unlink", refuse)
    with pytest.raises(WantrainError) as info:
        lc.LatentStore(tmp_path, "id").prune_stale({})
    assert "permission denied" in info.value.lines()[0]
