"""Ground-truth evaluations: each recovers what was planted (story concepts, a planted absorption, sparse directions)."""

import sys

import pytest
import torch

from nbfeatures.data.stories import HIERARCHY, StoryCorpus, story_windows
from nbfeatures.evals import (absorption, best_cosine, compare_detection, concept_detection, mcc, planted_directions,
                              sparse_probing, split_halves)
from nbfeatures.evals.truth import _greedy_match
from nbfeatures.sae.topk import TopKConfig, TopKSAE
from nbfeatures.train import TrainConfig, train_sae

CORPUS = StoryCorpus(seed=0)
IDS = story_windows(0, 200, 64).reshape(-1)  # ~19k tokens
LABELS = {k: v.reshape(-1) for k, v in CORPUS.concept_labels(IDS[None]).items()}
CHILDREN = {p: CORPUS.child_labels(IDS, p) for p in HIERARCHY}
PERFECT = torch.stack([LABELS[c].float() for c in LABELS], -1)  # latent i is concept i


def random_latents(seed, n_latents=128, density=0.5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(IDS), n_latents, generator=g)
    return torch.relu(z - torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - density)))


# ---------------------------------------------------------------- splits


def test_splits_are_disjoint_halves_and_seeded():
    a, b = split_halves(101, seed=3)
    assert len(a) == 50 and len(b) == 51 and not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(101))
    assert torch.equal(a, split_halves(101, seed=3)[0]) and not torch.equal(a, split_halves(101, seed=4)[0])


# ---------------------------------------------------------------- (a) concept detection


@pytest.mark.parametrize("best_threshold", [False, True])
def test_perfect_dictionary_detects_every_concept(best_threshold):
    d = concept_detection(PERFECT, LABELS, best_threshold=best_threshold)
    assert list(d.table.index) == list(LABELS) and d.mean_f1 == 1.0
    assert d.table["latent"].tolist() == list(range(len(LABELS)))
    assert (d.table["precision"] == 1).all() and (d.table["recall"] == 1).all()


def test_detection_finds_a_buried_concept_latent_and_scores_it_held_out():
    z = random_latents(0)
    month = LABELS["month"]
    z[:, 17] = month * (1.0 + torch.rand(len(month), generator=torch.Generator().manual_seed(1)))
    z[month.nonzero()[::4, 0], 17] = 0  # every 4th month token missed: recall 3/4, precision 1
    row = concept_detection(z, {"month": month}).table.loc["month"]
    assert row["latent"] == 17 and row["precision"] == 1.0
    assert 0.7 < row["recall"] < 0.8 and row["f1"] == pytest.approx(2 * row["recall"] / (1 + row["recall"]))
    # Scored on the other half: exactly the tokens split_halves left for scoring.
    _, score = split_halves(len(z), 0)
    assert row["n_pos"] == int(month[score].sum())


def test_random_dictionaries_score_at_the_baseline():
    table = compare_detection({"perfect": PERFECT, "random": random_latents(0), "random2": random_latents(1)}, LABELS)
    assert list(table.columns) == ["perfect", "random", "random2"] and table.index[-1] == "mean"
    assert table.loc["mean", "perfect"] == 1.0
    # A dense random latent's F1 is about 2p / (1 + 2p) for a concept of frequency p: near zero, the same for both.
    assert table.loc["mean", "random"] < 0.15 and abs(table.loc["mean", "random"] - table.loc["mean", "random2"]) < 0.03
    thresholded = compare_detection({"random": random_latents(0)}, LABELS, best_threshold=True)
    assert thresholded.loc["mean", "random"] < 0.15


# ---------------------------------------------------------------- (b) absorption


def absorbing_dictionary(cos_sign=1.0):
    """Latent 0: "month" except on January (absorbed); latent 1: January; latents 2..: the other concepts."""
    jan = CHILDREN["month"] == 0
    others = [c for c in LABELS if c != "month"]
    z = torch.stack([LABELS["month"] & ~jan, jan] + [LABELS[c] for c in others], -1).float()
    W_dec = torch.eye(z.shape[1], 16)
    W_dec[1] = torch.eye(16)[1] + cos_sign * torch.eye(16)[0]  # January's row leans on (or away from) "month"
    return z, W_dec


