"""TopK SAE: the sparse fast path against the obvious dense implementation, AuxK, init, bad input."""

import pytest
import torch

from nbfeatures.sae.base import fvu, gather_pre, geometric_median, sparse_decode
from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from sae_support import grads, topk_sae as make


def dense_reference(sae, x, k):
    """Everything through plain autograd: dense pre, topk, dense latents, dense decode."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(k, dim=1)
    latents = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    return latents @ sae.W_dec + sae.b_dec, latents, pre


def test_forward_matches_dense_reference():
    sae = make()
    x = torch.randn(50, 16)
    out = sae(x)
    x_hat, latents, pre = dense_reference(sae, x, 4)
    torch.testing.assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.latents, latents, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.pre_acts, pre, atol=1e-5, rtol=1e-5)
    assert ((out.latents != 0).sum(1) <= 4).all()
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.x_hat, atol=1e-5, rtol=1e-5)


def test_sparse_backward_matches_dense_autograd():
    sae = make()
    x = torch.randn(40, 16)
    target = torch.randn(40, 16)
    out = sae(x)
    (out.x_hat - target).pow(2).sum().backward()
    fast = grads(sae)
    sae.zero_grad()
    x_hat, _, _ = dense_reference(sae, x, 4)
    (x_hat - target).pow(2).sum().backward()
    for name, g in grads(sae).items():
        torch.testing.assert_close(fast[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_gather_pre_input_gradient_matches_dense():
    torch.manual_seed(0)
    x = torch.randn(8, 6, requires_grad=True)
    W, b = torch.randn(6, 20, requires_grad=True), torch.randn(20, requires_grad=True)
    pre = (x @ W + b).detach()
    idx = pre.topk(3, dim=1).indices
    g = torch.randn(8, 3)
    (gather_pre(x, W, b, idx, pre) * g).sum().backward()
    fast = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    ((x @ W + b).gather(1, idx) * g).sum().backward()
    for f, t in zip(fast, (x, W, b)):
        torch.testing.assert_close(f, t.grad, atol=1e-5, rtol=1e-5)


def test_sparse_decode_equals_dense_decode():
    W = torch.randn(30, 5)
    idx = torch.randint(0, 30, (7, 4))
    acts = torch.rand(7, 4)
    dense = torch.zeros(7, 30).scatter_add(1, idx, acts)
    torch.testing.assert_close(sparse_decode(acts, idx, W), dense @ W, atol=1e-6, rtol=1e-5)


def test_objective_with_auxk_matches_dense_reference():
    sae = make(d_in=16, d_sae=64, k=4)
    obj = TopKObjective(sae, aux_coef=0.5, k_aux=8, dead_tokens=1)
    x = torch.randn(30, 16)
    obj.firing.tokens_since_fired[:] = 5  # everything starts dead except what fires in this batch
    loss, logs = obj(x)
    loss.backward()
    fast = grads(sae)
    sae.zero_grad()
    # the obvious version: latents that fired in this batch are alive, the rest dead
    x_hat, latents, pre = dense_reference(sae, x, 4)
    dead = ~(latents > 0).any(0)
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(8, dim=1)
    aux_latents = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
    e = (x - x_hat).detach()
    e_hat = aux_latents @ sae.W_dec
    ref = fvu(x_hat, x) + 0.5 * fvu(e_hat, e)
    ref.backward()
    assert logs["dead_fraction"] == pytest.approx(dead.float().mean().item())
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, g in grads(sae).items():
        torch.testing.assert_close(fast[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_dead_latent_tracking_counts_tokens():
    sae = make(d_sae=64, k=2)
    obj = TopKObjective(sae, dead_tokens=100)
    x = torch.randn(30, 16)
    with torch.no_grad():
        _, logs = obj(x)
    fired = sae(x).indices.unique()
    assert (obj.firing.tokens_since_fired[fired] == 0).all()
    others = torch.ones(64, dtype=torch.bool)
    others[fired] = False
    assert (obj.firing.tokens_since_fired[others] == 30).all()
    assert logs["dead_fraction"] == 0.0
    for _ in range(3):
        with torch.no_grad():
            obj(x)
    assert obj.firing.tokens_since_fired[others].min() == 120  # 4 batches of 30 tokens, never fired: dead
    with torch.no_grad():
        assert obj(x)[1]["dead_fraction"] == pytest.approx(others.float().mean().item())


def test_multi_topk_adds_the_4k_term():
    sae = make(d_sae=64, k=2)
    x = torch.randn(30, 16)
    with torch.no_grad():
        loss, logs = TopKObjective(sae, aux_coef=0, multi_topk=True)(x)
        x_hat4, _, _ = dense_reference(sae, x, 8)
    assert logs["fvu_4k"] == pytest.approx(fvu(x_hat4, x).item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["fvu"] + logs["fvu_4k"] / 8, rel=1e-5)


def test_tied_init_and_unit_norm_decoder_steps():
    sae = TopKSAE(TopKConfig(16, 64, 4))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.before_step_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5  # no component along the rows
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_geometric_median_resists_outliers():
    torch.manual_seed(0)
    x = torch.randn(500, 4) * 0.1 + torch.tensor([1.0, 2.0, 3.0, 4.0])
    x[:50] += 100.0
    m = geometric_median(x)
    assert (m - torch.tensor([1.0, 2.0, 3.0, 4.0])).norm() < 0.2
    assert (x.mean(0) - torch.tensor([1.0, 2.0, 3.0, 4.0])).norm() > 10


def test_forward_keeps_leading_dims_for_splicing():
    sae = make()
    x = torch.randn(2, 5, 16)
    out = sae(x)
    assert out.x_hat.shape == (2, 5, 16) and out.acts.shape == (2, 5, 4) and out.latents.shape == (2, 5, 64)
    torch.testing.assert_close(out.x_hat[1], sae(x[1]).x_hat)


def test_default_lr_scales_with_inverse_sqrt_width():
    assert TopKConfig(8, 2**14, 4).default_lr == pytest.approx(2e-4)
    assert TopKConfig(8, 2**16, 4).default_lr == pytest.approx(1e-4)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match=r"need 0 < k <= d_sae, got k=65, d_sae=64"):
        TopKConfig(16, 64, 65)
    with pytest.raises(ValueError, match="d_in > 0"):
        TopKConfig(0, 64, 4)
    sae = make()
    with pytest.raises(ValueError, match=r"input has width 15 \(shape \[3, 15\]\), expected d_in=16"):
        sae(torch.randn(3, 15))
    with pytest.raises(ValueError, match="not floating point"):
        sae(torch.ones(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="aux_coef"):
        TopKObjective(sae, aux_coef=-1)
    with pytest.raises(ValueError, match="dead_tokens must be > 0"):
        TopKObjective(sae, dead_tokens=0)
