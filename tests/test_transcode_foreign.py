"""Transcode (read one site, replace a later one) against raw torch hooks; foreign dictionaries (SAELens, sparsify,
anything with encode/decode) spliced, evaluated and summarised like ours; decoder rows in either orientation."""

import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbfeatures as nbf
from conftest import VOCAB, tiny_hf, word_tokenizer
from nbfeatures import sites
from nbfeatures.edits import EncodeDecode, Splice, Transcode, as_dictionary, decoder_rows
from nbfeatures.evals import evaluate_sae
from nbfeatures.features import summarize_features
from nbfeatures.steering import steering_fn

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig  # noqa: E402

IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
LN2 = {"gpt2": "transformer.h.1.ln_2", "gpt_neox": "gpt_neox.layers.1.post_attention_layernorm",
       "llama": "model.layers.1.post_attention_layernorm"}
MLP = {"gpt2": "transformer.h.1.mlp", "gpt_neox": "gpt_neox.layers.1.mlp", "llama": "model.layers.1.mlp"}


class Out(NamedTuple):
    x_hat: torch.Tensor
    latents: torch.Tensor


class TinyTranscoder(nn.Module):
    """relu(x W_enc) W_dec, scaled up so that it changes what the model predicts."""

    def __init__(self, d_in=32, d_sae=48, d_out=32, scale=3.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.W_dec = nn.Parameter(scale * torch.randn(d_sae, d_out, generator=g) / d_sae**0.5)

    def forward(self, x):
        latents = torch.relu(x @ self.W_enc)
        return Out(latents @ self.W_dec, latents)


def transcoded_by_hooks(hf_model, arch, transcoder, ids):
    """The obvious implementation: keep ln2's output, replace the MLP's output by transcoder(it)."""
    kept = {}
    ln = hf_model.get_submodule(LN2[arch]).register_forward_hook(lambda m, a, out: kept.update(x=out))
    mlp = hf_model.get_submodule(MLP[arch]).register_forward_hook(lambda m, a, out: transcoder(kept["x"]).x_hat)
    try:
        with torch.no_grad():
            return hf_model(ids).logits
    finally:
        ln.remove(), mlp.remove()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB - 1, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gpt2():
    hf = tiny_hf("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf, sites.wrap(hf, tokenizer=word_tokenizer())


def sae(kind="standard", d_in=32, d_sae=64, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "standard":
        return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, **kw))
    if kind == "jumprelu":
        s = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, **kw))
        with torch.no_grad():
            s.threshold.fill_(0.05)
        return s
    s = SkipTranscoder(SkipTranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_in, apply_b_dec_to_input=False, **kw))
    with torch.no_grad():
        s.W_skip.normal_(0, 0.1)  # zeros at init: made nonzero so the skip path is tested
    return s


# ----------------------------------------------------------------------------- Transcode


def test_transcode_equals_raw_hooks_and_error_term_keeps_logits(arch, model, hf_model, ids):
    tc = TinyTranscoder()
    out = sites.run(model, ids, [Transcode(IN, OUT, tc)], read=[IN])
    expected = transcoded_by_hooks(hf_model, arch, tc, ids)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    clean = hf_model(ids).logits
    assert not torch.allclose(out.logits, clean, atol=1e-3)
    torch.testing.assert_close(out.outputs[OUT].latents, tc(out.acts[IN]).latents)

    kept = sites.run(model, ids, [Transcode(IN, OUT, tc, error_term=True)], read=[OUT])
    assert torch.equal(kept.logits, sites.run(model, ids).logits)
    x_in = sites.read_acts(model, ids, [IN])[IN]
    assert torch.equal(kept.outputs[OUT].latents, tc(x_in).latents) and kept.outputs[OUT].latents.shape == (2, 7, 48)


def test_transcode_positions_and_gradient_through_x_hat(gpt2, ids):
    _, model = gpt2
    tc = TinyTranscoder()
    some = sites.run(model, ids, [Transcode(IN, OUT, tc, positions=[2])], read=[OUT]).acts[OUT]
    clean = sites.read_acts(model, ids, [OUT, IN])
    torch.testing.assert_close(some[:, 2], tc(clean[IN][:, 2]).x_hat)
    assert torch.equal(some[:, [0, 1, 3, 4, 5, 6]], clean[OUT][:, [0, 1, 3, 4, 5, 6]])

    out = sites.run(model, ids, [Transcode(IN, OUT, tc, error_term=True)])
    out.logits.sum().backward()
    assert tc.W_dec.grad is not None and tc.W_dec.grad.abs().sum() > 0


