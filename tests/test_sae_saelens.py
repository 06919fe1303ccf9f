"""Every SAELens 6 architecture against SAELens's own code, both ways, plus bad files.

(a) a folder SAELens saved (`save_model`) loads here and computes what SAELens computes;
(b) a folder saved here (`save_sae`) loads in SAELens (`SAE.load_from_disk`) and computes the same.
"""

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from nbfeatures.sae.io import load_sae, save_sae
from nbfeatures.sae.relu import ReLUSAE
from nbfeatures.sae.saelens_format import SAELensConfig, SAELensSAE, from_saelens, to_saelens
from nbfeatures.sae.topk import TopKSAE

sae_lens = pytest.importorskip("sae_lens")
SAE = sae_lens.SAE

D, F, D_OUT, H, E = 12, 40, 10, 3, 4  # hook_z: H * E = D
HOOK_Z = "blocks.0.attn.hook_z"
TC = dict(d_out=D_OUT, apply_b_dec_to_input=False)
CASES = {  # name: (cfg fields, the class load_sae must return)
    "standard": (dict(architecture="standard"), ReLUSAE),
    "standard_no_b_dec": (dict(architecture="standard", apply_b_dec_to_input=False), SAELensSAE),
    "topk": (dict(architecture="topk", k=5), TopKSAE),
    "topk_rescale": (dict(architecture="topk", k=5, rescale_acts_by_decoder_norm=True), TopKSAE),
    "topk_rescale_no_b_dec": (dict(architecture="topk", k=5, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False), SAELensSAE),
    "abstopk": (dict(architecture="abstopk", k=5), SAELensSAE),
    "abstopk_rescale": (dict(architecture="abstopk", k=5, rescale_acts_by_decoder_norm=True), SAELensSAE),
    "jumprelu": (dict(architecture="jumprelu"), SAELensSAE),
    "jumprelu_gemma_scope": (dict(architecture="jumprelu", apply_b_dec_to_input=False), SAELensSAE),
    "gated": (dict(architecture="gated"), SAELensSAE),
    "transcoder": (dict(architecture="transcoder", **TC), SAELensSAE),
    "skip_transcoder": (dict(architecture="skip_transcoder", **TC), SAELensSAE),
    "jumprelu_transcoder": (dict(architecture="jumprelu_transcoder", **TC), SAELensSAE),
    "jumprelu_skip_transcoder": (dict(architecture="jumprelu_skip_transcoder", **TC), SAELensSAE),
    "constant_norm_rescale": (dict(architecture="standard", normalize_activations="constant_norm_rescale"), SAELensSAE),
    "layer_norm": (dict(architecture="jumprelu", normalize_activations="layer_norm"), SAELensSAE),
    "topk_layer_norm": (dict(architecture="topk", k=5, normalize_activations="layer_norm"), SAELensSAE),
    "expected_average_only_in": (dict(architecture="standard", normalize_activations="expected_average_only_in"), SAELensSAE),
    "covariance_whitening": (dict(architecture="gated", normalize_activations="covariance_whitening"), SAELensSAE),
    "skip_transcoder_layer_norm": (dict(architecture="skip_transcoder", normalize_activations="layer_norm", **TC), SAELensSAE),
    "hook_z": (dict(architecture="standard", reshape_activations="hook_z"), SAELensSAE),
    "jumprelu_hook_z_norm": (dict(architecture="jumprelu", reshape_activations="hook_z", normalize_activations="constant_norm_rescale"), SAELensSAE),
    "standard_bf16": (dict(architecture="standard", dtype="bfloat16"), ReLUSAE),
    "jumprelu_bf16": (dict(architecture="jumprelu", dtype="bfloat16", apply_b_dec_to_input=False), SAELensSAE),
}  # fmt: skip


def random_saelens(fields: dict, seed: int = 0):
    """A SAELens SAE with non-trivial random parameters (thresholds partly negative, decoder rows not unit-norm)."""
    hook_name = HOOK_Z if fields.get("reshape_activations") == "hook_z" else "blocks.0.hook_resid_post"
    metadata = {"hook_name": hook_name, "model_name": "tiny"}
    sae = SAE.from_dict({"d_in": D, "d_sae": F, **fields, "metadata": metadata})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            value = {"threshold": 0.3 * r + 0.2, "r_mag": 0.3 * r, "W_dec": r * (0.5 + torch.rand(p.shape[0], 1, generator=gen))}
            p.copy_(value.get(name, 0.5 * r).to(p.dtype))
    return sae.eval()


