"""Pretrained dictionaries by name, resolved in a fake Hugging Face hub cache built in tmp_path."""

import json
import time

import numpy as np
import pytest

from nbfeatures.sae import pretrained
from nbfeatures.sae.pretrained import locate
from nbfeatures.sae.producers import read_foreign

D, F = 4, 8


def _snapshot(hub, repo_id, rev="abc123"):
    """<cache>/models--<org>--<name>/snapshots/<rev>/ with refs/main naming <rev>: huggingface_hub's cache layout."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    return repo / "snapshots" / rev


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    yield tmp_path / "hub"
    assert not attempts, "hf_hub_download was called although HF_HUB_OFFLINE=1"


def _gemma(hub):
    folder = _snapshot(hub, "google/gemma-scope-2b-pt-res") / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "params.npz", W_enc=rng.normal(size=(D, F)).astype(np.float32), W_dec=rng.normal(size=(F, D)).astype(np.float32),
             b_enc=np.zeros(F, np.float32), b_dec=np.zeros(D, np.float32), threshold=np.full(F, 0.1, np.float32))  # fmt: skip
    return folder


def test_gemma_scope_offline(hub):
    folder = _gemma(hub)
    loc = locate("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
    assert loc.path == folder and loc.files == (folder / "params.npz",)
    assert (loc.repo_id, loc.repo_path, loc.conversion) == ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71", "gemma_2")
    assert (loc.hook_name, loc.model_name, loc.norm_scaling_factor) == ("blocks.20.hook_resid_post", "gemma-2-2b", None)
    cfg, tensors = read_foreign(loc.path)  # and the files it found are readable, with the same hook
    assert cfg["metadata"]["hook_name"] == loc.hook_name and tensors["W_enc"].shape == (D, F)


def test_cache_dir_argument_wins(hub, tmp_path, monkeypatch):
    folder = _gemma(hub)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert locate("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical", cache_dir=hub).path == folder


def test_unknown_names_fail_fast_with_close_matches(hub):
    pretrained.registry()  # parsed once per process (about 0.5 s); the lookups must be instant
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"unknown release 'gemma-scope-2b-pt-res-canonicl'; close matches: \['gemma-scope-2b-pt-res-canonical'"):
        locate("gemma-scope-2b-pt-res-canonicl", "layer_20/width_16k/canonical")
    with pytest.raises(ValueError, match=r"no sae_id 'layer_20/width_16k/canonicl'; close matches: \['layer_20/width_16k/canonical'"):
        locate("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonicl")
    assert time.perf_counter() - t0 < 1.0


def test_missing_file_offline_names_repo_path_and_offline(hub):
    pretrained.registry()  # parse the registry first: the time limit is for the lookup
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        locate("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert "google/gemma-scope-2b-pt-res" in msg and "layer_12/width_16k/average_l0_82/params.npz" in msg and "HF_HUB_OFFLINE=1" in msg


def test_online_downloads_what_the_cache_lacks(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_download(repo_id, filename, cache_dir=None, **kw):
        calls.append((repo_id, filename, cache_dir))
        path = _snapshot(hub, repo_id, "def456") / filename
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loc = locate("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical")
    assert calls == [("google/gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_105/params.npz", str(hub))]
    assert loc.path == hub / "models--google--gemma-scope-2b-pt-res" / "snapshots" / "def456" / "layer_0" / "width_16k" / "average_l0_105"
    _gemma(hub.parent / "hub2")  # a cached file is not downloaded again
    calls.clear()
    locate("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical", cache_dir=hub.parent / "hub2")
    assert calls == []


def test_saelens_and_llama_scope_releases(hub):
    snap = _snapshot(hub, "jbloom/GPT2-Small-SAEs-Reformatted")
    (snap / "blocks.8.hook_resid_pre").mkdir()
    (snap / "blocks.8.hook_resid_pre" / "cfg.json").write_text(json.dumps({"hook_point": "blocks.8.hook_resid_pre", "d_in": 768}))
    (snap / "blocks.8.hook_resid_pre" / "sae_weights.safetensors").write_bytes(b"")
    loc = locate("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert (loc.conversion, loc.hook_name, loc.model_name) == ("sae_lens", "blocks.8.hook_resid_pre", "gpt2-small")
    assert loc.config_overrides == {"model_from_pretrained_kwargs": {"center_writing_weights": True}}

    folder = _snapshot(hub, "fnlp/Llama3_1-8B-Base-LXR-8x") / "Llama3_1-8B-Base-L15R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps({"hook_point_in": "blocks.15.hook_resid_post"}))
    (folder / "checkpoints" / "final.safetensors").write_bytes(b"")
    loc = locate("llama_scope_lxr_8x", "l15r_8x")
    assert loc.path == folder and loc.hook_name == "blocks.15.hook_resid_post"
    assert loc.norm_scaling_factor == pytest.approx(5.91907514450867)


def test_vendored_table_without_sae_lens(hub, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sae_lens" else real(name, *a))
    pretrained.registry.cache_clear()
    try:
        assert pretrained.registry() is pretrained.VENDORED
        folder = _gemma(hub)
        assert locate("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical").path == folder
        with pytest.raises(ValueError, match="unknown release 'gemma-scope-2b-pt-mlp-canonical'"):
            locate("gemma-scope-2b-pt-mlp-canonical", "layer_20/width_16k/canonical")
    finally:
        pretrained.registry.cache_clear()


def test_vendored_table_agrees_with_installed_registry():
    full = pretrained.registry()
    if full is pretrained.VENDORED:
        pytest.skip("sae_lens not installed")
    for release, entry in pretrained.VENDORED.items():
        ids = {s["id"]: s for s in full[release]["saes"]}
        assert {k: entry.get(k) for k in ("repo_id", "model", "conversion_func", "config_overrides")} == {
            k: full[release].get(k) for k in ("repo_id", "model", "conversion_func", "config_overrides")}
        for sae in entry["saes"]:
            assert ids[sae["id"]]["path"] == sae["path"]
            assert ids[sae["id"]].get("norm_scaling_factor") == sae.get("norm_scaling_factor")


def test_unsupported_conversion_is_named(hub):
    release = next((r for r, e in pretrained.registry().items() if e.get("conversion_func") == "gemma_3"), None)
    if release is None:
        pytest.skip("no gemma_3 release in this registry")
    sae_id = pretrained.registry()[release]["saes"][0]["id"]
    with pytest.raises(ValueError, match=r"uses SAELens conversion 'gemma_3', which nbfeatures cannot read yet"):
        locate(release, str(sae_id))
