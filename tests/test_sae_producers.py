"""Other producers' files -> SAELens (cfg, tensors), checked against each producer's own encode/decode.

Oracles: sparsify's SparseCoder when installed; SAELens's own modules (SAE.from_dict) and its gemma_2 / llama_scope
loaders; otherwise the producer's encode written out below, citing the source function it copies.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nbfeatures.sae.producers import read_foreign

D, F, N = 6, 16, 5
HAS_SPARSIFY = importlib.util.find_spec("sparsify") is not None
HAS_FORMAT = importlib.util.find_spec("nbfeatures.sae.saelens_format") is not None


def _rand(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def _x():
    return _rand(N, D) * 2


def _saelens_module(cfg, tensors):
    """SAELens's own module for a SAELens architecture: the oracle for the pair we return."""
    from sae_lens import SAE

    sae = SAE.from_dict({**cfg, "metadata": {k: v for k, v in cfg["metadata"].items() if k in ("hook_name", "model_name")}})
    sae.load_state_dict(tensors)
    return sae


def _nbfeatures_reference(cfg, t, x):
    """The two architectures producers.py adds, exactly as its module docstring states them."""
    pre = torch.relu((x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x) @ t["W_enc"] + t["b_enc"])
    if cfg["architecture"] == "nbfeatures.topk_transcoder":
        vals, idx = pre.topk(cfg["k"], dim=-1)
    else:
        vals, idx = pre.unflatten(-1, (cfg["k"], -1)).max(dim=-1)
        idx = idx + torch.arange(cfg["k"]) * (cfg["d_sae"] // cfg["k"])
    latents = torch.zeros_like(pre).scatter(-1, idx, vals)
    return latents, latents @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)


def _from_saelens(cfg, tensors):
    """Our builder, or None where it does not know the architecture (test_from_saelens_builds_every_producer says so)."""
    if not HAS_FORMAT:
        return None
    from nbfeatures.sae import saelens_format as fmt

    if cfg["architecture"] not in set(fmt.SAELENS_ARCHITECTURES) | set(fmt.ARCHITECTURES) | set(fmt.SPARSIFY_ARCHITECTURES):
        return None
    return fmt.from_saelens(cfg, tensors, "fixture")


def _assert_matches(cfg, tensors, x, latents, out):
    """Our pair reproduces the producer's latents and output, through SAELens and through from_saelens when present."""
    with torch.no_grad():
        if cfg["architecture"].startswith("nbfeatures."):
            got = _nbfeatures_reference(cfg, tensors, x)
        else:
            sae = _saelens_module(cfg, tensors)
            got = sae.encode(x), sae(x)
        torch.testing.assert_close(got[0], latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], out, atol=1e-5, rtol=1e-5)
        mod = _from_saelens(cfg, tensors)
        if mod is not None:
            res = mod(x)
            torch.testing.assert_close(res[0] if isinstance(res, tuple) else res, out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mod.encode(x), latents, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_SPARSIFY, reason="eai-sparsify not installed")
@pytest.mark.parametrize("arch, kw", [
    ("nbfeatures.groupmax", {"activation": "groupmax"}),
    ("nbfeatures.groupmax", {"activation": "groupmax", "transcode": True, "skip_connection": True}),
    ("nbfeatures.topk_transcoder", {"transcode": True}),
    ("nbfeatures.topk_transcoder", {"transcode": True, "skip_connection": True}),
    ("nbfeatures.topk_transcoder", {"skip_connection": True}),  # a top-k SAE with a skip: b_dec is subtracted
])  # fmt: skip
def test_from_saelens_builds_every_producer(tmp_path, arch, kw):
    """sparsify's SparseCoder writes a folder; load_sae builds our module, which reproduces SparseCoder's outputs,
    and save_sae / load_sae round-trip it bit-exactly under its nbfeatures.* name."""
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    from nbfeatures.sae import load_sae, save_sae
    from nbfeatures.sae.sparsify_format import SPARSIFY_ARCHITECTURES

    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=4, **kw))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(_rand(*p.shape) * 0.5)
    coder.save_to_disk(tmp_path / "layers.2")
    sae = load_sae(tmp_path / "layers.2")
    assert type(sae) is SPARSIFY_ARCHITECTURES[arch][0] and sae.architecture == arch
    assert sae.cfg.skip_connection == kw.get("skip_connection", False)
    assert sae.cfg.apply_b_dec_to_input == (not kw.get("transcode", False))
    x = _x()
    with torch.no_grad():
        enc = coder.encode(x)
        latents = torch.zeros(N, F).scatter(-1, enc.top_indices, enc.top_acts)
        out = coder(x).sae_out
        ours = sae(x)
    torch.testing.assert_close(sae.encode(x), latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.latents, latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.x_hat, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x), x), ours.x_hat)
    assert (ours.latents > 0).sum(-1).le(4).all() and (ours.latents > 0).any()
    if arch == "nbfeatures.groupmax":  # one winner per group of F / k
        assert (ours.latents.unflatten(-1, (4, -1)) > 0).sum(-1).le(1).all()

    save_sae(sae, tmp_path / "ours", hook_name="blocks.2.hook_resid_post")
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["k"] == 4 and cfg["d_out"] == D
    again = load_sae(tmp_path / "ours")
    assert type(again) is type(sae) and again.cfg == sae.cfg and again.metadata["hook_name"] == "blocks.2.hook_resid_post"
    assert sae.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sae.state_dict().items())
    with torch.no_grad():
        assert torch.equal(again(x).x_hat, ours.x_hat)


