"""latent_cache: each sample variant encoded once, keyed by content and every
latent-changing setting, stale entries rebuilt, cached latents equal to the
VAE's, the VAE off the device afterwards."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest_data import make_profile, write_clip
from PIL import Image

from wantrain import data as wdata
from wantrain.data import build_train_data
from wantrain.data.demo import moving_shapes
from wantrain.plugins import latent_cache as lc
from wantrain.profile import DatasetConfig


def ds(folder, **kw) -> DatasetConfig:
    kw.setdefault("resolutions", (32,))
    kw.setdefault("num_frames", 9)
    kw.setdefault("cache_latents", True)
    return DatasetConfig(folder=str(folder), **kw)


class CountingEncoder:
    """A stand-in VAE: deterministic latents of the right shape, calls counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pixels):
        self.calls += 1
        b, _, f, h, w = pixels.shape
        pooled = torch.nn.functional.avg_pool3d(pixels, (1, 8, 8))[:, :1]
        return pooled.expand(b, 16, f, h // 8, w // 8)[:, :, ::4].clone()


@pytest.fixture
def clips(tmp_path, demo_data):
    folder = tmp_path / "clips"
    shutil.copytree(demo_data, folder)
    return folder


def fill_once(td, folder=None, identity="vae-a"):
    stores = {d.index: lc.LatentStore(folder or lc.Path(d.folder) / lc.CACHE_DIR, identity) for d in td.datasets}
    encoder = CountingEncoder()
    stats = lc.fill(stores, td.iter_items(), td.load, encoder, wdata.file_hash)
    return stores, stats, encoder


def test_each_variant_is_encoded_once_then_reused(clips):
    td = build_train_data(make_profile(ds(clips, flip_x=True, frame_sampling="fps")), seed=0)
    variants = list(td.iter_items())
    _, stats, encoder = fill_once(td)
    assert stats.encoded == encoder.calls == len(variants) > 7
    files = list((clips / lc.CACHE_DIR).glob("*.safetensors"))
    assert len(files) == len(variants)
    _, again, encoder2 = fill_once(build_train_data(make_profile(ds(clips, flip_x=True, frame_sampling="fps")), seed=1))
    assert (again.reused, again.encoded, encoder2.calls) == (len(variants), 0, 0)


def test_other_settings_and_other_vae_get_their_own_entries(clips):
    fill_once(build_train_data(make_profile(ds(clips, num_frames=9)), seed=0))
    _, stats, _ = fill_once(build_train_data(make_profile(ds(clips, num_frames=17)), seed=0))
    assert stats.reused == 3 and stats.encoded == 4  # images are one-frame samples either way
    _, stats, _ = fill_once(build_train_data(make_profile(ds(clips, num_frames=9)), seed=0), identity="vae-b")
    assert stats.reused == 0 and stats.encoded == 7
    _, stats, _ = fill_once(build_train_data(make_profile(ds(clips, num_frames=9)), seed=0))
    assert stats.reused == 7  # nothing was deleted by the other runs


def test_a_changed_file_is_stale_and_rebuilt(clips):
    td = build_train_data(make_profile(ds(clips)), seed=0)
    stores, _, _ = fill_once(td)
    write_clip(clips / "clip_01.mp4", num_frames=33, width=64, height=64, seed=99)  # same name, new content
    td = build_train_data(make_profile(ds(clips)), seed=0)
    current = {item.path: wdata.file_hash(item.path) for item in td.datasets[0].items}
    assert stores[0].prune_stale(current) == 1
    _, stats, _ = fill_once(td)
    assert (stats.reused, stats.encoded) == (6, 1)
    assert len(list((clips / lc.CACHE_DIR).glob("*.safetensors"))) == 7


def test_a_damaged_entry_is_rebuilt(clips):
    td = build_train_data(make_profile(ds(clips)), seed=0)
    stores, _, _ = fill_once(td)
    spec = next(iter(td.iter_items()))
    path = stores[0].path(spec.cache_key())
    path.write_bytes(b"not safetensors")
    assert stores[0].get(spec.cache_key()) is None and not path.exists()
    _, stats, _ = fill_once(td)
    assert (stats.reused, stats.encoded) == (6, 1)


def test_bf16_entries_and_folder_override(clips, tmp_path):
    td = build_train_data(make_profile(ds(clips)), seed=0)
    store = lc.LatentStore(tmp_path / "shared", "v", torch.bfloat16)
    spec = next(iter(td.iter_items()))
    latents = torch.randn(16, 3, 4, 4)
    store.put(spec.cache_key(), latents, spec.path, wdata.file_hash(spec.path))
    got = store.get(spec.cache_key())
    assert got.dtype == torch.float32 and torch.equal(got, latents.to(torch.bfloat16).float())
    stores = lc.make_stores(lc.Config(folder=str(tmp_path / "shared")), make_profile(ds(clips)), td, "v")
    assert stores[0].folder == tmp_path / "shared"


def test_enabled_without_cached_dataset_is_a_profile_problem(clips):
    plugin = lc.Plugin(lc.Config())
    (problem,) = plugin.check_profile(make_profile(ds(clips, cache_latents=False)))
    assert problem.line().startswith("error: plugins.latent_cache: is enabled but no dataset sets cache_latents = true")
    assert plugin.check_profile(make_profile(ds(clips))) == []


# ---------------------------------------------------------------- with the tiny Wan VAE


@pytest.fixture
def small(tmp_path):
    """Two 32x32 clips and a 32x32 image: few VAE input shapes, fast encodes."""
    folder = tmp_path / "small"
    folder.mkdir()
    for i in range(2):
        write_clip(folder / f"c{i}.mp4", num_frames=20, width=32, height=32, seed=i)
    Image.fromarray(moving_shapes(1, 32, 32, seed=7)[0]).save(folder / "s.png")
    return folder


@pytest.fixture(scope="module")
def tiny_vae(tiny_model):
    from wantrain import model

    source, _ = model.load_model_index(str(tiny_model))
    return model.load_vae(source).eval()


def fake_run(profile, td, vae, tmp_path, model_path):
    profile = copy.copy(profile)
    object.__setattr__(profile, "model", SimpleNamespace(name_or_path=str(model_path)))
    import pluggy

    from wantrain import PROJECT, hookspecs

    pm = pluggy.PluginManager(PROJECT)  # the events, no other plugin (on_progress goes nowhere)
    pm.add_hookspecs(hookspecs)
    from wantrain import archs

    return SimpleNamespace(profile=profile, data=td, vae=vae, device=torch.device("cpu"), dtype=torch.float32,
                           output_dir=tmp_path, pm=pm, arch=archs.get(archs.DEFAULT))


def test_cached_latents_equal_the_vae_and_pixels_are_skipped(small, tmp_path, tiny_vae, tiny_model):
    from wantrain import model

    profile = make_profile(ds(small, num_frames=5), plugins=("latent_cache",))
    td = build_train_data(profile, seed=3)
    run = fake_run(profile, td, tiny_vae, tmp_path, tiny_model)
    plugin = lc.Plugin(lc.Config())
    plugin.on_run_start(run)
    reference = build_train_data(profile, seed=3)
    for _ in range(4):
        batch, expected = td.next_batch(1), reference.next_batch(1)
        assert batch.pixels is None and batch.cache_keys == expected.cache_keys
        latents = plugin.encode_videos(run, batch)
        assert torch.equal(latents, model.encode_pixels(tiny_vae, expected.pixels))
    assert next(tiny_vae.parameters()).device.type == "cpu"


def test_uncached_dataset_is_left_to_the_kernel(small, tmp_path, tiny_vae, tiny_model):
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(moving_shapes(1, 32, 32, seed=1)[0]).save(other / "x.png")
    profile = make_profile(ds(small, num_frames=5), ds(other, cache_latents=False, weight=10.0), plugins=("latent_cache",))
    td = build_train_data(profile, seed=0)
    run = fake_run(profile, td, tiny_vae, tmp_path, tiny_model)
    plugin = lc.Plugin(lc.Config())
    plugin.on_run_start(run)
    got = [td.next_batch(1) for _ in range(12)]
    uncached = [b for b in got if b.dataset_index == [1]]
    assert uncached and all(b.pixels is not None and plugin.encode_videos(run, b) is None for b in uncached)
    assert all(b.pixels is None for b in got if b.dataset_index == [0])


def test_a_file_that_fails_to_encode_is_excluded(small, tmp_path, tiny_vae, tiny_model):
    Image.fromarray(moving_shapes(1, 32, 32, seed=4)[0]).save(small / "cut.jpg")
    data = (small / "cut.jpg").read_bytes()
    (small / "cut.jpg").write_bytes(data[: len(data) * 9 // 10])  # the header is fine: the scan keeps it
    profile = make_profile(ds(small, num_frames=5), plugins=("latent_cache",))
    td = build_train_data(profile, seed=0)
    assert td.report.datasets[0].items == 4
    plugin = lc.Plugin(lc.Config())
    plugin.on_run_start(fake_run(profile, td, tiny_vae, tmp_path, tiny_model))
    assert [f.split("/")[-1] for f, _ in td.report.datasets[0].skipped] == ["cut.jpg"]
    paths = {p for _ in range(12) for p in td.next_batch(1).paths}
    assert not any(p.endswith("cut.jpg") for p in paths) and len(paths) == 3


@pytest.mark.slow
def test_training_with_the_cache_gives_the_same_lora(profile_data, tmp_path):
    """Two real runs of the loop, with and without latent_cache: same bits."""
    from safetensors.torch import load_file

    from wantrain.loop import train
    from wantrain.profile import load_profile

    results = []
    for enabled in ((), ("latent_cache",)):
        raw = copy.deepcopy(profile_data)
        raw["job"]["output_dir"] = str(tmp_path / f"out{len(enabled)}")
        raw["training"]["steps"] = 2
        raw["datasets"][0]["folder"] = str(shutil.copytree(raw["datasets"][0]["folder"], tmp_path / f"d{len(enabled)}"))
        raw["datasets"][0]["cache_latents"] = bool(enabled)
        raw["plugins"]["enabled"] = list(enabled)
        run = train(load_profile(data=raw))
        results.append(load_file(str(tmp_path / f"out{len(enabled)}" / "t_high_noise.safetensors")))
        if enabled:
            assert list((tmp_path / "d1" / lc.CACHE_DIR).glob("*.safetensors"))
            assert next(run.vae.parameters()).device.type == "cpu"
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
