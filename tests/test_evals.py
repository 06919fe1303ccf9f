"""evaluate_sae against direct computations on a tiny model."""

from typing import NamedTuple

import pytest
import torch
from torch import nn

from conftest import VOCAB
from nbfeatures import metrics, sites
from nbfeatures.edits import Ablate
from nbfeatures.evals import compare_density, evaluate_sae
from nbfeatures.sae.topk import TopKConfig, TopKSAE

SITE = "blocks.0.hook_resid_post"


class Out(NamedTuple):
    x_hat: torch.Tensor
    latents: torch.Tensor


class Identity(nn.Module):
    def forward(self, x):
        return Out(x, x)


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB - 1, (12, 10), generator=torch.Generator().manual_seed(2))


def test_identity_dictionary_is_perfect(model, tokens):
    r = evaluate_sae(model, Identity(), SITE, tokens, batch_size=5)
    assert r["ce_recovered"] == pytest.approx(1.0)
    assert r["kl"] == pytest.approx(0.0, abs=1e-6) and r["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert r["ce_increase"] == pytest.approx(0.0, abs=1e-6)
    assert r["n_tokens"] == 12 * 9 and r["l2_ratio"] == pytest.approx(1.0)


def test_downstream_mse_is_zero_for_identity_and_matches_direct(model, tokens):
    ident = evaluate_sae(model, Identity(), SITE, tokens, downstream=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
    assert ident["ds_mse/blocks.1.hook_resid_post"] == pytest.approx(0.0, abs=1e-10)
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(32, 64, 4))
    r = evaluate_sae(model, sae, "blocks.0.hook_resid_pre", tokens, downstream=["blocks.1.hook_resid_pre"])
    from nbfeatures.edits import Splice
    with torch.no_grad():
        clean = sites.read_acts(model, tokens, "blocks.1.hook_resid_pre")["blocks.1.hook_resid_pre"]
        spliced = sites.run(model, tokens, [Splice("blocks.0.hook_resid_pre", sae)], read=["blocks.1.hook_resid_pre"]).acts["blocks.1.hook_resid_pre"]
    assert r["ds_mse/blocks.1.hook_resid_pre"] == pytest.approx((spliced - clean)[:, 1:].pow(2).mean().item(), rel=1e-5)


def test_matches_direct_computation_and_ignores_batching(model, tokens):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(32, 64, 4))
    a = evaluate_sae(model, sae, SITE, tokens, batch_size=12)
    b = evaluate_sae(model, sae, SITE, tokens, batch_size=5)
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl", "fvu", "l0", "nmse"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    with torch.no_grad():
        clean = sites.run(model, tokens, read=[SITE])
        zero = sites.run(model, tokens, [Ablate(SITE)])
        x = clean.acts[SITE][:, 1:].reshape(-1, 32)
        out = sae(x)
    assert a["ce_clean"] == pytest.approx(metrics.cross_entropy(clean.logits, tokens), rel=1e-5)
    assert a["ce_zero"] == pytest.approx(metrics.cross_entropy(zero.logits, tokens), rel=1e-5)
    assert a["fvu"] == pytest.approx(metrics.fvu(out.x_hat, x), rel=1e-4)
    assert a["l0"] == pytest.approx(metrics.l0(out.latents), rel=1e-6)
    assert a["density"].shape == (64,) and a["ce_sae"] > a["ce_clean"]


def test_alive_and_ce_increase(model, tokens):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(32, 256, 2))
    r = evaluate_sae(model, sae, SITE, tokens)
    with torch.no_grad():
        x = sites.read_acts(model, tokens, SITE)[SITE][:, 1:].reshape(-1, 32)
        fired = (sae(x).latents != 0).any(0)
    assert r["alive"] == int(fired.sum()) and 0 < r["alive"] < 256  # 108 tokens x k=2 cannot reach all 256
    assert r["alive_fraction"] == pytest.approx(r["alive"] / 256)
    assert r["ce_increase"] == pytest.approx(r["ce_sae"] - r["ce_clean"]) and r["ce_increase"] != 0


def test_compare_density_counts_dense_latents_both_ways():
    class Fixed(nn.Module):  # latents are the input itself: the density of each column is known
        def forward(self, x):
            return Out(x, x)

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.02, 0.3, 0.5, 0.95])  # rare, dense, dense, usually on
    bits = (torch.rand(20_000, 4, generator=g) < p).float()
    table = compare_density({"bits": Fixed()}, bits, threshold=0.1, batch_size=3000)
    row = table.loc["bits"]
    assert row["dense_fraction"] == 0.75  # 0.3, 0.5, 0.95 fire on more than 10% of tokens
    assert row["deviation_dense_fraction"] == 0.5  # the usually-on bit deviates only 5% of the time
    assert row["l0"] == pytest.approx(p.sum().item(), abs=0.02) and row["fvu"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="threshold must lie in"):
        compare_density({"bits": Fixed()}, bits, threshold=1.5)
    with pytest.raises(ValueError, match="at least one dictionary"):
        compare_density({}, bits)
