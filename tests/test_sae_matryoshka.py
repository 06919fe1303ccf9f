"""Matryoshka BatchTopK SAE: the mean of the prefix losses and every gradient against the dense obvious version, each
prefix's loss falling in training, planted directions recovered, files both ways with SAELens, bad widths."""

import pytest
import torch

from nbfeatures.sae import (BatchTopKConfig, BatchTopKSAE, MatryoshkaConfig, MatryoshkaObjective, MatryoshkaSAE, load_sae,
                            save_sae)
from nbfeatures.sae import blocked
from nbfeatures.sae.blocked import BLOCK_SIZE
from nbfeatures.sae.matryoshka import group_columns
from nbfeatures.train import TrainConfig, train_sae
from nbfeatures import metrics
from nbfeatures.evals import planted_directions
from sae_support import grads, reloads_exactly

pytestmark = pytest.mark.usefixtures("one_thread")


def make(widths=(2, 6, 16), k=3, seed=0, dtype=torch.float64):
    sae = MatryoshkaSAE(MatryoshkaConfig(8, 16, k, matryoshka_widths=widths), seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(16, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(8, generator=g))
        sae.W_enc.add_(0.05 * torch.randn(8, 16, generator=g))
    return sae


def fvu(x_hat, x):
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


@pytest.mark.parametrize("block", [None, BLOCK_SIZE, 5])  # the dense path; one tile; tiles of 5 latents x 4 tokens
@pytest.mark.parametrize("aux, skew", [(False, False), (True, False), (True, True)])
def test_objective_loss_and_every_gradient_match_the_dense_reference(aux, skew, block, monkeypatch):
    """skew: one token holds most of the batch's top values (the wide re-read; padding columns repeat kept latents)."""
    monkeypatch.setattr(blocked, "_TILE", 20)
    sae = make()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if skew:
        x[0] *= 6
    obj = MatryoshkaObjective(sae, aux_coef=0.5 if aux else 0.0, k_aux=3, dead_tokens=1, block_size=block)
    obj.firing.tokens_since_fired[:] = 5
    loss, logs = obj(x)
    torch.autograd.backward(loss)
    fast = grads(sae)
    sae.zero_grad()
    # the obvious version: dense batch top-k, then each prefix decoded on its own
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = torch.relu(pre).flatten()
    keep = flat.topk(3 * 6).indices
    latents = torch.zeros_like(flat).scatter(0, keep, flat[keep]).view(pre.shape)
    prefix = {w: fvu(latents[:, :w] @ sae.W_dec[:w] + sae.b_dec, x) for w in (2, 6, 16)}
    ref = sum(prefix.values()) / 3
    dead = ~(latents > 0).any(0)
    if aux:
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(3, dim=1)
        e = (x - (latents @ sae.W_dec + sae.b_dec)).detach()  # the full dictionary's residual
        ref = ref + 0.5 * fvu(torch.zeros_like(pre).scatter(1, idx, torch.relu(vals)) @ sae.W_dec, e)
    torch.autograd.backward(ref)
    for w, v in prefix.items():
        assert logs[f"fvu_{w}"] == pytest.approx(v.item(), rel=1e-9)
    assert logs["fvu"] == logs["fvu_16"] and ("aux_loss" in logs) == aux and dead.any()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for name, g in grads(sae).items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(fast[name], g, atol=1e-6, rtol=1e-6, msg=name)


def test_group_columns_puts_each_nonzero_entry_in_its_prefix_groups_span():
    acts = torch.tensor([[0.5, 0.0, 2.0, 1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    idx = torch.tensor([[9, 1, 2, 4], [4, 0, 7, 3], [1, 2, 3, 4]])
    grouped, grouped_idx, spans = group_columns(acts, idx, (4, 8, 12, 16))  # group 3 (12..15) holds nothing
    assert spans == [(0, 1), (1, 2), (2, 3), (3, 3)]  # one column per group: no token has two entries in one
    assert grouped_idx.tolist() == [[2, 4, 9], [0, 4, 0], [0, 0, 0]]
    assert grouped.tolist() == [[2.0, 1.0, 0.5], [0.0, 3.0, 0.0], [0.0] * 3]
    (grouped * torch.arange(1.0, 4.0)).sum().backward()  # each entry's gradient is its new column's weight
    assert acts.grad.tolist() == [[3.0, 0.0, 1.0, 2.0], [2.0, 0.0, 0.0, 0.0], [0.0] * 4]


def test_every_prefix_loss_falls_and_planted_directions_are_recovered():
    """300 steps on three seeds (worst seen: best cosine 0.84, every prefix's FVU at least 34% down); thresholds
    below the worst. Prefixes 8, 16, 32, 64 of 64 latents: d_sae / 8 ... d_sae, the default."""
    for seed in range(3):
        x, _, dirs = planted_directions(8192, 24, 32, 3 / 32, seed=seed)
        sae = MatryoshkaSAE(MatryoshkaConfig(24, 64, 3), seed=seed + 10)
        assert sae.cfg.matryoshka_widths == (8, 16, 32, 64)
        before = metrics.recovery(dirs, sae.W_dec.detach())
        hist = train_sae(sae, x, TrainConfig(steps=300, batch_size=256, lr=3e-3, seed=seed, log_every=10), progress=False)
        after = metrics.recovery(dirs, sae.W_dec.detach())
        assert after > 0.8 > 0.7 > before, (seed, before, after)
        for w in (8, 16, 32, 64):
            first, last = hist[f"fvu_{w}"].iloc[:3].mean(), hist[f"fvu_{w}"].iloc[-3:].mean()
            assert last < 0.8 * first, (seed, w, first, last)
        assert (hist[[f"fvu_{w}" for w in (8, 16, 32, 64)]].iloc[-1].diff().dropna() < 0).all()  # wider: better


def test_save_load_is_bit_exact_and_saelens_loads_it(tmp_path):
    sae = make(dtype=torch.float32).eval()
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    back, _ = reloads_exactly(sae, save_sae(sae, tmp_path / "m"), torch.randn(20, 8))
    assert back.cfg.matryoshka_widths == (2, 6, 16)


def test_a_saelens_matryoshka_inference_folder_loads_as_ours(tmp_path):
    m = pytest.importorskip("sae_lens.saes.matryoshka_batchtopk_sae")
    theirs = m.MatryoshkaBatchTopKTrainingSAE(m.MatryoshkaBatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=3, matryoshka_widths=[4, 16]))
    theirs.topk_threshold = torch.tensor(0.2, dtype=torch.double)
    theirs.save_inference_model(str(tmp_path))
    ours = load_sae(tmp_path)
    assert type(ours) is MatryoshkaSAE and ours.cfg.matryoshka_widths == (4, 16)
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).x_hat, __import__("sae_lens").SAE.load_from_disk(str(tmp_path))(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("widths, message", [
    ((4, 8), r"increase strictly from > 0 to d_sae=16, got \[4, 8\]"),
    ((8, 4, 16), r"increase strictly .* got \[8, 4, 16\]"),
    ((0, 16), r"increase strictly from > 0"),
    ((), "non-empty list of ints"),
    ((4.5, 16), "non-empty list of ints"),
    ("16", "non-empty list of ints"),
])  # fmt: skip
def test_bad_widths_are_named(widths, message):
    with pytest.raises(ValueError, match=message):
        MatryoshkaConfig(8, 16, 2, matryoshka_widths=widths)


def test_defaults_and_bad_objective():
    assert MatryoshkaConfig(8, 16, 2, matryoshka_widths=[4, 16]).matryoshka_widths == (4, 16)
    assert MatryoshkaConfig(8, 4, 2).matryoshka_widths == (1, 2, 4)
    with pytest.raises(ValueError, match="need 0 < k <= d_sae"):
        MatryoshkaConfig(8, 16, 0)
    with pytest.raises(ValueError, match="sae must be a MatryoshkaSAE"):
        MatryoshkaObjective(BatchTopKSAE(BatchTopKConfig(8, 16, 2)))