def test_sparsify_variants_refuse_bad_configs(tmp_path):
    from nbfeatures.sae.saelens_format import from_saelens

    cfg, tensors = read_foreign(_write_sparsify_folder(tmp_path / "g", {"activation": "groupmax"}))
    with pytest.raises(ValueError, match=r"fixture: groupmax needs k to divide d_sae, got k=3, d_sae=16"):
        from_saelens({**cfg, "k": 3}, tensors, "fixture")
    with pytest.raises(ValueError, match=r"fixture: .*unexpected \['W_skip'\]"):
        from_saelens(cfg, {**tensors, "W_skip": torch.zeros(D, D)}, "fixture")
    with pytest.raises(ValueError, match=r"fixture: architecture 'nbfeatures.groupmax' takes normalize_activations .* 'none' only"):
        from_saelens({**cfg, "normalize_activations": "layer_norm"}, tensors, "fixture")


def _write_sparsify_folder(folder, raw):
    _write_sparsify(folder, raw)
    return folder


# ---- sparsify


def _sparsify_reference(t, raw, x):
    """sparsify/sparse_coder.py SparseCoder.encode + decode + forward's skip term; fused_encoder.py FusedEncoder.forward."""
    sae_in = x if raw.get("transcode") else x - t["b_dec"]
    pre = torch.relu(sae_in @ t["encoder.weight"].T + t["encoder.bias"])
    k = raw["k"]
    if raw.get("activation", "topk") == "topk":
        vals, idx = pre.topk(k, dim=-1, sorted=False)
    else:
        vals, idx = pre.unflatten(-1, (k, -1)).max(dim=-1)
        idx = idx + torch.arange(0, pre.shape[1], pre.shape[1] // k)
    latents = torch.zeros_like(pre).scatter(-1, idx, vals)
    out = latents @ t["W_dec"] + t["b_dec"]
    if "W_skip" in t:
        out = out + x @ t["W_skip"].mT
    return latents, out


def _write_sparsify(folder, raw, skip=False):
    """The layout SparseCoder.save_to_disk writes: sae.safetensors (encoder.weight [F, D], encoder.bias, W_dec [F, D],
    b_dec [D], W_skip [D, D]) and cfg.json (SparseCoderConfig fields + d_in)."""
    folder.mkdir(parents=True)
    t = {"encoder.weight": _rand(F, D), "encoder.bias": _rand(F) * 0.1, "W_dec": _rand(F, D), "b_dec": _rand(D) * 0.1}
    if skip:
        t["W_skip"] = _rand(D, D) * 0.1
    save_file(t, folder / "sae.safetensors")
    full = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": F, "k": 4,
            "multi_topk": False, "skip_connection": skip, "transcode": False, **raw, "d_in": D}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(full))
    return t, full


