"""Codebook layer against the obvious implementation."""

import pytest
import torch
import torch.nn.functional as F

from nbfeatures.codebook import CodebookConfig, CodebookLayer, IVFConfig, argmax_last, build_ivf, codebook_mse, exact_topk


def naive(layer, x):
    """Loop over tokens and groups: normalise, rank every code by cosine, sum the top k."""
    G, E = layer.cfg.n_groups, layer.cfg.d_in
    xs = x.reshape(-1, G, E)
    out = torch.zeros_like(xs)
    ids = torch.zeros(len(xs), G, layer.cfg.k, dtype=torch.long)
    for n in range(len(xs)):
        for g in range(G):
            xn = F.layer_norm(xs[n, g], (E,))
            cos = torch.stack([F.cosine_similarity(xn, c, dim=0) for c in layer.codebook[g]])
            top = cos.argsort(descending=True)[: layer.cfg.k]
            ids[n, g] = top
            out[n, g] = layer.codebook[g, top].sum(0)
    return out.reshape(x.shape), ids.reshape(*x.shape[:-1], layer.cfg.k)


@pytest.mark.parametrize("k", [1, 3])
def test_output_is_the_sum_of_the_most_similar_codes(k):
    layer = CodebookLayer(CodebookConfig(8, 20, k=k))
    x = torch.randn(2, 5, 8)
    out = layer(x)
    expected, ids = naive(layer, x)
    torch.testing.assert_close(out.x_hat, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.codes, ids)
    assert out.codes.shape == (2, 5, k) and (out.sims[..., :-1] >= out.sims[..., 1:]).all()
    assert out.latents.shape == (2, 5, 20) and (out.latents.sum(-1) == k).all()


def test_mean_reduction_divides_by_k():
    s = CodebookLayer(CodebookConfig(8, 20, k=4, reduce="sum"))
    m = CodebookLayer(CodebookConfig(8, 20, k=4, reduce="mean"))
    x = torch.randn(6, 8)
    torch.testing.assert_close(m(x).x_hat, s(x).x_hat / 4)


def test_input_gradient_is_straight_through():
    layer = CodebookLayer(CodebookConfig(8, 20, k=2))
    x = torch.randn(6, 8, requires_grad=True)
    g = torch.randn(6, 8)
    torch.autograd.backward(layer(x).x_hat, g)
    through_codes = x.grad.clone()
    x.grad = None
    torch.autograd.backward(F.layer_norm(x, (8,)), g)  # d x_hat / d x_norm = I, so only the norm's Jacobian remains
    torch.testing.assert_close(through_codes, x.grad)


def test_only_chosen_codes_get_gradient_and_mse_targets_the_detached_input():
    layer = CodebookLayer(CodebookConfig(8, 50, k=1))
    x = torch.randn(4, 8, requires_grad=True)
    out = layer(x)
    torch.autograd.backward(out.x_hat.sum() + codebook_mse(out))
    touched = layer.codebook.grad[0].abs().sum(-1) > 0
    assert set(touched.nonzero().flatten().tolist()) == set(out.codes.flatten().tolist())
    # the MSE term pulls codes, not the input: the input gradient equals the task-only one
    x2 = x.detach().clone().requires_grad_(True)
    torch.autograd.backward(layer(x2).x_hat.sum())
    torch.testing.assert_close(x.grad, x2.grad)


def test_grouped_layer_equals_one_layer_per_head():
    grouped = CodebookLayer(CodebookConfig(6, 15, k=2, n_groups=3))
    x = torch.randn(2, 4, 3, 6)  # [B, T, H, E], the hook_z layout
    out = grouped(x)
    for h in range(3):
        single = CodebookLayer(CodebookConfig(6, 15, k=2))
        with torch.no_grad():
            single.codebook[0] = grouped.codebook[h]
        ref = single(x[:, :, h])
        torch.testing.assert_close(out.x_hat[:, :, h], ref.x_hat)
        assert torch.equal(out.codes[:, :, h], ref.codes)


def test_forced_codes_replace_the_nearest():
    layer = CodebookLayer(CodebookConfig(8, 20, k=2))
    x = torch.randn(5, 8)
    forced = torch.tensor([[3, 7]]).expand(5, 2)
    out = layer(x, ids=forced)
    assert torch.equal(out.codes, forced)
    torch.testing.assert_close(out.x_hat, (layer.codebook[0, 3] + layer.codebook[0, 7]).expand(5, 8))
    cos = F.cosine_similarity(F.layer_norm(x, (8,)), layer.codebook[0, 3][None], dim=-1)
    torch.testing.assert_close(out.sims[:, 0], cos, atol=1e-5, rtol=1e-5)


def test_dead_codes_are_reseeded_from_recent_inputs():
    layer = CodebookLayer(CodebookConfig(8, 30, k=1)).train()
    x = torch.randn(64, 8)
    before = layer.codebook.detach().clone()
    for _ in range(2):
        out = layer(x)
    assert layer.replace_dead_codes_(noise=0.0) > 0
    used = set(out.codes.flatten().tolist())
    dead = [c for c in range(30) if c not in used]
    assert dead
    xn = F.layer_norm(x, (8,))
    for c in dead:  # each dead code is now one of the recent normalised inputs
        assert (xn - layer.codebook[0, c]).norm(dim=-1).min() < 1e-5
    for c in used:
        assert torch.equal(layer.codebook[0, c], before[0, c])


def test_kmeans_init_finds_cluster_centres():
    torch.manual_seed(0)
    centres = F.layer_norm(torch.randn(4, 8) * 3, (8,))
    x = (centres[torch.randint(0, 4, (400,))] + 0.01 * torch.randn(400, 8))
    layer = CodebookLayer(CodebookConfig(8, 4, k=1))
    layer.init_kmeans_(x)
    d = torch.cdist(centres, layer.codebook[0].detach())
    assert d.min(1).values.max() < 0.1


