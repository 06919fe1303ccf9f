"""The prompt view: per-token features against raw torch hooks on the shipped models, and PromptView driven headless.

Oracles: the site's activations read by a plain torch forward hook on the module (not the site layer), encoded
by the dictionary itself; for a codebook model, every codebook put in place by plain torch pre-hooks.
"""

import re

import numpy as np
import pytest
import torch

import nbfeatures as nbf
from nbfeatures import PromptView, prompt_features, prompt_features_fn, summarize_features, token_strings, zoo
from nbfeatures.sae import deviation_acts, load_sae

pytestmark = pytest.mark.usefixtures("one_thread")

SITE = "blocks.1.hook_resid_pre"
PROMPT = "Once upon a time, a girl saw a red dragon. She was happy."


@pytest.fixture(scope="module")
def stories():
    return nbf.load_model("stories")


@pytest.fixture(scope="module")
def sae():
    return load_sae(zoo.saes("stories")["local_k8"])


@pytest.fixture(scope="module")
def bae():
    return load_sae(zoo.saes("stories")[f"bae_{SITE}"])


@pytest.fixture(scope="module")
def cb():
    return nbf.load_codebook_model("stories-codebook")


def ids_of(model, prompt):
    return nbf.tokenizer_of(model)([prompt], return_tensors="pt")["input_ids"]