@pytest.mark.parametrize(
    "raw, skip, arch",
    [
        ({}, False, "topk"),
        ({"multi_topk": True}, False, "topk"),
        ({"activation": "groupmax"}, False, "nbfeatures.groupmax"),
        ({"transcode": True}, False, "nbfeatures.topk_transcoder"),
        ({"transcode": True}, True, "nbfeatures.topk_transcoder"),
        ({"transcode": True, "activation": "groupmax"}, True, "nbfeatures.groupmax"),
    ],
)
def test_sparsify_fixture(tmp_path, raw, skip, arch):
    t, full = _write_sparsify(tmp_path / "run" / "layers.3", raw, skip)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    cfg, tensors = read_foreign(tmp_path / "run" / "layers.3")
    assert cfg["architecture"] == arch and cfg["k"] == 4 and (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert cfg["apply_b_dec_to_input"] == (not raw.get("transcode", False))
    assert cfg["metadata"]["source_format"] == "sparsify" and cfg["metadata"]["model_name"] == "EleutherAI/pythia-70m"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["metadata"]["hf_hook_name"] == "layers.3"
    assert torch.equal(tensors["W_enc"], t["encoder.weight"].T) and torch.equal(tensors["W_dec"], t["W_dec"])
    assert ("W_skip" in tensors) == skip
    if arch != "topk":
        assert cfg["d_out"] == D
    x = _x()
    _assert_matches(cfg, tensors, x, *_sparsify_reference(t, full, x))


@pytest.mark.skipif(not HAS_SPARSIFY, reason="eai-sparsify not installed")
@pytest.mark.parametrize("kw", [{}, {"activation": "groupmax"}, {"transcode": True, "skip_connection": True}])
def test_sparsify_written_by_sparsify(tmp_path, kw):
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=4, **kw))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(_rand(*p.shape) * 0.5)
    coder.save_to_disk(tmp_path / "layers.2")
    cfg, tensors = read_foreign(tmp_path / "layers.2" / "sae.safetensors")  # the weights file works as well as its folder
    x = _x()
    with torch.no_grad():
        enc = coder.encode(x)
        latents = torch.zeros(N, F).scatter(-1, enc.top_indices, enc.top_acts)
        out = coder(x).sae_out
    _assert_matches(cfg, tensors, x, latents, out)
    _, ref_out = _sparsify_reference(
        {k: v.detach() for k, v in coder.state_dict().items()}, {"k": 4, **kw}, x
    )  # our written-out reference agrees with sparsify itself
    torch.testing.assert_close(ref_out, out, atol=1e-5, rtol=1e-5)


def test_sparsify_bad_files(tmp_path):
    _write_sparsify(tmp_path / "a", {"activation": "groupmax", "k": 5})
    with pytest.raises(ValueError, match=r"a/cfg.json: k=5 does not fit 16 latents"):
        read_foreign(tmp_path / "a")
    _write_sparsify(tmp_path / "b", {"skip_connection": True})
    with pytest.raises(ValueError, match="skip_connection=True but W_skip is absent"):
        read_foreign(tmp_path / "b")
    (tmp_path / "c").mkdir()
    save_file({"W_dec": _rand(F, D)}, tmp_path / "c" / "sae.safetensors")
    (tmp_path / "c" / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match=r"c/sae.safetensors: missing \['encoder.weight'"):
        read_foreign(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sae.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "d" / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match=r"d/sae.safetensors: not a readable safetensors"):
        read_foreign(tmp_path / "d")


# ---- dictionary_learning: state dicts with the keys each class's state_dict() has, config.json as training.py writes it


