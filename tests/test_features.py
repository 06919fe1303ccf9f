"""Feature gallery data: summary statistics and cards against hand-made cases and direct computations."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from nbfeatures.features import sparse_from_topk, summarize_features
from nbfeatures.metrics import precision_recall

VOCAB = [f"t{i}" for i in range(20)]


def planted():
    """2 sequences x 6 tokens, 3 features: f0 fires twice, f1 never, f2 fires on label 'red' plus one more token."""
    tokens = torch.arange(12).reshape(2, 6)
    acts = torch.zeros(2, 6, 3)
    acts[0, 1, 0], acts[1, 4, 0] = 1.0, 3.0
    red = torch.zeros(2, 6, dtype=torch.long)
    red[0, 2:5] = 1
    red[1, 0] = 1  # 4 red tokens; f2 catches 3 of them and one other token
    acts[0, 2:5, 2] = torch.tensor([0.5, 2.0, 1.5])
    acts[1, 5, 2] = 0.25
    labels = torch.where(red.bool(), 1, 0).reshape(-1)  # class 0 = "other", 1 = "red"
    return acts, tokens, labels


def test_summary_on_a_planted_matrix():
    acts, tokens, labels = planted()
    s = summarize_features(acts, tokens, VOCAB, labels=labels, label_names=["other", "red"], context=(2, 1))
    t = s.table
    assert t.index.name == "feature" and list(t.index) == [0, 1, 2]
    np.testing.assert_allclose(t["density"], [2 / 12, 0, 4 / 12])
    np.testing.assert_allclose(t["max_act"], [3.0, 0.0, 2.0])
    np.testing.assert_allclose(t["mean_act"], [2.0, 0.0, 4.25 / 4])
    assert list(t["n_fires"]) == [2, 0, 4]
    assert t.loc[0, "top_tokens"] == "t10 t1" and t.loc[1, "top_tokens"] == ""
    # f2 fires on 4 tokens, 3 of them red (4 red tokens in all)
    assert t.loc[2, "best_label"] == "red"
    assert t.loc[2, "precision"] == pytest.approx(3 / 4) and t.loc[2, "recall"] == pytest.approx(3 / 4)
    assert t.loc[1, "best_label"] is None


def test_top_contexts_stop_at_the_sequence_boundary():
    acts, tokens, labels = planted()
    card = summarize_features(acts, tokens, VOCAB, context=(2, 1)).card(0)
    first, second = card.top
    assert (first.seq, first.pos, first.act) == (1, 4, 3.0)
    assert first.tokens == ["t8", "t9", "t10", "t11"] and first.center == 2
    np.testing.assert_allclose(first.acts, [0, 0, 3.0, 0])
    assert (second.seq, second.pos) == (0, 1) and second.tokens == ["t0", "t1", "t2"] and second.center == 1
    card2 = summarize_features(acts, tokens, VOCAB, context=(2, 1)).card(2)
    last = card2.top[-1]  # seq 1, pos 5: no token after it in its sequence
    assert (last.seq, last.pos) == (1, 5) and last.tokens == ["t9", "t10", "t11"]


def test_shuffled_flat_tokens_with_seq_and_pos_give_the_same_contexts():
    acts, tokens, _ = planted()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    seq, pos = torch.arange(2).repeat_interleave(6), torch.arange(6).repeat(2)
    s = summarize_features(acts.reshape(12, 3)[perm], tokens.reshape(-1)[perm], VOCAB, seq=seq[perm], pos=pos[perm], context=(2, 1))
    ref = summarize_features(acts, tokens, VOCAB, context=(2, 1))
    pd.testing.assert_frame_equal(s.table, ref.table)
    for a, b in zip(s.card(0).top, ref.card(0).top):
        assert a.tokens == b.tokens and a.center == b.center and (a.seq, a.pos) == (b.seq, b.pos)


def random_case(seed=0, N=400, F=24, C=5):
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(N, F, generator=g) - 1.2)
    tokens = torch.randint(0, len(VOCAB), (N,), generator=g)
    labels = torch.randint(-1, C, (N,), generator=g)
    return acts, tokens, labels


def test_dense_chunked_and_sparse_inputs_agree():
    acts, tokens, labels = random_case()
    kw = dict(labels=labels, label_names=list("abcde"))
    one = summarize_features(acts, tokens, VOCAB, **kw)
    chunked = summarize_features(acts, tokens, VOCAB, chunk_elements=7 * acts.shape[1], **kw)  # 7 rows per block
    sparse = summarize_features(acts.to_sparse(), tokens, VOCAB, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = summarize_features(acts.to_sparse_csr(), tokens, VOCAB, **kw)
    for other in (chunked, sparse, csr):
        pd.testing.assert_frame_equal(one.table, other.table, check_exact=False, rtol=1e-6)
        for f in (0, 5, 23):
            a, b = one.card(f), other.card(f)
            assert [c.pos for c in a.top] == [c.pos for c in b.top]
            np.testing.assert_array_equal(a.hist_counts, b.hist_counts)


def test_summary_statistics_against_direct_torch():
    acts, tokens, labels = random_case(1)
    s = summarize_features(acts, tokens, VOCAB, labels=labels, chunk_elements=50 * 24)
    fires = acts != 0
    np.testing.assert_allclose(s.table["density"], fires.float().mean(0).double(), rtol=1e-6)
    np.testing.assert_allclose(s.table["max_act"], acts.amax(0).double(), rtol=1e-6)
    mean = (acts.sum(0) / fires.sum(0).clamp_min(1)).double()
    np.testing.assert_allclose(s.table["mean_act"], mean, rtol=1e-5)
    onehot = torch.zeros(len(labels), 5)
    onehot[labels >= 0, labels[labels >= 0]] = 1
    p, r = precision_recall(fires, onehot)
    f1 = 2 * p * r / (p + r).clamp_min(1e-12)
    best = f1.argmax(1)
    assert list(s.table["best_label"]) == [f"label {c}" for c in best.tolist()]
    np.testing.assert_allclose(s.table["precision"], p.gather(1, best[:, None])[:, 0], rtol=1e-6)
    np.testing.assert_allclose(s.table["recall"], r.gather(1, best[:, None])[:, 0], rtol=1e-6)


def test_sparse_from_topk_matches_the_dense_latents():
    from nbfeatures.sae.topk import TopKConfig, TopKSAE

    sae = TopKSAE(TopKConfig(d_in=8, d_sae=32, k=4))
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sae(x)
    tokens = torch.randint(0, 20, (50,))
    dense = summarize_features(out.latents, tokens, VOCAB)
    sparse = summarize_features(sparse_from_topk(out.acts, out.indices, 32), tokens, VOCAB)
    pd.testing.assert_frame_equal(dense.table, sparse.table, check_exact=False, rtol=1e-6)


def test_quantile_samples_and_histogram():
    N = 100
    acts = torch.zeros(N + 20, 1)
    acts[:N, 0] = torch.arange(1, N + 1).float()  # 1..100, then 20 tokens where it is off
    s = summarize_features(acts, torch.zeros(N + 20, dtype=torch.long), VOCAB, n_quantiles=4, per_quantile=3, bins=10)
    card = s.card(0)
    edges = np.quantile(np.arange(1, N + 1), [0, 0.25, 0.5, 0.75, 1.0])
    assert len(card.quantiles) == 4
    for (label, samples), lo, hi in zip(card.quantiles, edges[::-1][1:], edges[::-1][:-1]):  # top quantile first
        assert len(samples) == 3 and "25 tokens" in label
        assert all(lo <= c.act <= hi for c in samples)
        assert [c.act for c in samples] == sorted((c.act for c in samples), reverse=True)
    counts, hist_edges = np.histogram(np.arange(1, N + 1), bins=10)
    np.testing.assert_array_equal(card.hist_counts, counts)
    np.testing.assert_allclose(card.hist_edges, hist_edges)
    assert card.hist_counts.sum() == N  # zeros are not in the histogram
    assert s.card(0) is card  # cached
    assert [c.act for c in card.top[:3]] == [100.0, 99.0, 98.0]


def test_top_output_tokens_equal_W_dec_times_W_U():
    g = torch.Generator().manual_seed(3)
    F, D, V = 6, 5, len(VOCAB)
    W_dec, W_U = torch.randn(F, D, generator=g), torch.randn(D, V, generator=g)
    acts = torch.rand(30, F, generator=g)
    s = summarize_features(acts, torch.zeros(30, dtype=torch.long), VOCAB, W_dec=W_dec, W_U=W_U, n_output=4, n_summary_tokens=2)
    logits = W_dec @ W_U
    for f in range(F):
        card = s.card(f)
        order = torch.argsort(logits[f], descending=True)
        assert card.pos_tokens == [VOCAB[i] for i in order[:4]]
        np.testing.assert_allclose(card.pos_values, logits[f, order[:4]], rtol=1e-5)
        assert card.neg_tokens == [VOCAB[i] for i in order.flip(0)[:4]]
        np.testing.assert_allclose(card.neg_values, logits[f, order.flip(0)[:4]], rtol=1e-5)
        assert s.table.loc[f, "top_logits"] == " ".join(VOCAB[i] for i in order[:2])


def test_decode_may_be_a_callable_and_cards_without_extras():
    acts, tokens, _ = planted()
    s = summarize_features(acts, tokens, lambda i: f"<{i}>")
    card = s.card(0)
    assert card.top[0].tokens[card.top[0].center] == "<10>"
    assert card.pos_tokens == [] and card.best_label is None and np.isnan(card.precision)
    dead = s.card(1)
    assert dead.top == [] and dead.quantiles == [] and dead.hist_counts.sum() == 0


def test_bad_inputs_name_what_is_allowed():
    acts, tokens, labels = planted()
    with pytest.raises(ValueError, match="same N=12"):
        summarize_features(acts[:1], tokens, VOCAB)
    with pytest.raises(ValueError, match="both W_dec"):
        summarize_features(acts, tokens, VOCAB, W_dec=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same D"):
        summarize_features(acts, tokens, VOCAB, W_dec=torch.zeros(3, 4), W_U=torch.zeros(5, 20))
    with pytest.raises(ValueError, match="class id 1 but 1 label names"):
        summarize_features(acts, tokens, VOCAB, labels=labels, label_names=["only one"])
    with pytest.raises(ValueError, match="2 label names for 3 labels"):
        summarize_features(acts, tokens, VOCAB, labels=torch.zeros(12, 3), label_names=["a", "b"])
    with pytest.raises(ValueError, match="integer class ids"):
        summarize_features(acts, tokens, VOCAB, labels=labels.float())
    with pytest.raises(ValueError, match="out of range.*0..2"):
        summarize_features(acts, tokens, VOCAB).card(3)