def inputs(fields: dict, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 5, H, E) if fields.get("reshape_activations") == "hook_z" else (2, 5, D)
    return 2 * torch.randn(shape, generator=gen) + 0.5


def tol(fields):
    return dict(atol=2e-2, rtol=2e-2) if fields.get("dtype") == "bfloat16" else dict(atol=1e-5, rtol=1e-5)


def their_outputs(theirs, x):
    x = x.to(theirs.dtype)
    with torch.no_grad():
        latents = theirs.encode(x)
        decoded = theirs.decode(latents)  # after encode: SAELens keeps the normalisation statistics until decode
        return latents.float(), decoded.float(), theirs(x).float()


def assert_same(ours, theirs, fields):
    x = inputs(fields)
    latents, decoded, x_hat = their_outputs(theirs, x)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out.latents.float(), latents, **tol(fields))
        torch.testing.assert_close(out.x_hat.float(), x_hat, **tol(fields))
        if isinstance(ours, SAELensSAE):
            torch.testing.assert_close(ours.encode(x).float(), latents, **tol(fields))
            skip = ours.architecture.endswith("skip_transcoder")
            torch.testing.assert_close(ours.decode(latents, x).float(), x_hat if skip else decoded, **tol(fields))
        assert out.x_hat.shape == x_hat.shape  # hook_z: [B, T, H, E] back


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_ways_with_saelens(case, tmp_path):
    fields, cls = CASES[case]
    theirs = random_saelens(fields)
    theirs.save_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")  # (a)
    assert type(ours) is cls and ours.metadata["model_name"] == "tiny"
    assert_same(ours, theirs, fields)
    save_sae(ours, tmp_path / "ours")  # (b): hook_name and model_name carried over from the loaded metadata
    back = SAE.load_from_disk(str(tmp_path / "ours"), device="cpu")
    assert back.cfg.architecture() == fields["architecture"] and back.dtype == theirs.dtype
    assert_same(ours, back, fields)
    again = load_sae(tmp_path / "ours")
    assert type(again) is cls and all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
    if isinstance(ours, SAELensSAE):
        assert again.cfg == ours.cfg and to_saelens(again)[0] == to_saelens(ours)[0]


def test_apply_b_dec_to_input_false_is_not_ignored(tmp_path):
    """The old reader dropped apply_b_dec_to_input=False and reconstructed with b_dec subtracted anyway."""
    fields = CASES["standard_no_b_dec"][0]
    theirs = random_saelens(fields)
    theirs.save_model(tmp_path)
    ours, x = load_sae(tmp_path), inputs(fields)
    with torch.no_grad():
        as_if_true = torch.relu((x - theirs.b_dec) @ theirs.W_enc + theirs.b_enc) @ theirs.W_dec + theirs.b_dec
        assert (ours(x).x_hat - as_if_true).abs().max() > 0.1
        torch.testing.assert_close(ours(x).x_hat, theirs(x))


def test_stored_norm_scaling_factor_is_folded_as_from_pretrained_does(tmp_path):
    fields = dict(architecture="jumprelu", normalize_activations="expected_average_only_in")
    theirs = random_saelens(fields)
    theirs.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "norm_scaling_factor": 2.5}))
    ours = load_sae(tmp_path)
    theirs.fold_activation_norm_scaling_factor(2.5)  # what SAE.from_pretrained does with its registry's factor
    assert ours.cfg.normalize_activations == "none"
    assert_same(ours, theirs, fields)


def test_hook_z_reads_heads_and_flat_inputs(tmp_path):
    fields = CASES["hook_z"][0]
    random_saelens(fields).save_model(tmp_path)
    ours, x = load_sae(tmp_path), inputs(fields)
    with torch.no_grad():
        out = ours(x)
        assert out.x_hat.shape == (2, 5, H, E) and out.latents.shape == (2, 5, F)
        torch.testing.assert_close(ours(x.flatten(-2)).x_hat, out.x_hat.flatten(-2))
    with pytest.raises(ValueError, match=r"expected \[\.\., H, E\] with H\*E = d_in = 12"):
        ours(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="reads a hook_z site"):
        save_sae(ours, tmp_path / "bad", hook_name="blocks.0.hook_resid_post")


def test_decode_needs_the_input_where_the_output_depends_on_it(tmp_path):
    random_saelens(CASES["layer_norm"][0]).save_model(tmp_path)
    ours = load_sae(tmp_path)
    with pytest.raises(ValueError, match="normalize_activations='layer_norm' depends on the input; pass x"):
        ours.decode(torch.zeros(3, F))
    with pytest.raises(NotImplementedError, match="inference only"):
        ours.default_objective()