def _write_dl(folder, dict_class, sd, **trainer):
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    config = {"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": F, "layer": 3,
                          "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3", **trainer},
              "buffer": {"ctx_len": 128}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def _dl_case(name):
    """(dict_class, state dict, reference encode, reference decode), each encode copied from dictionary_learning."""
    relu = torch.relu
    if name == "AutoEncoder":  # dictionary.py AutoEncoder; decoder columns of norm 0.5..1.5, to exercise from_pretrained's normalisation
        sd = {"bias": _rand(D) * 0.1, "encoder.weight": _rand(F, D), "encoder.bias": _rand(F) * 0.1,
              "decoder.weight": _rand(D, F) * (0.5 + torch.rand(F, generator=torch.Generator().manual_seed(9)))}  # fmt: skip
        norms = sd["decoder.weight"].norm(dim=0)  # AutoEncoder.from_pretrained(normalize_decoder=True) -> normalize_decoder()
        enc = lambda x: relu((x - sd["bias"]) @ (sd["encoder.weight"] * norms[:, None]).T + sd["encoder.bias"] * norms)
        dec = lambda f: f @ (sd["decoder.weight"] / norms).T + sd["bias"]
    elif name == "AutoEncoderNew":  # dictionary.py AutoEncoderNew.encode/decode
        sd = {"encoder.weight": _rand(F, D), "encoder.bias": _rand(F) * 0.1, "decoder.weight": _rand(D, F), "decoder.bias": _rand(D)}
        enc = lambda x: relu(x @ sd["encoder.weight"].T + sd["encoder.bias"])
        dec = lambda f: f @ sd["decoder.weight"].T + sd["decoder.bias"]
    elif name == "GatedAutoEncoder":  # dictionary.py GatedAutoEncoder.encode/decode
        sd = {"decoder_bias": _rand(D) * 0.1, "r_mag": _rand(F) * 0.1, "gate_bias": _rand(F) * 0.1, "mag_bias": _rand(F) * 0.1,
              "encoder.weight": _rand(F, D), "decoder.weight": _rand(D, F)}  # fmt: skip
        def enc(x):
            x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
            return ((x_enc + sd["gate_bias"]) > 0).float() * relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        dec = lambda f: f @ sd["decoder.weight"].T + sd["decoder_bias"]
    elif name == "JumpReluAutoEncoder":  # dictionary.py JumpReluAutoEncoder.encode (apply_b_dec_to_input=False)
        sd = {"W_enc": _rand(D, F), "b_enc": _rand(F) * 0.1, "W_dec": _rand(F, D), "b_dec": _rand(D), "threshold": torch.rand(F)}
        def enc(x):
            pre = x @ sd["W_enc"] + sd["b_enc"]
            return relu(pre * (pre > sd["threshold"]))
        dec = lambda f: f @ sd["W_dec"] + sd["b_dec"]
    elif name in ("AutoEncoderTopK", "BatchTopKSAE"):  # trainers/top_k.py, trainers/batch_top_k.py
        sd = {"k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.7), "decoder.weight": _rand(D, F),
              "encoder.weight": _rand(F, D), "encoder.bias": _rand(F) * 0.1, "b_dec": _rand(D) * 0.1}  # fmt: skip
        post_relu = lambda x: relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        if name == "AutoEncoderTopK":  # encode() default: per-token top-k, scattered
            def enc(x):
                top = post_relu(x).topk(4, sorted=False, dim=-1)
                return torch.zeros(len(x), F).scatter_(-1, top.indices, top.values)
        else:  # BatchTopKSAE.encode(use_threshold=True), its default
            enc = lambda x: post_relu(x) * (post_relu(x) > sd["threshold"])
        dec = lambda f: f @ sd["decoder.weight"].T + sd["b_dec"]
    elif name == "MatryoshkaBatchTopKSAE":  # trainers/matryoshka_batch_top_k.py, encode(use_threshold=True), all groups active
        sd = {"k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.5), "group_sizes": torch.tensor([4, 4, 8]),
              "W_enc": _rand(D, F), "b_enc": _rand(F) * 0.1, "W_dec": _rand(F, D), "b_dec": _rand(D) * 0.1}  # fmt: skip
        post_relu = lambda x: relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        enc = lambda x: post_relu(x) * (post_relu(x) > sd["threshold"])
        dec = lambda f: f @ sd["W_dec"] + sd["b_dec"]
    return sd, enc, dec


DL_ARCH = {"AutoEncoder": ("standard", True), "AutoEncoderNew": ("standard", False), "GatedAutoEncoder": ("gated", True),
           "JumpReluAutoEncoder": ("jumprelu", False), "AutoEncoderTopK": ("topk", True), "BatchTopKSAE": ("jumprelu", True),
           "MatryoshkaBatchTopKSAE": ("jumprelu", True)}  # fmt: skip


