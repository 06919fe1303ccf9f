"""Helpers the SAE tests share (tests/test_sae_*.py): a TopK SAE off its tied init, parameter gradients, and the
save / load round trip checked against our loader and SAELens's."""

from __future__ import annotations

import pytest
import torch

from nbfeatures.sae import load_sae
from nbfeatures.sae.topk import TopKConfig, TopKSAE


def topk_sae(d_in=16, d_sae=64, k=4, seed=0) -> TopKSAE:
    """A TopK SAE moved off the tied init (so encoder and decoder gradients differ), the same for the same seed."""
    torch.manual_seed(seed)
    sae = TopKSAE(TopKConfig(d_in, d_sae, k), seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc.add_(0.05 * torch.randn_like(sae.W_enc))
    return sae


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def reloads_exactly(sae, folder, x):
    """load_sae(folder) has sae's tensors bit for bit and its outputs on x; SAELens's own loader (when installed)
    reads the folder with the same latents and reconstruction. Returns (ours, SAELens's)."""
    back = load_sae(folder)
    assert type(back) is type(sae) and back.cfg == sae.cfg and not back.training
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in sae.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x).x_hat, sae(x).x_hat)
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae(x).latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x).x_hat, atol=1e-5, rtol=1e-5)
    return back, theirs