@pytest.mark.parametrize("legacy", ["relu", "topk", "hook_z"])
def test_legacy_pre_v6_cfg(legacy, tmp_path):
    """A pre-6.0 cfg.json (gpt2-small-res-jb style: hook_point, activation_fn_str, no architecture) as SAELens 6 reads it."""
    theirs = random_saelens(CASES[{"relu": "standard", "topk": "topk", "hook_z": "hook_z"}[legacy]][0])
    tensors = {k: v.detach().clone() for k, v in theirs.state_dict().items()} | {"scaling_factor": torch.ones(F)}
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    cfg = {"model_name": "gpt2-small", "hook_point": HOOK_Z if legacy == "hook_z" else "blocks.0.hook_resid_pre", "hook_point_layer": 0,
           "hook_point_head_index": None, "d_in": D, "d_sae": F, "dtype": "torch.float32", "device": "cpu",
           "b_dec_init_method": "geometric_median",
           "normalize_activations": False, "context_size": 128, "sae_lens_version": "2.1.3", "lr": 4e-4, "l1_coefficient": 8e-5,
           "activation_fn_str": "topk" if legacy == "topk" else "relu"}  # fmt: skip
    if legacy == "topk":
        cfg["activation_fn_kwargs"] = {"k": 5}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = SAE.load_from_disk(str(tmp_path), device="cpu")
    ours = load_sae(tmp_path)
    assert back.cfg.architecture() == ("topk" if legacy == "topk" else "standard")
    assert type(ours) is {"relu": ReLUSAE, "topk": TopKSAE, "hook_z": SAELensSAE}[legacy]
    assert ours.metadata["hook_name"] == cfg["hook_point"] and ours.metadata["context_size"] == 128
    fields = {"reshape_activations": "hook_z"} if legacy == "hook_z" else {}
    assert_same(ours, back, fields)
    save_sae(ours, tmp_path / "v6")  # written back in the v6 layout, which SAELens reads as the same dictionary
    assert_same(ours, SAE.load_from_disk(str(tmp_path / "v6"), device="cpu"), fields)
    tensors["scaling_factor"] = torch.full((F,), 2.0)  # a real pre-6.0 finetuning scale: SAELens 6 refuses it too
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: scaling_factor is not all ones"):
        load_sae(tmp_path)


def test_from_saelens_and_config_direct():
    cfg = {"architecture": "jumprelu", "d_in": 4, "d_sae": 6, "apply_b_dec_to_input": False, "metadata": {"sae_lens_version": "6.54.0"}}
    tensors = {"W_enc": torch.randn(4, 6), "b_enc": torch.zeros(6), "W_dec": torch.randn(6, 4), "b_dec": torch.zeros(4),
               "threshold": torch.full((6,), float("inf"))}
    sae = from_saelens(cfg, tensors, "here")
    assert isinstance(sae, SAELensSAE) and sae.architecture == "jumprelu"
    assert not sae(torch.randn(3, 4)).latents.any()  # an infinite threshold: a latent that never fires
    with pytest.raises(ValueError, match=r"here: tensor 'W_dec' has shape \[6, 4\], expected \[6, 5\]"):
        from_saelens({**cfg, "architecture": "transcoder", "d_out": 5}, {k: v for k, v in tensors.items() if k != "threshold"}, "here")
    with pytest.raises(ValueError, match="apply_b_dec_to_input must be false for transcoders"):
        SAELensConfig("transcoder", 4, 6, d_out=3)
    with pytest.raises(ValueError, match=r"topk needs an integer 0 < k <= d_sae=6"):
        SAELensConfig("topk", 4, 6, k=7)


# ----------------------------------------------------------------------------- bad files


def saelens_folder(tmp_path, name="sae", **fields):
    folder = tmp_path / name
    random_saelens({"architecture": "standard", "apply_b_dec_to_input": False} | fields).save_model(folder)
    return folder