@pytest.mark.parametrize("dict_class", sorted(DL_ARCH))
def test_dictionary_learning(tmp_path, dict_class):
    sd, enc, dec = _dl_case(dict_class)
    _write_dl(tmp_path / "trainer_0", dict_class, sd, k=4)
    cfg, tensors = read_foreign(tmp_path / "trainer_0")
    assert (cfg["architecture"], cfg["apply_b_dec_to_input"]) == DL_ARCH[dict_class]
    assert cfg["metadata"]["source_format"] == "dictionary_learning" and cfg["metadata"]["dict_class"] == dict_class
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    if "threshold" in sd and sd["threshold"].ndim == 0:
        assert cfg["metadata"]["threshold"] == pytest.approx(float(sd["threshold"]))  # the learned threshold is kept
    if dict_class == "MatryoshkaBatchTopKSAE":
        assert cfg["metadata"]["group_sizes"] == [4, 4, 8]
    x = _x()
    latents = enc(x)
    assert 0 < (latents > 0).sum() < latents.numel()  # the fixture exercises the sparsity rule
    _assert_matches(cfg, tensors, x, latents, dec(latents))


def test_topk_threshold_is_used_on_request(tmp_path):
    sd, _, dec = _dl_case("AutoEncoderTopK")
    _write_dl(tmp_path / "t", "AutoEncoderTopK", sd, k=4)
    cfg, tensors = read_foreign(tmp_path / "t", topk_threshold=True)
    assert cfg["architecture"] == "jumprelu" and torch.equal(tensors["threshold"], torch.full((F,), 0.7))
    x = _x()  # trainers/top_k.py AutoEncoderTopK.encode(x, use_threshold=True)
    post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    latents = post * (post > sd["threshold"])
    _assert_matches(cfg, tensors, x, latents, dec(latents))
    torch.save({**sd, "threshold": torch.tensor(-1.0)}, tmp_path / "t" / "ae.pt")
    with pytest.raises(ValueError, match=r"t/ae.pt: threshold is -1.0 \(never learned\)"):
        read_foreign(tmp_path / "t", topk_threshold=True)


class Evil:
    pass


def test_dictionary_learning_bad_files(tmp_path):
    sd, _, _ = _dl_case("AutoEncoderTopK")
    _write_dl(tmp_path / "a", "CrossCoder", sd)
    with pytest.raises(ValueError, match=r"dict_class 'CrossCoder' is not supported; supported: AutoEncoder"):
        read_foreign(tmp_path / "a")
    _write_dl(tmp_path / "b", "AutoEncoderTopK", {k: v for k, v in sd.items() if k != "b_dec"})
    with pytest.raises(ValueError, match=r"b/ae.pt: missing \['b_dec'\]"):
        read_foreign(tmp_path / "b")
    _write_dl(tmp_path / "c", "AutoEncoderTopK", {**sd, "encoder.bias": torch.zeros(F + 1)})
    with pytest.raises(ValueError, match=r"c/ae.pt: b_enc has shape \[17\], expected \[16\]"):
        read_foreign(tmp_path / "c")
    _write_dl(tmp_path / "d", "AutoEncoder", {"evil": Evil()})  # a pickled class: weights_only refuses it
    with pytest.raises(ValueError, match=r"d/ae.pt: not a plain tensor state dict"):
        read_foreign(tmp_path / "d")
    (tmp_path / "e").mkdir()  # no config.json, and top-k and batch top-k save the same keys
    torch.save(sd, tmp_path / "e" / "ae.pt")
    with pytest.raises(ValueError, match="cannot tell the dictionary class"):
        read_foreign(tmp_path / "e")


# ---- Gemma Scope params.npz and Llama Scope, checked against SAELens's own loaders (hf_hub_download replaced by the fixture)


def _gemma_arrays():
    return {"W_enc": _rand(D, F).numpy(), "W_dec": _rand(F, D).numpy(), "b_enc": (_rand(F) * 0.1).numpy(),
            "b_dec": _rand(D).numpy(), "threshold": torch.rand(F).numpy()}  # fmt: skip


