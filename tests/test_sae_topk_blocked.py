"""The bounded-memory TopK encoder (blocked_topk, dead_topk, chosen_pre, span_decode) against the dense path."""

import copy
import json
import os
import tempfile

import pytest
import torch

from nbfeatures.sae import blocked
from nbfeatures.sae.base import (FiringTracker, chosen_pre, fvu, gather_pre, remove_parallel_grad_, remove_parallel_grad_lowmem_,
                                 span_decode, sparse_decode)
from nbfeatures.sae.blocked import blocked_topk, dead_topk
from nbfeatures.sae.topk import TopKObjective
from sae_support import grads, topk_sae as make


def dense_objective(sae, x, k, k_aux, dead_before, dead_tokens, aux_coef=0.5, multi=False):
    """The obvious AuxK objective through plain autograd on the [N, F] pre-activations (dead: not fired in the window,
    this batch included)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(4 * k if multi else k, dim=1)
    latents_all = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    latents = torch.zeros_like(pre).scatter(1, top.indices[:, :k], torch.relu(top.values[:, :k]))
    x_hat = latents @ sae.W_dec + sae.b_dec
    loss = fvu(x_hat, x)
    if multi:
        loss = loss + fvu(latents_all @ sae.W_dec + sae.b_dec, x) / 8
    fired = (latents > 0).any(0)
    dead = (dead_before + len(x) >= dead_tokens) & ~fired
    if int(dead.sum()):
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=1)
        e_hat = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals)) @ sae.W_dec
        loss = loss + aux_coef * fvu(e_hat, (x - x_hat).detach())
    return loss, dead


@pytest.mark.parametrize("N,D,F,k,block,tile", [
    (50, 8, 300, 5, 33, 1 << 24),      # d_sae not a multiple of the block
    (40, 8, 300, 5, 1, 1 << 24),       # one latent per block: k > block, the running top-k grows to k
    (64, 16, 4096, 32, 4096, 1 << 24),  # one tile: the two-level (group max) top-k
    (64, 16, 5000, 8, 1500, 1 << 12),  # row tiles too, two-level with a tail of columns
    (3, 4, 7, 7, 2, 1 << 24),          # k = d_sae
])
def test_blocked_topk_equals_dense_topk(monkeypatch, N, D, F, k, block, tile):
    monkeypatch.setattr(blocked, "_TILE", tile)
    torch.manual_seed(0)
    x, W, b = torch.randn(N, D), torch.randn(D, F), torch.randn(F)
    pre = torch.addmm(b, x, W)
    aux_F = torch.rand(F) < 0.3
    vals, idx, aux_vals, aux_idx = blocked_topk(x, W, b, k, block, aux_F, 6)
    ref = pre.topk(k, dim=1)
    torch.testing.assert_close(vals, ref.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, ref.indices)
    n_aux = min(6, int(aux_F.sum()))
    ref_aux = pre.masked_fill(~aux_F, float("-inf")).topk(n_aux, dim=1)
    order = aux_vals.argsort(1, descending=True)
    torch.testing.assert_close(aux_vals.gather(1, order), ref_aux.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(aux_idx.gather(1, order), ref_aux.indices)
    cols = torch.randperm(F)[: max(k, F // 3)].sort().values  # a search over some latents only
    v, i, _, _ = blocked_topk(x, W, b, k, block, cols_G=cols)
    ref = pre[:, cols].topk(k, dim=1)
    torch.testing.assert_close(v, ref.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, cols[ref.indices])


@pytest.mark.parametrize("F,block,dead_fraction,k_aux,multi", [
    (100, 7, 0.5, 8, False),    # many dead, d_sae not a multiple of the block
    (300, 33, 0.02, 6, False),  # few dead: fewer than k_aux
    (97, 10, 0.3, 200, True),   # k_aux above the dead count, Multi-TopK
    (64, 64, 0.0, 8, False),    # nothing dead and nothing about to die: no AuxK term
    (256, 1000, 1.0, 8, True),  # everything about to die, one block wider than d_sae
])
def test_objective_matches_dense_reference(F, block, dead_fraction, k_aux, multi):
    sae = make(d_in=12, d_sae=F, k=4)
    x = torch.randn(40, 12)
    dead_before = torch.where(torch.rand(F) < dead_fraction, 100, 0)
    results = {}
    for bs in (block, None):
        s = copy.deepcopy(sae)
        obj = TopKObjective(s, aux_coef=0.5, k_aux=k_aux, dead_tokens=100, multi_topk=multi, block_size=bs)
        obj.firing.tokens_since_fired[:] = dead_before
        loss, logs = obj(x)
        loss.backward()
        results[bs] = (loss, logs, grads(s), obj.firing.tokens_since_fired.clone())
    ref, dead = dense_objective(sae, x, 4, k_aux, dead_before, 100, multi=multi)
    ref.backward()
    for loss, logs, g, tokens in results.values():
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        assert logs["dead_fraction"] == pytest.approx(dead.float().mean().item())
        assert ("aux_loss" in logs) == bool(dead.any())
        for name, ref_g in grads(sae).items():
            torch.testing.assert_close(g[name], ref_g, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(results[block][3], results[None][3])  # the same firing record


def test_auxk_candidates_that_fire_are_searched_again():
    """Latents about to die that fire in this batch are not dead: a token whose candidate list held too few dead
    ones gets its dead top-k_aux from a second search over the dead latents alone."""
    sae = make(d_in=8, d_sae=200, k=6)
    x = torch.randn(64, 8)
    dying = torch.ones(200, dtype=torch.bool)  # every latent is a candidate, and most fire somewhere in the batch
    with torch.no_grad():
        xc = x - sae.b_dec
        vals, idx, cand_vals, cand_idx = blocked_topk(xc, sae.W_enc, sae.b_enc, 6, 50, dying, 4)
        fired = torch.zeros(200, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        dead = dying & ~fired
        n_aux = min(2, int(dead.sum()))
        assert n_aux > 0 and (dead[cand_idx].sum(1) < n_aux).any()  # the second search is needed
        got_vals, got_idx = dead_topk(xc, sae.W_enc, sae.b_enc, cand_vals, cand_idx, dead, n_aux, 50)
        pre = torch.addmm(sae.b_enc, xc, sae.W_enc)
        ref = pre.masked_fill(~dead, float("-inf")).topk(n_aux, dim=1)
    torch.testing.assert_close(got_vals, ref.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_idx, ref.indices)


def test_ties_between_identical_latents():
    """Latents 0..7 are one latent copied: the choice among them is free, every result that matters is not."""
    sae = make(d_in=8, d_sae=64, k=3)
    with torch.no_grad():
        sae.W_enc[:, :8] = sae.W_enc[:, :1] + 1.0  # they win (x below has positive coordinates)
        sae.b_enc[:8] = sae.b_enc[0]
        sae.W_dec[:8] = sae.W_dec[0]
    x = torch.rand(20, 8) + 1
    ref = copy.deepcopy(sae)
    loss, _ = TopKObjective(sae, aux_coef=0, block_size=3)(x)  # the copies straddle blocks
    loss.backward()
    ref_loss, _ = TopKObjective(ref, aux_coef=0, block_size=None)(x)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(sae)[name], g, atol=1e-5, rtol=1e-4, msg=name)
    _, idx, _ = sae.encode_topk(x, block_size=3)
    assert (idx < 8).all() and (idx.sort(1).values.diff(dim=1) > 0).all()  # three distinct copies per token
    zero = sae.b_dec.detach().expand(5, 8)  # x = b_dec and b_enc = 0: every latent ties at 0
    with torch.no_grad():
        sae.b_enc.zero_()
        acts, idx, _ = sae.encode_topk(zero, block_size=5)
    assert (acts == 0).all() and (idx.sort(1).values.diff(dim=1) > 0).all()


def test_encode_topk_blocked_equals_dense():
    sae = make(d_in=16, d_sae=130, k=5)
    x = torch.randn(30, 16)
    target = torch.randn(30, 16)
    results = []
    for bs in (16, None):
        sae.zero_grad()
        acts, idx, pre = sae.encode_topk(x, block_size=bs)
        x_hat = sae.decode_sparse(acts, idx)
        (x_hat - target).pow(2).sum().backward()
        results.append((acts, idx, pre, x_hat, grads(sae)))
    (acts, idx, pre, x_hat, g), (ref_acts, ref_idx, ref_pre, ref_x_hat, ref_g) = results
    assert pre is None and ref_pre.shape == (30, 130)  # the blocked encoder holds no [N, F] tensor to return
    torch.testing.assert_close(acts, ref_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, ref_x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat, sae(x).x_hat, atol=1e-5, rtol=1e-5)  # forward, the dense path
    assert torch.equal(idx, ref_idx)
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_chosen_pre_gradients_match_gather_pre(layout):
    torch.manual_seed(0)
    W0 = torch.randn(6, 5000)  # more latents than one 4096-latent chunk of the transposed gradient
    W = (W0 if layout == "row-major" else W0.t().contiguous().t()).requires_grad_()
    x, b_dec, b = torch.randn(8, 6, requires_grad=True), torch.randn(6, requires_grad=True), torch.randn(5000, requires_grad=True)
    pre = torch.addmm(b, x - b_dec, W).detach()
    idx = pre.topk(3, dim=1).indices
    g = torch.randn(8, 3)
    out = chosen_pre(x, b_dec, W, b, idx, pre.gather(1, idx))
    (out * g).sum().backward()
    fast = [t.grad.clone() for t in (x, b_dec, W, b)]
    assert W.grad.stride() == W.stride()  # kept in the parameter's own layout
    for t in (x, b_dec, W, b):
        t.grad = None
    (gather_pre(x - b_dec, W, b, idx, pre) * g).sum().backward()
    for f, t in zip(fast, (x, b_dec, W, b)):
        torch.testing.assert_close(f, t.grad, atol=1e-5, rtol=1e-5)


def test_span_decode_matches_sparse_decode():
    torch.manual_seed(0)
    W = torch.randn(30, 5, requires_grad=True)
    idx = torch.stack([torch.randperm(30)[:7] for _ in range(9)])
    acts = torch.rand(9, 7, requires_grad=True)
    spans = [(0, 3), (0, 5), (5, 7)]  # overlapping spans, as x_hat and Multi-TopK's 4k x_hat share columns
    gs = [torch.randn(9, 5) for _ in spans]
    outs = span_decode(acts, idx, W, spans)
    sum((o * g).sum() for o, g in zip(outs, gs)).backward()
    fast = (acts.grad.clone(), W.grad.clone())
    acts.grad = W.grad = None
    refs = [sparse_decode(acts[:, a:b], idx[:, a:b], W) for a, b in spans]
    sum((r * g).sum() for r, g in zip(refs, gs)).backward()
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r)
    torch.testing.assert_close(fast[0], acts.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], W.grad, atol=1e-5, rtol=1e-5)


def test_lowmem_parallel_grad_removal_and_dying_mask():
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(40, 6), dim=1))
    G = torch.randn(40, 6)
    W.grad = G.clone()
    remove_parallel_grad_(W)
    ref = W.grad.clone()
    W.grad = G.clone()
    remove_parallel_grad_lowmem_(W)
    torch.testing.assert_close(W.grad, ref, atol=1e-6, rtol=1e-5)
    tracker = FiringTracker(5, dead_tokens=10)
    tracker.tokens_since_fired[:] = torch.tensor([0, 3, 6, 9, 12])
    dying = tracker.dying(4)
    assert dying.tolist() == [False, False, True, True, True]
    dead = tracker.update(torch.tensor([False, False, True, False, False]), 4)
    assert (dead <= dying).all() and dead.tolist() == [False, False, False, True, True]


def _peak_allocated(fn) -> int:
    """Peak bytes of the tensors fn allocates and has not freed yet (torch.profiler memory events, paired by address)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)["traceEvents"]
    events = [e["args"] for e in sorted(trace, key=lambda e: e.get("ts", 0)) if e.get("name") == "[memory]"]
    live, total, peak = {}, 0, 0
    for e in events:
        if e["Bytes"] > 0:
            live[e["Addr"]] = e["Bytes"]
            total += e["Bytes"]
        elif e["Addr"] in live:
            total -= live.pop(e["Addr"])
        peak = max(peak, total)
    return peak