def rewrite_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def test_a_small_file_claiming_a_huge_dictionary_fails_before_allocating(tmp_path):
    folder = saelens_folder(tmp_path)
    rewrite_cfg(folder, d_sae=10**9)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: W_enc has shape \[12, 40\], expected \[12, 1000000000\]"):
        load_sae(folder)
    # a header that itself claims the huge shape, in a 4 KB file
    header = json.dumps({"W_enc": {"dtype": "F32", "shape": [12, 10**9], "data_offsets": [0, 48 * 10**9]}}).encode()
    (folder / "sae_weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4000))
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors: not a readable safetensors file.*'W_enc'.*does not fit the file"):
        load_sae(folder)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("field, value, message", [
    ("d_sae", "40", r"cfg\.json: field 'd_sae' must be a positive integer, got '40'"),
    ("d_in", 12.0, r"cfg\.json: field 'd_in' must be a positive integer, got 12\.0"),
    ("d_in", True, r"cfg\.json: field 'd_in' must be a positive integer, got True"),
    ("dtype", "int8", r"cfg\.json: field 'dtype' = 'int8' is not a float dtype"),
    ("apply_b_dec_to_input", "no", r"cfg\.json: field 'apply_b_dec_to_input' must be true or false"),
    ("normalize_activations", "batch_norm", r"cfg\.json: field 'normalize_activations' = 'batch_norm' is not one of"),
    ("reshape_activations", "heads", r"cfg\.json: field 'reshape_activations' = 'heads'"),
    ("architecture", "temporal", r"cfg\.json: field 'architecture' = 'temporal' is not supported"),
    ("k", 41, r"cfg\.json: field 'k' = 41 exceeds d_sae = 40"),
    ("sae_lens_version", "six", r"cfg\.json: field 'sae_lens_version' = 'six' is not a version number"),
])  # fmt: skip
def test_bad_cfg_fields_are_named(tmp_path, field, value, message):
    folder = saelens_folder(tmp_path, architecture="topk", k=5) if field == "k" else saelens_folder(tmp_path)
    rewrite_cfg(folder, **{field: value})
    with pytest.raises(ValueError, match=message):
        load_sae(folder)


def test_transcoder_with_b_dec_applied_is_refused(tmp_path):
    folder = saelens_folder(tmp_path, **CASES["transcoder"][0])
    rewrite_cfg(folder, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match=r"cfg\.json: field 'apply_b_dec_to_input' must be false for a transcoder"):
        load_sae(folder)


@pytest.mark.parametrize("change, message", [
    ("missing", r"sae_weights\.safetensors: tensors do not match architecture 'standard' of cfg\.json: missing \['b_enc'\]"),
    ("extra", r"sae_weights\.safetensors: tensors do not match .* of cfg\.json: missing \[\], unexpected \['extra'\]"),
    ("shape", r"sae_weights\.safetensors: b_dec has shape \[13\], expected \[12\] from the config \(cfg\.json: d_in=12, d_sae=40\)"),
    ("dtype", r"sae_weights\.safetensors: b_enc has dtype I64, not a float"),
    ("nan", r"tensor 'W_dec' contains non-finite values"),
])  # fmt: skip
def test_bad_tensors_are_named(tmp_path, change, message):
    folder = saelens_folder(tmp_path)
    path = folder / "sae_weights.safetensors"
    from safetensors.torch import load_file

    t = load_file(path)
    if change == "missing":
        del t["b_enc"]
    elif change == "extra":
        t["extra"] = torch.zeros(3)
    elif change == "shape":
        t["b_dec"] = torch.zeros(13)
    elif change == "dtype":
        t["b_enc"] = torch.zeros(F, dtype=torch.long)
    else:
        t["W_dec"][0, 0] = float("nan")
    save_file(t, path)
    with pytest.raises(ValueError, match=message):
        load_sae(folder)


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    fields = CASES["gated"][0]
    folder = tmp_path / "sae"
    ours = from_saelens(*to_saelens_of(random_saelens(fields)), "mem")
    save_sae(ours, folder, sparsity=torch.full((F,), -2.0))
    (folder / "card.md").write_text("# notes")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import nbfeatures.sae.io as io

    def broken(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_json", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(random_gated_like(ours), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folder left
    monkeypatch.undo()
    save_sae(ours, folder)  # no sparsity this time: the old one must not survive, the card must
    assert sorted(p.name for p in folder.iterdir()) == ["card.md", "cfg.json", "sae_weights.safetensors"]


def to_saelens_of(theirs):
    cfg = theirs.cfg.to_dict()
    return cfg, {k: v.detach() for k, v in theirs.state_dict().items()}


def random_gated_like(sae):
    cfg, tensors = to_saelens(sae)
    return from_saelens({**cfg, "metadata": {"sae_lens_version": "6.0.0"}}, {k: torch.randn_like(v) for k, v in tensors.items()}, "mem")