def test_perfect_dictionary_has_no_absorption():
    r = absorption(PERFECT, CHILDREN, torch.eye(PERFECT.shape[1]), child_names=HIERARCHY)
    assert list(r.parents.index) == list(HIERARCHY) and r.mean == 0.0
    assert (r.parents["recall"] == 1).all() and (r.parents["n_absorbers"] == 0).all()
    assert r.parents.loc["month", "latent"] == list(LABELS).index("month")
    assert set(r.children.loc["month"].index) == set(HIERARCHY["month"])


def test_a_planted_absorption_is_measured_exactly():
    z, W_dec = absorbing_dictionary()
    r = absorption(z, CHILDREN, W_dec, child_names=HIERARCHY)
    _, score = split_halves(len(z), 0)
    month, jan = CHILDREN["month"][score] >= 0, CHILDREN["month"][score] == 0
    assert r.parents.loc["month", "latent"] == 0 and r.parents.loc["month", "n"] == int(month.sum())
    assert r.parents.loc["month", "absorption"] == pytest.approx(int(jan.sum()) / int(month.sum()))
    assert r.parents.loc["month", "recall"] == pytest.approx(1 - int(jan.sum()) / int(month.sum()))
    kids = r.children.loc["month"]
    assert kids.loc["January", "absorption"] == 1.0 and kids.loc["January", "absorbers"] == (1,)
    assert (kids.drop("January")["absorption"] == 0).all() and (kids.drop("January")["recall"] == 1).all()
    assert r.parents.drop("month")["absorption"].eq(0).all()


def test_absorption_needs_an_aligned_decoder_row():
    z, W_dec = absorbing_dictionary(cos_sign=-1.0)  # January's latent points away from "month": not absorption
    r = absorption(z, CHILDREN, W_dec)
    assert r.parents.loc["month", "absorption"] == 0.0 and r.parents.loc["month", "recall"] < 1
    # ... unless the parent direction (say a probe's) says otherwise.
    probe = {p: -torch.eye(16)[0] if p == "month" else torch.eye(16)[0] for p in HIERARCHY}
    assert absorption(z, CHILDREN, W_dec, directions=probe).parents.loc["month", "absorption"] > 0


def test_random_dictionary_absorbs_nothing():
    z = random_latents(2, density=0.05)
    r = absorption(z, CHILDREN, torch.randn(z.shape[1], 16, generator=torch.Generator().manual_seed(0)))
    assert r.mean == 0.0 and (r.parents["n_absorbers"] == 0).all()


# ---------------------------------------------------------------- (c) sparse probing


def test_sparse_probes_on_perfect_latents_are_exact_and_on_random_ones_at_chance():
    z = torch.cat([random_latents(3, 20), PERFECT], 1)
    t = sparse_probing(z, LABELS, ks=(1, 2, 5))
    assert list(t.index.names) == ["concept", "k"] and len(t) == 3 * len(LABELS)
    assert (t["accuracy"] == 1).all() and (t["balanced_accuracy"] == 1).all()
    assert all(row.latents[0] == 20 + i for i, c in enumerate(LABELS) for k, row in t.loc[c].iterrows())
    some = {c: LABELS[c] for c in ("month", "name", "positive", "topic_word")}
    rand = sparse_probing(random_latents(4, 32), some, ks=(1, 5))
    assert rand["balanced_accuracy"].between(0.4, 0.6).all(), rand


def test_sparse_probing_is_deterministic():
    z = random_latents(5, 16)
    a, b = sparse_probing(z, {"name": LABELS["name"]}, ks=(2,)), sparse_probing(z, {"name": LABELS["name"]}, ks=(2,))
    assert a.equals(b)


# ---------------------------------------------------------------- (d) planted directions