def test_a_training_step_never_holds_the_dense_pre_activations(monkeypatch):
    monkeypatch.setattr(blocked, "_TILE", 1 << 14)  # tiles of 64 KiB
    N, D, F = 512, 8, 8192
    dense = N * F * 4  # 16 MiB
    peaks = {}
    for bs in (512, None):
        sae = make(d_in=D, d_sae=F, k=8)
        obj = TopKObjective(sae, dead_tokens=N, block_size=bs)  # everything silent in a batch dies: AuxK runs
        x = torch.randn(N, D)

        def step():
            sae.zero_grad(set_to_none=True)
            loss, logs = obj(x)
            torch.autograd.backward(loss)
            assert "aux_loss" in logs

        step()
        peaks[bs] = _peak_allocated(step)
    assert peaks[None] > dense  # the measurement sees the dense matrix where there is one
    assert peaks[512] < dense / 8, f"peak {peaks[512]} bytes, dense pre-activations {dense}"


def test_bad_block_size():
    sae = make()
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"TopKObjective: block_size must be > 0 \(an int\), got {bad}"):
            TopKObjective(sae, block_size=bad)
        with pytest.raises(ValueError, match=rf"TopKSAE.encode_topk: block_size must be > 0 \(an int\), got {bad}"):
            sae.encode_topk(torch.randn(3, 16), block_size=bad)
    with pytest.raises(ValueError, match=r"block_size must be > 0 \(an int\), got 2.5 \(float\)"):
        TopKObjective(sae, block_size=2.5)
