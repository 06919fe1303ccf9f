"""Dictionary files: SAELens v6 layout round trips (with SAELens itself when installed), other formats, bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from nbfeatures.sae.io import load_sae, load_sparsity, save_sae
from nbfeatures.sae.relu import ReLUConfig, ReLUSAE
from nbfeatures.sae.topk import TopKConfig, TopKSAE


def trained_like(sae):
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


@pytest.fixture
def topk():
    torch.manual_seed(0)
    return trained_like(TopKSAE(TopKConfig(24, 96, 6)))


def test_saelens_layout_round_trip_is_bit_exact(tmp_path, topk):
    sparsity = torch.log10(torch.rand(96) + 1e-10)
    save_sae(topk, tmp_path, hook_name="blocks.1.hook_resid_post", hf_hook_name="gpt_neox.layers.1",
             model_name="stories", sparsity=sparsity, dataset_path="stories-synthetic")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 6 and cfg["d_in"] == 24 and cfg["d_sae"] == 96
    assert {"dtype", "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations"} <= set(cfg)
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0" and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["nbfeatures_version"] and cfg["metadata"]["dataset_path"] == "stories-synthetic"
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, TopKSAE) and loaded.cfg == topk.cfg
    for name, p in topk.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert torch.equal(load_sparsity(tmp_path), sparsity)
    assert loaded.metadata["hf_hook_name"] == "gpt_neox.layers.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]


def test_relu_round_trip(tmp_path):
    sae = trained_like(ReLUSAE(ReLUConfig(8, 32)))
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    x = torch.randn(5, 8)
    assert isinstance(loaded, ReLUSAE) and torch.equal(loaded(x).x_hat, sae(x).x_hat)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "standard"


def test_saelens_loads_our_topk_sae(tmp_path, topk):
    sae_lens = pytest.importorskip("sae_lens")
    save_sae(topk, tmp_path, hook_name="blocks.1.hook_resid_post", model_name="stories")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(theirs).__name__ == "TopKSAE"
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(40, 24)
    with torch.no_grad():
        ours = topk(x)
        their_latents = theirs.encode(x)
        if their_latents.is_sparse:
            their_latents = their_latents.to_dense()
        torch.testing.assert_close(their_latents, ours.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(ours.latents), ours.x_hat, atol=1e-5, rtol=1e-5)


def test_reads_a_saelens_folder_with_decoder_norm_rescaling(tmp_path, topk):
    """SAELens training checkpoints keep non-unit decoder rows and rescale; loading folds the norms in.

    SAELens semantics: pre = ((x - b_dec) W_enc + b_enc) * |W_dec rows|, top-k, relu, then
    decode (acts / |W_dec rows|) W_dec + b_dec.
    """
    t = {k: v.detach() for k, v in topk.state_dict().items()}
    t["W_dec"] = t["W_dec"] * (torch.rand(96, 1) + 0.5)
    save_file({k: v.contiguous() for k, v in t.items()}, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 24, "d_sae": 96, "k": 6, "dtype": "float32", "architecture": "topk",
                                                    "rescale_acts_by_decoder_norm": True, "metadata": {"sae_lens_version": "6.5.0"}}))
    x = torch.randn(10, 24)
    norms = t["W_dec"].norm(dim=1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    vals, idx = pre.topk(6, dim=1)
    acts = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    expected = (acts / norms) @ t["W_dec"] + t["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(load_sae(tmp_path)(x).x_hat, expected, atol=1e-5, rtol=1e-5)


def test_reads_sparsify_folder(tmp_path, topk):
    save_file({"encoder.weight": topk.W_enc.detach().t().contiguous(), "encoder.bias": topk.b_enc.detach(),
               "W_dec": topk.W_dec.detach().contiguous(), "b_dec": topk.b_dec.detach()}, tmp_path / "sae.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                    "num_latents": 0, "k": 6, "multi_topk": False, "d_in": 24}))
    x = torch.randn(10, 24)
    torch.testing.assert_close(load_sae(tmp_path)(x).x_hat, topk(x).x_hat)


def test_reads_dictionary_learning_folder(tmp_path, topk):
    torch.save({"encoder.weight": topk.W_enc.detach().t().clone(), "encoder.bias": topk.b_enc.detach().clone(),
                "decoder.weight": topk.W_dec.detach().t().clone(), "b_dec": topk.b_dec.detach().clone(),
                "k": torch.tensor(6), "threshold": torch.tensor(-1.0)}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "activation_dim": 24,
                                                                  "dict_size": 96, "k": 6, "layer": 1, "lm_name": "stories"}}))
    loaded = load_sae(tmp_path)
    x = torch.randn(10, 24)
    torch.testing.assert_close(loaded(x).x_hat, topk(x).x_hat)
    assert loaded.metadata["layer"] == 1


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_never_unpickles_code(tmp_path, capsys):
    torch.save({"encoder.weight": torch.zeros(4, 2), "evil": Payload()}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        load_sae(tmp_path)
    assert "this must never run" not in capsys.readouterr().out


def test_corrupt_truncated_and_foreign_files(tmp_path, topk):
    save_sae(topk, tmp_path / "ok")
    weights = (tmp_path / "ok" / "sae_weights.safetensors").read_bytes()
    bad = tmp_path / "truncated"
    save_sae(topk, bad)
    (bad / "sae_weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: not a readable safetensors file"):
        load_sae(bad)
    foreign = tmp_path / "foreign"
    save_sae(topk, foreign)
    (foreign / "sae_weights.safetensors").write_bytes(b"PK\x03\x04 a zip file, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(foreign)
    broken_cfg = tmp_path / "cfg"
    save_sae(topk, broken_cfg)
    (broken_cfg / "cfg.json").write_text('{"d_in": 24, "d_sae"')
    with pytest.raises(ValueError, match=r"cfg\.json: not valid JSON"):
        load_sae(broken_cfg)


def test_mismatched_weights_and_configs(tmp_path, topk):
    save_sae(topk, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 95}))
    with pytest.raises(ValueError, match=r"W_enc has shape \[24, 96\], expected \[24, 95\] from the config"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "temporal"}))
    with pytest.raises(ValueError, match=r"cfg\.json: field 'architecture' = 'temporal' is not supported; supported: \[.*'jumprelu'"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))  # supported now, but no threshold
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: tensors do not match architecture 'jumprelu'.*missing \['threshold'\]"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    t = {k: v for k, v in topk.state_dict().items() if k != "b_enc"}
    save_file({k: v.contiguous() for k, v in t.items()}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"missing \['b_enc'\]"):
        load_sae(tmp_path)


def test_not_a_dictionary_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"not a dictionary folder.*found \['notes.txt'\]"):
        load_sae(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_sae(tmp_path / "missing")
