"""Metrics on hand-computed cases."""

import math

import pytest
import torch

from nbfeatures import metrics


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    assert metrics.mse(x_hat, x) == pytest.approx(4 / 4)
    assert metrics.nmse(x_hat, x) == pytest.approx(4 / 30)
    # variance around the mean [2, 3]: 1 + 1 + 1 + 1 = 4
    assert metrics.fvu(x_hat, x) == pytest.approx(4 / 4)
    assert metrics.fvu(x.mean(0).expand_as(x), x) == pytest.approx(1.0)
    assert metrics.explained_variance(x, x) == pytest.approx(1.0)
    assert metrics.l2_ratio(0.5 * x, x) == pytest.approx(0.5)


def test_l0_density_dead_dense():
    latents = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0]])
    assert metrics.l0(latents) == pytest.approx(5 / 3)
    density = metrics.feature_density(latents)
    assert density.tolist() == pytest.approx([0, 1, 1 / 3, 1 / 3])
    assert metrics.dead_fraction(density) == 0.25
    assert metrics.dense_fraction(density, threshold=0.5) == 0.25
    assert metrics.log10_density(density)[0].item() == pytest.approx(-10)


def test_cross_entropy_and_recovered():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    tokens = torch.tensor([[0, 1, 2]])
    assert metrics.cross_entropy(logits, tokens) == pytest.approx((-math.log(0.25) - math.log(0.1)) / 2)
    mask = torch.tensor([[1, 1, 0]])
    assert metrics.cross_entropy(logits, tokens, mask) == pytest.approx(-math.log(0.25))
    assert metrics.ce_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=6.0) == pytest.approx(0.875)
    assert math.isnan(metrics.ce_recovered(2.0, 2.5, 2.0))


def test_kl_direction_is_clean_to_other():
    p = torch.log(torch.tensor([0.9, 0.1]))
    q = torch.log(torch.tensor([0.5, 0.5]))
    forward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    backward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert metrics.kl_div(p[None], q[None]) == pytest.approx(forward)
    assert metrics.kl_div(q[None], p[None]) == pytest.approx(backward)
    assert metrics.kl_div(p[None], p[None]) == pytest.approx(0.0, abs=1e-7)


def test_recovery_and_precision_recall():
    true = torch.eye(3, 4)
    W = torch.stack([torch.tensor([0.0, 0.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])])
    assert metrics.recovery(true, W) == pytest.approx((1 + 1 / math.sqrt(2) + 1) / 3)
    fires = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0]])
    labels = torch.tensor([[1], [1], [0], [0]])
    precision, recall = metrics.precision_recall(fires, labels)
    assert precision[:, 0].tolist() == pytest.approx([2 / 3, 1 / 2])
    assert recall[:, 0].tolist() == pytest.approx([1.0, 1 / 2])


def test_fit_power_law_recovers_exponents():
    n = torch.tensor([256.0, 512, 1024, 2048, 256, 512, 1024, 2048])
    k = torch.tensor([8.0, 8, 8, 8, 32, 32, 32, 32])
    y = 3.0 * n**-0.5 * k**-0.25
    fit = metrics.fit_power_law(y.tolist(), d_sae=n.tolist(), k=k.tolist())
    assert fit["c"] == pytest.approx(3.0, rel=1e-6) and fit["d_sae"] == pytest.approx(-0.5) and fit["k"] == pytest.approx(-0.25)
    assert fit["r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one factor"):
        metrics.fit_power_law([1.0, 2.0])
