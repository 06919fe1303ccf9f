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
    monkeypatch.setattr("nbfeatures.sae.pretrained.cache_only", lambda: False)  # as if the hub were reachable
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


# ---- load_sae(release, sae_id): the files located above, converted and built


def test_load_gemma_scope_release(hub):
    import torch

    from nbfeatures.sae import load_sae
    from nbfeatures.sae.saelens_format import SAELensSAE

    folder = _gemma(hub)
    sae = load_sae("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
    assert isinstance(sae, SAELensSAE) and sae.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input is False
    assert {k: sae.metadata[k] for k in ("hook_name", "model_name", "release", "sae_id")} == {
        "hook_name": "blocks.20.hook_resid_post", "model_name": "gemma-2-2b",
        "release": "gemma-scope-2b-pt-res-canonical", "sae_id": "layer_20/width_16k/canonical"}  # fmt: skip
    with np.load(folder / "params.npz") as z:  # Gemma Scope's JumpReLU, from the arrays themselves
        a = {k: torch.from_numpy(z[k]) for k in z.files}
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(1))
    pre = x @ a["W_enc"] + a["b_enc"]
    latents = (pre > a["threshold"]) * torch.relu(pre)
    assert 0 < (latents > 0).sum() < latents.numel()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), latents)
        torch.testing.assert_close(sae(x).x_hat, latents @ a["W_dec"] + a["b_dec"])
    # the same folder by path gives the same module, without release and sae_id
    by_path = load_sae(folder)
    assert all(torch.equal(v, by_path.state_dict()[k]) for k, v in sae.state_dict().items()) and "release" not in by_path.metadata


def _saelens_release(hub):
    """A folder written by SAELens itself (SAE.save_model) at gpt2-small-res-jb's blocks.8.hook_resid_pre."""
    import torch
    from sae_lens import SAE

    folder = _snapshot(hub, "jbloom/GPT2-Small-SAEs-Reformatted") / "blocks.8.hook_resid_pre"
    theirs = SAE.from_dict({"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
                            "apply_b_dec_to_input": True, "normalize_activations": "none",
                            "metadata": {"hook_name": "blocks.8.hook_resid_pre", "model_name": "gpt2-small"}})  # fmt: skip
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    theirs.save_model(folder)
    return folder


def test_load_saelens_release_as_from_pretrained_does(hub, monkeypatch):
    import torch
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as L

    from nbfeatures.sae import load_sae

    _saelens_release(hub)
    sae = load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert sae.architecture == "standard"
    assert sae.metadata["model_from_pretrained_kwargs"] == {"center_writing_weights": True}  # the registry's override
    assert (sae.metadata["hook_name"], sae.metadata["model_name"], sae.metadata["release"], sae.metadata["sae_id"]) == (
        "blocks.8.hook_resid_pre", "gpt2-small", "gpt2-small-res-jb", "blocks.8.hook_resid_pre")

    def from_cache(repo_id, filename, **kw):  # SAELens's own from_pretrained, reading the same fake cache
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub))
        if not isinstance(hit, str):
            raise EntryNotFoundError(f"{repo_id}/{filename}")
        return hit

    monkeypatch.setattr(L, "hf_hub_download", from_cache)
    ref = SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ref.encode(x) > 0).any()
        torch.testing.assert_close(sae.encode(x), ref.encode(x))
        torch.testing.assert_close(sae(x).x_hat, ref(x))


def test_load_sae_names_bad_releases_and_ids(hub):
    from nbfeatures.sae import load_sae

    with pytest.raises(ValueError, match=r"unknown release 'gemma-scope-2b-pt-res-canonicl'"):
        load_sae("gemma-scope-2b-pt-res-canonicl", "layer_20/width_16k/canonical")
    with pytest.raises(ValueError, match=r"no sae_id 'layer_20/width_16k/canonicl'"):
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonicl")
    with pytest.raises(ValueError, match=r"'gemma-scope-2b-pt-res-canonical' is a SAELens release with \d+ dictionaries: "
                                         r"pass one as sae_id"):  # fmt: skip
        load_sae("gemma-scope-2b-pt-res-canonical")
    with pytest.raises(ValueError, match=r"not a folder \(nor a SAELens release"):
        load_sae("no-such-release-or-folder")
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1"):  # registered, but not in the cache: fails at once
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")


def test_load_llama_scope_release_folds_the_registry_factor(hub):
    import torch
    from safetensors.torch import save_file

    from nbfeatures.sae import load_sae

    folder = _snapshot(hub, "fnlp/Llama3_1-8B-Base-LXR-8x") / "Llama3_1-8B-Base-L15R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    norm_in = 3.0  # hyperparams' factor sqrt(D) / 3 differs from the registry's 5.919...: SAELens folds the registry's
    hp = {"d_model": D, "d_sae": F, "jump_relu_threshold": 0.2, "hook_point_in": "blocks.15.hook_resid_post",
          "hook_point_out": "blocks.15.hook_resid_post", "dataset_average_activation_norm": {"in": norm_in, "out": norm_in}}  # fmt: skip
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    gen = torch.Generator().manual_seed(4)
    raw = {"encoder.weight": torch.randn(F, D, generator=gen), "encoder.bias": torch.randn(F, generator=gen) * 0.1,
           "decoder.weight": torch.randn(D, F, generator=gen), "decoder.bias": torch.randn(D, generator=gen)}  # fmt: skip
    save_file(raw, folder / "checkpoints" / "final.safetensors")
    sae = load_sae("llama_scope_lxr_8x", "l15r_8x")
    reg, computed = 5.91907514450867, D**0.5 / norm_in
    # SAE.from_pretrained: W_enc * reg, W_dec / reg, b_dec / reg; the loader scales the threshold by the computed factor
    torch.testing.assert_close(sae.W_enc, raw["encoder.weight"].T * reg)
    torch.testing.assert_close(sae.W_dec, raw["decoder.weight"].T / reg)
    torch.testing.assert_close(sae.b_dec, raw["decoder.bias"] / reg)
    torch.testing.assert_close(sae.threshold, torch.full((F,), 0.2 * computed))
    assert sae.metadata["hook_name"] == "blocks.15.hook_resid_post" and sae.metadata["sae_id"] == "l15r_8x"