def hooked_resid_pre(model, ids, block=1):
    """blocks.{block}.hook_resid_pre by a raw torch forward pre-hook: the block's input hidden states."""
    hf, seen = nbf.unwrap(model), {}

    def hook(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    h = hf.transformer.h[block].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        h.remove()
    return seen["x"][0]


def reference_rank(values_TF, on_TF, score_TF, k):
    """Per token, the features that are on sorted by score (strongest first), the best k: a plain loop."""
    out = []
    for t in range(len(values_TF)):
        on = torch.nonzero(on_TF[t]).flatten().tolist()
        on.sort(key=lambda f: -float(score_TF[t, f]))
        out.append([(f, float(values_TF[t, f])) for f in on[:k]])
    return out


def assert_matches(pf, expected):
    for t, row in enumerate(expected):
        n = len(row)
        assert pf.ids[t, :n].tolist() == [f for f, _ in row], t
        np.testing.assert_allclose(pf.values[t, :n], [v for _, v in row], rtol=1e-5, atol=1e-6)
        assert (pf.ids[t, n:] == -1).all() and (pf.values[t, n:] == 0).all()


# ----------------------------------------------------------------------------- compute side


def test_sae_features_match_a_raw_hook_and_the_saes_encode(stories, sae):
    pf = prompt_features(stories, SITE, sae, PROMPT, k=5)
    ids = ids_of(stories, PROMPT)
    with torch.no_grad():
        latents = sae.encode(hooked_resid_pre(stories, ids))  # [T, F]
    assert pf.tokens == [nbf.tokenizer_of(stories).decode([i]) for i in ids[0].tolist()] and pf.kind == "latents"
    assert pf.ids.shape == (ids.shape[1], 5)
    assert_matches(pf, reference_rank(latents, latents != 0, latents, 5))
    assert (np.diff(pf.values, axis=1) <= 0).all()  # ranked, strongest first
    # every kept feature's full activation row, and the kept set is exactly the union of the per-token top k
    np.testing.assert_allclose(pf.acts, latents[:, torch.as_tensor(pf.features)].numpy(), rtol=1e-5, atol=1e-6)
    assert set(pf.features.tolist()) == set(pf.ids[pf.ids >= 0].tolist())
    best = pf.acts.max(0)
    assert (np.diff(best) <= 1e-6).all()  # the prompt's strongest features first


def test_bae_bits_fire_when_on_or_when_they_leave_their_usual_state(stories, bae):
    ids = ids_of(stories, PROMPT)
    x = hooked_resid_pre(stories, ids)
    with torch.no_grad():
        pre = x @ bae.W_enc + bae.b_enc
    bits = (pre > 0).float()
    F = bae.cfg.d_sae
    pf = prompt_features(stories, SITE, bae, PROMPT, k=F)
    assert pf.kind == "bits"
    assert_matches(pf, reference_rank(bits, bits > 0, pre, F))  # every bit that is on, by its margin
    assert set(np.unique(pf.values[pf.ids >= 0]).tolist()) == {1.0}
    # with each bit's usual rate: a usually-on bit switching off counts, a usually-on bit that stays on does not
    usual = torch.linspace(0.01, 0.99, F)
    dev = deviation_acts(bits, usual)
    pf = prompt_features(stories, SITE, bae, PROMPT, k=F, usual=usual)
    assert_matches(pf, reference_rank(dev, dev > 0, dev, F))
    off_but_usually_on = (bits == 0) & (usual > 0.5)
    assert off_but_usually_on.any() and all(set(torch.nonzero(off_but_usually_on[t]).flatten().tolist()) <= set(pf.ids[t].tolist())
                                            for t in range(len(bits)))


def test_codebook_codes_match_codebooks_put_in_place_by_raw_hooks(cb):
    site = "blocks.1.attn.hook_z"
    layer = cb.layer(site)
    C, G, K = layer.cfg.n_codes, layer.cfg.n_groups, layer.cfg.k
    ids = ids_of(cb.model, PROMPT)
    hf, seen, hooks = nbf.unwrap(cb.model), {}, []

    def quantise(s):
        def hook(module, args):
            z = args[0]
            out = cb.layer(s)(z.reshape(*z.shape[:-1], G, -1))
            if s == site:
                seen["codes"], seen["sims"] = out.codes[0], out.sims[0]
            return (out.x_hat.reshape(z.shape),)
        return hook

    for s in cb.sites:
        hooks.append(hf.transformer.h[int(s.split(".")[1])].attn.c_proj.register_forward_pre_hook(quantise(s)))
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in hooks:
            h.remove()
    flat = seen["codes"] + torch.arange(G)[None, :, None] * C  # [T, G, K] in the g * n_codes + c numbering
    values = torch.zeros(len(flat), G * C).scatter_(1, flat.reshape(len(flat), -1), seen["sims"].reshape(len(flat), -1))
    on = torch.zeros(len(flat), G * C, dtype=torch.bool).scatter_(1, flat.reshape(len(flat), -1), True)
    for pf in (prompt_features(cb, site, None, PROMPT, k=G * K), prompt_features(cb.model, site, cb, PROMPT, k=G * K)):
        assert pf.kind == "codes"
        assert_matches(pf, reference_rank(values, on, values, G * K))
        assert ((pf.ids >= 0).sum(1) == G * K).all()  # every chosen code of every head is listed


def test_a_bare_codebook_layer_reads_the_plain_models_site(stories, cb):
    site = "blocks.1.attn.hook_z"
    layer = cb.layer(site)
    z = nbf.read_acts(stories, PROMPT, site)[site][0]
    with torch.no_grad():
        out = layer(z)
    pf = prompt_features(stories, site, layer, PROMPT, k=3)
    C = layer.cfg.n_codes
    best = (out.codes + torch.arange(layer.cfg.n_groups)[None, :, None] * C).reshape(len(z), -1)
    sims = out.sims.reshape(len(z), -1)
    top = sims.argsort(dim=1, descending=True, stable=True)[:, :3]
    assert pf.ids.tolist() == best.gather(1, top).tolist()


# ----------------------------------------------------------------------------- the panel


@pytest.fixture(scope="module")
def summary(stories, sae):
    corpus = nbf.data.StoryCorpus(seed=1)
    stream = torch.tensor([t for ids in corpus.encode(corpus.generate(60)) for t in ids[:-1]])
    windows = stream[: len(stream) // 64 * 64].view(-1, 64)[:30]
    with torch.no_grad():
        lat = sae(nbf.read_acts(stories, windows, SITE)[SITE]).latents
    return summarize_features(lat, windows, token_strings(stories), W_dec=sae.W_dec.detach(),
                              W_U=nbf.unwrap(stories).lm_head.weight.detach().T)


def test_prompt_view_on_a_shipped_sae(stories, sae, summary):
    fn = prompt_features_fn(stories, SITE, sae, k=6)
    panel = PromptView(fn, card=summary)
    assert panel.result is None and panel.tokens_html.value == ""
    panel.prompt.value = "The dragon was happy"
    assert panel.tokens_html.value == "" and panel.result is None  # nothing runs until Run
    panel.compute_button.click()
    pf = panel.result.raw
    assert pf.tokens == prompt_features(stories, SITE, sae, "The dragon was happy", k=6).tokens
    html = panel.tokens_html.value
    assert "dragon" in html and "happy" in html
    # hovering a token lists its features: the title of token t names its top feature ids in order
    titles = re.findall(r'title="token (\d+)\n([^"]*)"', html)
    assert [int(t) for t, _ in titles] == list(range(len(pf.tokens)))
    for t, body in titles:
        listed = [int(m) for m in re.findall(r"^#(\d+)", body, re.M)]
        assert listed == [f for f in pf.ids[int(t)].tolist() if f >= 0][: len(listed)] and listed
    # the token list is the selected token's features, ranked; its strongest feature's card is open
    t = panel.token.value
    assert [v for _, v in panel.feature.options] == [f for f in pf.ids[t].tolist() if f >= 0]
    assert panel.feature.value == pf.ids[t, 0] and f"<b>feature {pf.ids[t, 0]}</b>" in panel.card_html.value

    other = (t + 1) % len(pf.tokens)
    before = panel.table.value
    panel.token.value = other
    assert panel.table.value != before and f"token {other}:" in panel.table.value
    assert [v for _, v in panel.feature.options] == [f for f in pf.ids[other].tolist() if f >= 0]
    rows = [int(m) for m in re.findall(r"<td>#(\d+)</td>", panel.table.value)]
    assert rows == [f for f in pf.ids[other].tolist() if f >= 0]

    f = panel.feature.options[-1][1]
    panel.feature.value = f  # clicking a feature in the list opens its card
    assert f"<b>feature {f}</b>" in panel.card_html.value and f"feature #{f}" in panel.tokens_html.value
    assert panel.card_html.value.count("top ") >= 1

    panel.prompt.value = "A cat"
    assert "press Run" in panel.status.value
    panel.compute_button.click()
    assert panel.result.tokens[-1] != "happy" and "tokens" in panel.status.value


def synthetic(prompt):
    """A stand-in features_fn: word w fires feature len(w) with value 1 and feature 0 with value 0.5."""
    words = prompt.split()
    T = len(words)
    ids = np.full((T, 2), -1)
    values = np.zeros((T, 2))
    for t, w in enumerate(words):
        ids[t], values[t] = [len(w), 0], [1.0, 0.5]
    features = np.unique(ids[ids >= 0])[::-1]
    acts = np.array([[1.0 if len(w) == f else 0.5 if f == 0 else 0.0 for f in features] for w in words])
    return {"tokens": words, "ids": ids, "values": values, "features": features, "acts": acts}


def test_prompt_view_headless_without_a_model():
    cards = []

    def card(f):
        cards.append(f)
        raise ValueError(f"feature {f} has no card here")

    panel = PromptView(synthetic, names={0: "always", 3: "three letters"}, prompt="the quick fox")
    assert panel.token.max == 2 and "no feature cards" in panel.card_html.value
    assert panel.feature.options[0][0].endswith("three letters") and panel.feature.value == 3
    panel.token.value = 1  # "quick": feature 3 is not on here, so its strongest (5) is selected
    assert panel.feature.value == 5 and [v for _, v in panel.feature.options] == [5, 0]
    panel.feature.value = 0
    panel.token.value = 2  # "fox": feature 0 fires here too, so it stays selected
    assert panel.feature.value == 0 and "feature #0 · always" in panel.tokens_html.value
    panel = PromptView(synthetic, card=card, prompt="")
    panel.prompt.value = "a bb"
    with pytest.raises(ValueError, match="has no card here"):
        panel.compute()
    assert "has no card here" in panel.status.value and cards


def test_prompt_view_bad_input_is_named(stories, sae):
    with pytest.raises(TypeError, match="features_fn must be a callable"):
        PromptView("not a function")
    with pytest.raises(TypeError, match="card must be None, a callable"):
        PromptView(synthetic, card=3)
    panel = PromptView(lambda p: {"tokens": ["a"], "ids": [[1]], "values": [[1.0]]})
    panel.prompt.value = "a"
    with pytest.raises(ValueError, match="without 'features'; it needs tokens, ids, values, features, acts"):
        panel.compute()
    assert "features" in panel.status.value and panel.result is None
    with pytest.raises(ValueError, match="no prompt read yet"):
        PromptView(synthetic).show_token(0)
    panel = PromptView(synthetic, prompt="a b")
    with pytest.raises(ValueError, match=r"token must be a position in 0..1, got 5"):
        panel.show_token(5)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, s, b: prompt_features(m, SITE, s, ""), ValueError, "prompt is empty"),
    (lambda m, s, b: prompt_features(m, SITE, s, "  \n"), ValueError, "prompt is empty"),
    (lambda m, s, b: prompt_features(m, SITE, s, 3), TypeError, "prompt must be a str"),
    (lambda m, s, b: prompt_features(m, SITE, s, "a", k=0), ValueError, r"k \(features kept per token\) must be an integer >= 1; got 0"),
    (lambda m, s, b: prompt_features_fn(m, SITE, s, k=2.0), TypeError, r"k \(features kept per token\) must be an integer"),
    (lambda m, s, b: prompt_features_fn(m, "blocks.1.mlp.hook_post", s), ValueError,
     r"expects inputs of width d_in=128, but site 'blocks.1.mlp.hook_post' has width 512"),
    (lambda m, s, b: prompt_features_fn(m, "blocks.9.hook_resid_pre", s), ValueError, "unknown site"),
    (lambda m, s, b: prompt_features_fn(m, SITE, None), ValueError, "dictionary is None"),
    (lambda m, s, b: prompt_features_fn(m, SITE, s, usual=torch.zeros(512)), ValueError, "usual .* is for a BinaryAE"),
    (lambda m, s, b: prompt_features_fn(m, SITE, b, usual=torch.zeros(3)), ValueError, r"usual must be a tensor \[512\]"),
])  # fmt: skip
def test_bad_input(stories, sae, bae, call, error, message):
    with pytest.raises(error, match=message):
        call(stories, sae, bae)


def test_bad_codebook_input(stories, cb):
    with pytest.raises(ValueError, match=r"no codebook at 'blocks.1.hook_resid_pre'; codebooks are at"):
        prompt_features_fn(cb, SITE, None)
    with pytest.raises(ValueError, match="pass it \\(or its .model\\) as model too"):
        prompt_features(stories, "blocks.1.attn.hook_z", cb, "a")