def test_transcode_in_generate_equals_a_raw_hook_greedy_loop(arch, model, hf_model):
    tc = TinyTranscoder(scale=6.0)
    prompt = torch.tensor([[5, 9, 2, 11]])
    out = sites.generate(model, prompt, [Transcode(IN, OUT, tc)], max_new_tokens=5)
    seq = prompt
    for _ in range(5):  # the whole sequence each step: no KV cache in the reference
        seq = torch.cat([seq, transcoded_by_hooks(hf_model, arch, tc, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tokens.tolist() == seq.tolist()
    assert out.tokens.tolist() != sites.generate(model, prompt, [], max_new_tokens=5).tokens.tolist()
    assert [o[OUT].latents.shape[1] for o in out.outputs] == [4] + [1] * (len(out.outputs) - 1)  # KV-cache steps: T=1


def test_bad_transcode_pairs_are_refused_by_name(gpt2, ids):
    _, model = gpt2
    tc = TinyTranscoder()
    with pytest.raises(ValueError, match=f"in-site {OUT} must run before its out-site {IN}"):
        sites.run(model, ids, [Transcode(OUT, IN, tc)])
    with pytest.raises(ValueError, match=f"in-site {OUT} must run before its out-site {OUT}"):
        sites.run(model, ids, [Transcode(OUT, OUT, tc)])
    with pytest.raises(ValueError, match=f"Transcode {IN} -> {OUT}: the transcoder reads width 16 but {IN} has width 32"):
        sites.run(model, ids, [Transcode(IN, OUT, sae("skip", d_in=16))])
    with pytest.raises(ValueError, match=f"Transcode {IN} -> {OUT}: replacement has shape \\[2, 7, 8\\], expected \\[2, 7, 32\\]"):
        sites.run(model, ids, [Transcode(IN, OUT, TinyTranscoder(d_out=8))])
    with pytest.raises(ValueError, match="blocks.9.hook_mlp_out"):
        sites.run(model, ids, [Transcode(IN, "blocks.9.hook_mlp_out", tc)])
    with pytest.raises(ValueError, match="needs the value of"):
        Transcode(IN, OUT, tc).apply(torch.zeros(1, 2, 32), torch.ones(2, dtype=torch.bool))
    assert isinstance(Transcode(IN, OUT, tc), nbf.Edit) and Transcode(IN, OUT, tc).site == OUT


# ----------------------------------------------------------------------------- foreign dictionaries


@pytest.mark.parametrize("kind", ["standard", "jumprelu"])
def test_a_saelens_sae_spliced_exposes_its_own_encode_and_decode(gpt2, ids, kind):
    hf, model = gpt2
    site = "blocks.0.hook_resid_post"
    s = sae(kind)
    x = sites.read_acts(model, ids, [site])[site]
    kept = sites.run(model, ids, [Splice(site, s, error_term=True)])
    latents = kept.outputs[site].latents
    assert latents.shape == (2, 7, 64) and (latents != 0).any()
    torch.testing.assert_close(latents, s.encode(x))
    torch.testing.assert_close(kept.outputs[site].x_hat, s.decode(s.encode(x)))
    assert torch.equal(kept.logits, sites.run(model, ids).logits)

    def hook(module, args, out):
        return (s(out[0]), *out[1:]) if isinstance(out, tuple) else s(out)

    handle = hf.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = hf(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(sites.run(model, ids, [Splice(site, s)]).logits, expected, atol=1e-5, rtol=1e-5)


def test_saelens_sae_of_another_dtype_is_cast_both_ways(gpt2, ids):
    _, model = gpt2
    site = "blocks.0.hook_resid_post"
    s = sae(dtype="float64")
    x = sites.read_acts(model, ids, [site])[site]
    out = sites.run(model, ids, [Splice(site, s)], read=[site])
    assert out.acts[site].dtype == torch.float32 and out.outputs[site].latents.dtype == torch.float64
    torch.testing.assert_close(out.outputs[site].latents, s.encode(x.double()))


def test_a_saelens_skip_transcoder_matches_its_own_forward(gpt2, ids):
    _, model = gpt2
    t = sae("skip")
    x_in = sites.read_acts(model, ids, [IN])[IN]
    out = sites.run(model, ids, [Transcode(IN, OUT, t)], read=[OUT])
    torch.testing.assert_close(out.acts[OUT], t(x_in))  # SAELens's forward adds x W_skip^T; decode does not
    torch.testing.assert_close(out.outputs[OUT].latents, t.encode(x_in))


def test_a_sparsify_sparse_coder_gives_dense_latents_and_its_own_x_hat(gpt2, ids):
    sparsify = pytest.importorskip("sparsify")
    _, model = gpt2
    site = "blocks.0.hook_resid_post"
    torch.manual_seed(0)
    sc = sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=64, k=4))
    x = sites.read_acts(model, ids, [site])[site]
    out = sites.run(model, ids, [Splice(site, sc)]).outputs[site]
    ref = sc(x.reshape(-1, 32))
    torch.testing.assert_close(out.x_hat.reshape(-1, 32), ref.sae_out)
    latents = out.latents.reshape(-1, 64)
    assert out.latents.shape == (2, 7, 64) and bool(((latents != 0).sum(1) <= 4).all())
    torch.testing.assert_close(latents.gather(1, ref.latent_indices), ref.latent_acts)
    assert decoder_rows(sc).shape == (64, 32)


def test_any_object_with_encode_and_decode_is_a_dictionary(gpt2, ids):
    class Halves:  # not even a module, nor callable
        def encode(self, x):
            return torch.relu(x)

        def decode(self, z):
            return z / 2

    _, model = gpt2
    site = "blocks.0.hook_resid_post"
    x = sites.read_acts(model, ids, [site])[site]
    out = sites.run(model, ids, [Splice(site, Halves())], read=[site])
    assert torch.equal(out.acts[site], torch.relu(x) / 2) and torch.equal(out.outputs[site].latents, torch.relu(x))
    tc = TinyTranscoder()
    assert as_dictionary(tc) is tc and isinstance(as_dictionary(sae()), EncodeDecode)
    with pytest.raises(ValueError, match="callable.*encode/decode"):
        as_dictionary(3)


# ----------------------------------------------------------------------------- evaluate_sae


class Native(nn.Module):
    """A SAELens SAE seen through its own encode / decode, the way evaluate_sae already took dictionaries."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        z = self.s.encode(x)
        return Out(self.s.decode(z), z)


def test_evaluate_sae_takes_a_saelens_sae(gpt2):
    _, model = gpt2
    tokens = torch.randint(0, VOCAB - 1, (6, 8), generator=torch.Generator().manual_seed(2))
    s = sae()
    r = evaluate_sae(model, s, "blocks.0.hook_resid_post", tokens, batch_size=4)
    ref = evaluate_sae(model, Native(s), "blocks.0.hook_resid_post", tokens, batch_size=4)
    assert r["density"].shape == (64,) and torch.equal(r["density"], ref["density"])
    for k in ("ce_sae", "kl", "fvu", "l0"):
        assert r[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9)


def test_evaluate_sae_with_in_site_evaluates_a_transcoder(arch, model, hf_model):
    tokens = torch.randint(0, VOCAB - 1, (6, 8), generator=torch.Generator().manual_seed(2))
    mlp = tiny_hf(arch).get_submodule(MLP[arch])  # the same weights (same seed) in a module nnsight has not wrapped

    class TheMLP(nn.Module):  # the MLP itself as a transcoder: nothing lost
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return Out(self.mlp(x), x)

    r = evaluate_sae(model, TheMLP(), OUT, tokens, in_site=IN, batch_size=4)
    assert r["ce_recovered"] == pytest.approx(1.0) and r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["fvu"] == pytest.approx(0.0, abs=1e-8)

    t = sae("skip")
    r = evaluate_sae(model, t, OUT, tokens, in_site=IN, batch_size=4)
    logits = sites.run(model, tokens, [Transcode(IN, OUT, t)]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).item()
    assert r["ce_sae"] == pytest.approx(ce, rel=1e-5) and r["density"].shape == (64,) and r["fvu"] > 0


# ----------------------------------------------------------------------------- decoder rows, summaries, steering


def test_decoder_rows_in_either_orientation_give_the_same_summary():
    g = torch.Generator().manual_seed(3)
    F_, D, V = 6, 5, 20
    W_dec, W_U = torch.randn(F_, D, generator=g), torch.randn(D, V, generator=g)
    acts = torch.rand(30, F_, generator=g) * (torch.rand(30, F_, generator=g) > 0.5)
    vocab = [f"t{i}" for i in range(V)]
    rows = summarize_features(acts, torch.zeros(30, dtype=torch.long), vocab, W_dec=W_dec, W_U=W_U)
    cols = summarize_features(acts, torch.zeros(30, dtype=torch.long), vocab, W_dec=W_dec.T.contiguous(), W_U=W_U)
    linear = nn.Linear(F_, D, bias=False)  # dictionary_learning keeps its decoder as a Linear: weight [D, F]
    linear.weight.data.copy_(W_dec.T)
    holder = nn.Module()
    holder.decoder = linear
    held = summarize_features(acts, torch.zeros(30, dtype=torch.long), vocab, W_dec=holder, W_U=W_U)
    for s in (cols, held):
        assert list(s.table["top_logits"]) == list(rows.table["top_logits"])
        assert s.card(2).pos_tokens == rows.card(2).pos_tokens
    with pytest.raises(ValueError, match="same D.*neither \\[F, D\\] nor \\[D, F\\] with D=5 and F=6"):
        summarize_features(acts, torch.zeros(30, dtype=torch.long), vocab, W_dec=torch.zeros(6, 4), W_U=W_U)


def test_decoder_rows_of_dictionaries_and_square_matrices():
    s = sae(d_in=32, d_sae=64)
    assert torch.equal(decoder_rows(s), s.W_dec.detach()) and torch.equal(decoder_rows(s.W_dec.T, d=32), s.W_dec.detach())
    assert torch.equal(decoder_rows(as_dictionary(s)), s.W_dec.detach())
    square = torch.randn(8, 8)
    assert torch.equal(decoder_rows(square, d=8), square)  # fits both ways: taken as [F, D]
    with pytest.raises(ValueError, match="no decoder matrix"):
        decoder_rows(nn.Identity())
    with pytest.raises(ValueError, match="neither \\[F, D\\] nor \\[D, F\\] with D=7"):
        decoder_rows(torch.zeros(3, 4), d=7)


def test_summary_and_steering_take_a_saelens_sae_as_is(gpt2, ids):
    hf, model = gpt2
    site = "blocks.0.hook_resid_post"
    s = sae()
    latents = sites.run(model, ids, [Splice(site, s, error_term=True)]).outputs[site].latents
    W_U = hf.lm_head.weight.T
    vocab = [f"w{i}" for i in range(VOCAB)]
    a = summarize_features(latents.detach(), ids, vocab, W_dec=s, W_U=W_U)
    b = summarize_features(latents.detach(), ids, vocab, W_dec=s.W_dec.T, W_U=W_U)
    assert list(a.table["top_logits"]) == list(b.table["top_logits"]) and len(a) == 64

    by_rows = steering_fn(model, site, s.W_dec, max_new_tokens=2)("w1 w2 w3", 5, 20.0)
    by_sae = steering_fn(model, site, s, max_new_tokens=2)("w1 w2 w3", 5, 20.0)
    by_cols = steering_fn(model, site, s.W_dec.T, max_new_tokens=2)("w1 w2 w3", 5, 20.0)
    for other in (by_sae, by_cols):
        assert other.tokens == by_rows.tokens and torch.equal(other.probs, by_rows.probs)


def test_harvest_reads_the_model_with_a_transcoder_in_place():
    from nbfeatures import harvest
    from nbfeatures.edits import Transcode

    model = sites.wrap(tiny_hf("gpt2"), word_tokenizer())
    torch.manual_seed(0)
    tc = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    edit = Transcode("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", tc)
    tokens = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    got = harvest(model, tokens, "blocks.1.hook_resid_pre", edits=[edit], drop_first=False, progress=False)["blocks.1.hook_resid_pre"]
    with torch.no_grad():
        want = sites.run(model, tokens, [edit], read=["blocks.1.hook_resid_pre"]).acts["blocks.1.hook_resid_pre"].flatten(0, 1)
    clean = harvest(model, tokens, "blocks.1.hook_resid_pre", drop_first=False, progress=False)["blocks.1.hook_resid_pre"]
    assert torch.equal(got, want) and not torch.allclose(got, clean)