def test_mcc_and_cosine_recover_planted_factors():
    x, factors, dirs = planted_directions(4000, 16, 24, 0.05, seed=0)
    assert torch.allclose(x, factors @ dirs) and torch.allclose(dirs.norm(dim=-1), torch.ones(24))
    assert 0.03 < (factors > 0).float().mean() < 0.07
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    r = mcc(factors, 3 * factors[:, perm])
    assert r["mcc"] == pytest.approx(1.0) and [perm[j].item() for j in r["latents"]] == list(range(24))
    assert best_cosine(dirs, dirs[perm]) == pytest.approx({"true_to_decoder": 1.0, "decoder_to_true": 1.0})
    extra = torch.cat([dirs, torch.randn(8, 16, generator=torch.Generator().manual_seed(1))])
    cos = best_cosine(dirs, extra)
    assert cos["true_to_decoder"] == pytest.approx(1.0) and cos["decoder_to_true"] < 0.95
    assert mcc(factors, factors[:, :12])["mcc"] == pytest.approx(0.5)  # 12 factors have no latent: they count 0
    assert mcc(factors, torch.relu(torch.randn(4000, 48, generator=torch.Generator().manual_seed(2))))["mcc"] < 0.1


def test_greedy_matching_is_the_fallback_without_scipy(monkeypatch):
    assert _greedy_match(torch.tensor([[0.9, 0.8], [0.85, 0.1]])) == [(0, 0), (1, 1)]
    _, factors, _ = planted_directions(2000, 8, 10, 0.1, seed=1)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails: greedy
    r = mcc(factors, factors[:, perm] + 0.01)
    assert r["mcc"] == pytest.approx(1.0) and [perm[j].item() for j in r["latents"]] == list(range(10))


def test_a_trained_topk_sae_beats_its_untrained_self():
    x, factors, dirs = planted_directions(8192, 24, 32, 3 / 32, seed=0)
    sae = TopKSAE(TopKConfig(24, 64, 4), seed=1)  # not 0: its random rows would be the planted directions
    with torch.no_grad():
        before = mcc(factors, sae(x).latents)["mcc"], best_cosine(dirs, sae.W_dec)["true_to_decoder"]
    train_sae(sae, x, TrainConfig(steps=500, batch_size=256, lr=3e-3, seed=0), progress=False)
    with torch.no_grad():
        after = mcc(factors, sae(x).latents)["mcc"], best_cosine(dirs, sae.W_dec)["true_to_decoder"]
    assert after[0] > 0.8 > 0.5 > before[0] and after[1] > 0.9 > 0.6 > before[1], (before, after)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda: concept_detection(PERFECT[:-1], LABELS), "tokens but latents_NF has"),
    (lambda: concept_detection(PERFECT, {"month": LABELS["month"].float()}), "must be a bool tensor"),
    (lambda: concept_detection(PERFECT.masked_fill(PERFECT > 0, float("nan")), LABELS), "NaN or inf"),
    (lambda: concept_detection(PERFECT, {}), "non-empty dict"),
    (lambda: concept_detection(PERFECT[:10], {"month": LABELS["month"][:10]}), "no positive token"),
    (lambda: sparse_probing(PERFECT, LABELS, ks=(1, 11)), r"each k in ks must be an integer in \[1, 10\]"),
    (lambda: sparse_probing(PERFECT, LABELS, ks=5), "ks must be a list"),
    (lambda: absorption(PERFECT, {"month": LABELS["month"]}, torch.eye(10)), "integer tensor of child indices"),
    (lambda: absorption(PERFECT, {"month": CHILDREN["month"] - 1}, torch.eye(10)), "-1 \\(no child\\)"),
    (lambda: absorption(PERFECT, CHILDREN, torch.eye(9)), "W_dec_FD must be \\[F, D\\] with F = 10"),
    (lambda: absorption(PERFECT, CHILDREN, torch.eye(10), child_names={"month": HIERARCHY["month"]}), "every parent"),
    (lambda: mcc(torch.ones(5, 2), torch.ones(6, 2)), "same N >= 2 tokens"),
    (lambda: planted_directions(10, 4, 3, p_active=1.5), "p_active must lie in"),
    (lambda: split_halves(1), "n must be an integer >= 2"),
])  # fmt: skip
def test_bad_input_names_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_latents_that_carry_gradients_and_numpy_directions_are_accepted():
    _, factors, dirs = planted_directions(500, 8, 6, 0.2, seed=2)
    z = factors.clone().requires_grad_(True)
    assert mcc(factors, z)["mcc"] == pytest.approx(1.0)
    assert best_cosine(dirs.numpy(), torch.nn.Parameter(dirs.clone()))["decoder_to_true"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="factors_NG holds 1 NaN"):
        mcc(factors.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))), z)