def test_gemma_scope_matches_saelens_loader(tmp_path, monkeypatch):
    from sae_lens.loading import pretrained_sae_loaders as L

    folder = tmp_path / "models--google--gemma-scope-2b-pt-res" / "snapshots" / "abc" / "layer_20" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    arrays = _gemma_arrays()
    np.savez(folder / "params.npz", **arrays)
    cfg, tensors = read_foreign(folder)
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"] == {"hook_name": "blocks.20.hook_resid_post", "model_name": "gemma-2-2b", "source_format": "gemma_scope"}
    monkeypatch.setattr(L, "hf_hub_download", lambda repo_id, filename, subfolder, **kw: str(folder / filename))
    ref_cfg, ref_sd, _ = L.gemma_2_sae_huggingface_loader("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
    assert ref_cfg["hook_name"] == cfg["metadata"]["hook_name"] and ref_cfg["apply_b_dec_to_input"] is False
    assert set(ref_sd) == set(tensors) and all(torch.equal(ref_sd[k], tensors[k]) for k in tensors)
    x = _x()  # Gemma Scope's JumpReLU (the Gemma Scope tutorial's JumpReLUSAE.encode): no b_dec subtraction
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    latents = (pre > tensors["threshold"]) * torch.relu(pre)
    _assert_matches(cfg, tensors, x, latents, latents @ tensors["W_dec"] + tensors["b_dec"])


def test_gemma_scope_bad_files(tmp_path):
    (tmp_path / "a").mkdir()
    arrays = _gemma_arrays()
    del arrays["threshold"]
    np.savez(tmp_path / "a" / "params.npz", **arrays)
    with pytest.raises(ValueError, match=r"a/params.npz: missing \['threshold'\]"):
        read_foreign(tmp_path / "a")
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "params.npz", **_gemma_arrays(), extra=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"b/params.npz: not a readable .npz of plain arrays"):
        read_foreign(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "params.npz").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(ValueError, match=r"c/params.npz: not a readable"):
        read_foreign(tmp_path / "c")
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "params.npz", **{**_gemma_arrays(), "b_dec": np.zeros(D + 1, np.float32)})
    with pytest.raises(ValueError, match=r"d/params.npz: b_dec has shape \[7\], expected \[6\]"):
        read_foreign(tmp_path / "d")


def test_llama_scope_matches_saelens_from_pretrained(tmp_path, monkeypatch):
    """The layout of fnlp/Llama3_1-8B-Base-LX*: <folder>/hyperparams.json + <folder>/checkpoints/final.safetensors."""
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as L

    folder = tmp_path / "Llama3_1-8B-Base-L15R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    hp = {"d_model": D, "d_sae": F, "jump_relu_threshold": 0.3, "hook_point_in": "blocks.15.hook_resid_post",
          "hook_point_out": "blocks.15.hook_resid_post", "dataset_average_activation_norm": {"in": 9.0, "out": 9.0}}  # fmt: skip
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    raw = {"encoder.weight": _rand(F, D), "encoder.bias": _rand(F), "decoder.weight": _rand(D, F), "decoder.bias": _rand(D)}
    # values bfloat16 can hold, since SAELens reads Llama Scope in bfloat16
    save_file({k: v.bfloat16().float() for k, v in raw.items()}, folder / "checkpoints" / "final.safetensors")
    cfg, tensors = read_foreign(folder)
    nsf = D**0.5 / 9.0
    assert cfg["metadata"]["norm_scaling_factor"] == pytest.approx(nsf) and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"

    def fake_download(repo_id, filename, subfolder=None, **kw):
        return str(tmp_path / (f"{subfolder}/{filename}" if subfolder else filename))

    monkeypatch.setattr(L, "hf_hub_download", fake_download)  # SAE.from_pretrained's path, minus the registry lookup
    ref_cfg, ref_sd, _ = L.llama_scope_sae_huggingface_loader("fnlp/Llama3_1-8B-Base-LXR-8x", folder.name)
    ref = SAE.from_dict({**L.handle_config_defaulting(ref_cfg), "dtype": "float32"})
    ref.load_state_dict({k: v.float() for k, v in ref_sd.items()})
    ref.fold_activation_norm_scaling_factor(nsf)
    for k in tensors:  # SAELens computes the scalar threshold in bfloat16; everything else is exact in float32
        tol = 1e-2 if k == "threshold" else 1e-6
        torch.testing.assert_close(tensors[k], ref.state_dict()[k].float(), atol=tol, rtol=tol)
    x = _x()
    with torch.no_grad():
        ref.threshold.copy_(tensors["threshold"])
        _assert_matches(cfg, tensors, x, ref.encode(x), ref(x))


def test_not_foreign(tmp_path):
    (tmp_path / "sae_weights.safetensors").write_bytes(b"")
    assert read_foreign(tmp_path) is None  # a SAELens folder is not foreign
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_foreign(empty) is None
    with pytest.raises(ValueError, match="not a folder or file"):
        read_foreign(tmp_path / "missing")