def test_bad_input():
    with pytest.raises(ValueError, match=r"need 0 < k <= n_codes, got k=21, n_codes=20"):
        CodebookConfig(8, 20, k=21)
    with pytest.raises(ValueError, match="reduce must be"):
        CodebookConfig(8, 20, reduce="max")
    layer = CodebookLayer(CodebookConfig(8, 20, n_groups=2))
    with pytest.raises(ValueError, match=r"input ends in \[3, 8\].*expected \[2, 8\]"):
        layer(torch.randn(4, 3, 8))


# ---- fast search paths against the obvious ones ----

def test_argmax_last_equals_torch_max_including_ties_and_empty_rows():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 50, 700, generator=gen)
    s[0, 0] = 0.25  # a row of ties
    s[0, 1, 5] = s[0, 1, 9] = s[0, 1].max() + 1  # a two-way tie at the top
    s[1, 2] = float("-inf")  # every code excluded
    s[1, 3, :600] = float("-inf")
    s[2, 4] = s[2, 4] * 1e-6  # tiny gaps
    v, i = argmax_last(s)
    v_ref, i_ref = s.max(-1, keepdim=True)
    assert torch.equal(i, i_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_exact_search_equals_one_full_matrix(k):
    gen = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(2, 3000, 16, generator=gen), dim=-1)
    cn = F.normalize(torch.randn(2, 900, 16, generator=gen), dim=-1)  # 3000 tokens: several chunks
    exclude = torch.rand(2, 900, generator=gen) < 0.3
    sims, ids = exact_topk(q, cn, k, exclude)
    full = torch.bmm(q, cn.transpose(1, 2)).masked_fill(exclude[:, None], float("-inf")).topk(k, dim=-1)
    assert torch.equal(ids, full.indices)
    torch.testing.assert_close(sims, full.values)


def clustered(G, C, E, n, seed, spread=0.3, noise=0.3):
    """Codes around 40 centres, inputs near random codes: the structure an IVF index exploits."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(G, 40, E, generator=gen), dim=-1)
    codes = centres[:, torch.randint(40, (C,), generator=gen)] + spread * torch.randn(G, C, E, generator=gen) / E**0.5
    x = codes[:, torch.randint(C, (n,), generator=gen)] + noise * torch.randn(G, n, E, generator=gen) / E**0.5
    return codes, x.transpose(0, 1)


@pytest.mark.parametrize("G,k", [(1, 1), (3, 1), (3, 4)])
def test_ivf_probing_every_list_is_exact(G, k):
    codes, x = clustered(G, 500, 24, 400, seed=G + k)
    layer = CodebookLayer(CodebookConfig(24, 500, k=k, n_groups=G)).eval()
    layer.codebook.data = codes * 24**0.5
    x = x if G > 1 else x[:, 0]
    exact = layer(x)
    exclude = torch.zeros(G, 500, dtype=torch.bool)
    exclude[:, exact.codes.reshape(-1, G, k)[:50, :, 0].flatten().unique()] = True  # bar some popular codes
    exact_ex = layer(x, exclude=exclude)
    layer.use_ivf(IVFConfig(n_lists=20, n_probe=20))
    out, out_ex = layer(x), layer(x, exclude=exclude)
    assert torch.equal(out.codes, exact.codes) and torch.equal(out_ex.codes, exact_ex.codes)
    torch.testing.assert_close(out.sims, exact.sims)
    torch.testing.assert_close(out.x_hat, exact.x_hat)


def test_ivf_finds_most_nearest_codes_with_few_probes():
    codes, x = clustered(2, 2000, 32, 3000, seed=5, spread=1.0, noise=0.8)
    layer = CodebookLayer(CodebookConfig(32, 2000, k=1, n_groups=2)).eval()
    layer.codebook.data = codes
    exact = layer(x).codes
    layer.use_ivf(IVFConfig(n_probe=4))  # 45 lists of about 44 codes: a token scores ~45 + 4 * 44 codes, not 2000
    approx = layer(x).codes
    agree = (approx == exact).float().mean().item()
    assert 0.9 <= agree < 1.0, agree  # approximate, yet mostly right
    layer.use_ivf(IVFConfig(n_probe=12))
    assert (layer(x).codes == exact).float().mean().item() > agree  # more probes, closer to exact
    starts = layer._index.starts
    assert len(starts) == 2 * 45 + 1 and starts[-1] == 2 * 2000


def test_ivf_index_follows_the_codebook_and_training_searches_exactly():
    codes, x = clustered(1, 300, 16, 200, seed=7)
    layer = CodebookLayer(CodebookConfig(16, 300, k=1)).eval().use_ivf(IVFConfig(n_lists=10, n_probe=10))
    layer.codebook.data = codes
    first = layer(x[:, 0]).codes
    built = layer._index
    with torch.no_grad():
        layer.codebook[0, first[:, 0]] *= -1  # edit the codes in place: the index must notice
    second = layer(x[:, 0]).codes
    assert layer._index is not built and not torch.equal(first, second)
    layer.use_ivf(None)
    assert torch.equal(second, layer(x[:, 0]).codes)
    layer.train().use_ivf(IVFConfig(n_lists=10, n_probe=1))
    assert torch.equal(layer(x[:, 0]).codes, second) and layer._index is None  # training never uses the index
    with pytest.raises(TypeError, match="IVFConfig or None"):
        layer.use_ivf({"n_probe": 2})
    with pytest.raises(ValueError, match="n_probe > 0"):
        IVFConfig(n_probe=0)
    with pytest.raises(ValueError, match="n_lists must be in 1..n_codes=300"):
        build_ivf(layer.codebook, 301)
