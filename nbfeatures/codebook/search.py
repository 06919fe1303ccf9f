"""Code search for codebook layers: exact cosine top-k, an IVF index for approximate inference, the argmax kernel.

    exact:  ids = topk_k cos(q, c_j) over all C codes, in cache-sized token chunks
    IVF:    codes clustered into L lists by spherical k-means; a token is scored against the codes of the
            `n_probe` lists nearest to it only (FAISS's IndexIVFFlat in spirit); n_probe = L is exact

Dimension key: N tokens, G groups (heads), E width per group, C codes, K codes chosen, L lists, P lists probed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int


@dataclass(frozen=True)
class IVFConfig:
    """Approximate inference search: score each token against the codes of its `n_probe` nearest lists only."""

    n_lists: int = 0  # lists per codebook; 0: about sqrt(n_codes)
    n_probe: int = 4  # lists searched per token (n_probe = n_lists: exact)
    iters: int = 10  # spherical k-means iterations when the index is built
    seed: int = 0

    def __post_init__(self):
        for name in ("n_lists", "n_probe", "iters", "seed"):
            check_int(f"IVFConfig.{name}", getattr(self, name))
        if self.n_lists < 0 or self.n_probe <= 0 or self.iters < 0:
            raise ValueError(f"IVFConfig needs n_lists >= 0, n_probe > 0, iters >= 0; got {self}")


class IVFIndex(NamedTuple):
    centroids: Tensor  # [G, L, E] unit list centroids
    codes: Tensor  # [G*C, E] the unit codes of all groups, sorted by list (list x = g * L + l)
    ids: Tensor  # [G*C] each sorted code's id within its group
    starts: list[int]  # X + 1 offsets: list x holds codes[starts[x]:starts[x + 1]]
    version: tuple  # the codebook it was built from (data pointer, in-place version), to detect staleness


def build_ivf(codebook_GCE: Tensor, n_lists: int, iters: int = 10, seed: int = 0) -> IVFIndex:
    """Cluster each group's unit codes into `n_lists` lists (spherical k-means seeded from random codes)."""
    if not isinstance(codebook_GCE, Tensor) or codebook_GCE.dim() != 3 or not codebook_GCE.is_floating_point():
        raise ValueError(f"build_ivf: codebook must be a float tensor [G, C, E], got {getattr(codebook_GCE, 'dtype', type(codebook_GCE).__name__)} "
                         f"{list(getattr(codebook_GCE, 'shape', []))}")  # fmt: skip
    G, C, E = codebook_GCE.shape
    check_int("n_lists", n_lists)
    if not 0 < n_lists <= C:
        raise ValueError(f"n_lists must be in 1..n_codes={C}, got {n_lists}")
    check_int("iters", iters, 0), check_int("seed", seed)
    cn = F.normalize(codebook_GCE.detach().float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    cents = torch.stack([cn[g, torch.randperm(C, generator=gen)[:n_lists].to(cn.device)] for g in range(G)])  # [G, L, E]
    for _ in range(iters):
        assign = argmax_last(torch.bmm(cn, cents.transpose(1, 2)))[1][..., 0]  # [G, C]
        sums = torch.zeros_like(cents).scatter_add_(1, assign[..., None].expand(G, C, E), cn)
        filled = sums.norm(dim=-1, keepdim=True) > 0
        cents = torch.where(filled, F.normalize(sums, dim=-1), cents)  # an empty list keeps its centroid
    assign = argmax_last(torch.bmm(cn, cents.transpose(1, 2)))[1][..., 0]
    flat = (assign + torch.arange(G, device=cn.device)[:, None] * n_lists).reshape(-1)  # list of each code, all groups
    order = torch.argsort(flat, stable=True)
    starts = [0] + torch.cumsum(torch.bincount(flat, minlength=G * n_lists), 0).tolist()
    return IVFIndex(cents, cn.reshape(G * C, E)[order].contiguous(), order % C, starts, version_of(codebook_GCE))


def version_of(t: Tensor) -> tuple[int, int]:
    """(data pointer, in-place version): changes when the tensor is replaced or modified in place."""
    return t.data_ptr(), t._version


def exact_topk(q_GNE: Tensor, cn_GCE: Tensor, k: int, exclude_GC: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k cosine (sims, ids) [G, N, K] of unit queries against unit codes, in token chunks whose [G, n, C]
    score block stays in cache, 4 MB (the full [G, N, C] matrix is memory-bound to write and read)."""
    if q_GNE.dim() != 3 or cn_GCE.dim() != 3 or q_GNE.shape[0] != cn_GCE.shape[0] or q_GNE.shape[2] != cn_GCE.shape[2]:
        raise ValueError(f"exact_topk: queries [G, N, E] and codes [G, C, E] must agree in G and E; got {list(q_GNE.shape)} "
                         f"and {list(cn_GCE.shape)}")  # fmt: skip
    G, N, _ = q_GNE.shape
    C = cn_GCE.shape[1]
    check_int("k", k, 1, C)
    if exclude_GC is not None and (exclude_GC.shape != (G, C) or exclude_GC.dtype != torch.bool):
        raise ValueError(f"exclude must be a bool tensor [G, C] = {[G, C]}, got {exclude_GC.dtype} {list(exclude_GC.shape)}")
    step = max(32, (1 << 20) // max(1, G * C))
    sims = torch.empty(G, N, k, device=q_GNE.device)
    ids = torch.empty(G, N, k, dtype=torch.long, device=q_GNE.device)
    mask = exclude_GC.to(q_GNE.device)[:, None] if exclude_GC is not None else None
    for i in range(0, N, step):
        cos = torch.bmm(q_GNE[:, i:i + step], cn_GCE.transpose(1, 2))
        if mask is not None:
            cos = cos.masked_fill(mask, float("-inf"))
        sims[:, i:i + step], ids[:, i:i + step] = topk_last(cos, k)
    return sims, ids


def topk_last(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`s.topk(k, dim=-1)` (values, indices); for k = 1 through the faster `argmax_last`."""
    check_int("k", k, 1, s.shape[-1])
    return argmax_last(s) if k == 1 else s.topk(k, dim=-1)


def argmax_last(s: Tensor) -> tuple[Tensor, Tensor]:
    """`s.max(-1, keepdim=True)` (values, indices), about twice as fast on CPU.

    torch's max-with-indices reduction is not vectorised there; amax is. The maximum's position is then read with
    a matrix-vector product: w = clamp(s - max + 1e-30, 0) is 1e-30 at the maxima and 0 elsewhere (any other
    float32 entry sits at least one ulp below), so w @ arange gives the index and w.sum() the count. Rows with a
    tie or no finite entry go through torch.max itself, so the result always equals it."""
    if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() == 0 or s.shape[-1] == 0:
        raise ValueError(f"argmax_last takes a float tensor with a non-empty last dimension, got "
                         f"{getattr(s, 'dtype', type(s).__name__)} {list(getattr(s, 'shape', []))}")  # fmt: skip
    m = s.amax(-1, keepdim=True)
    w = (s - m).add_(1e-30).clamp_(min=0)
    C = s.shape[-1]
    idx = (w @ torch.arange(C, dtype=s.dtype, device=s.device)).mul_(1e30)
    cnt = w.sum(-1).mul_(1e30)
    ids = idx.round().long().clamp_(0, C - 1)[..., None]
    odd = (cnt - 1).abs() > 0.25  # a tie, or a row of -inf/NaN: torch.max decides
    if odd.any():
        m[odd], ids[odd] = s[odd].max(-1, keepdim=True)
    return m, ids


def ivf_topk(index: IVFIndex, q_GNE: Tensor, k: int, n_probe: int, exclude_GC: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Approximate top-k: (sims [G, N, K], ids [G, N, K], unsure [N]). The (token, probed list) pairs are sorted by
    list and each list scores its own tokens against its own codes in one matmul, whatever the loads are. Rows
    marked unsure (fewer than k finite candidates, e.g. all probed codes excluded) must be searched exactly."""
    G, N, E = q_GNE.shape
    check_int("k", k, 1), check_int("n_probe", n_probe, 1)
    L = index.centroids.shape[1]
    P = min(n_probe, L)
    dev = q_GNE.device
    probe = torch.bmm(q_GNE, index.centroids.transpose(1, 2)).topk(P, dim=-1).indices  # [G, N, P]
    lists = (probe + torch.arange(G, device=dev)[:, None, None] * L).reshape(-1)  # [G*N*P] list of each pair
    order = torch.argsort(lists, stable=True)
    q_sorted = q_GNE.reshape(G * N, E)[order // P]  # pair (g, n, p) is flat index (g * N + n) * P + p
    bounds = [0] + torch.cumsum(torch.bincount(lists, minlength=G * L), 0).tolist()
    kk = min(k, max(b - a for a, b in zip(index.starts, index.starts[1:])))
    if k > P * kk:
        raise ValueError(f"IVF search finds at most n_probe * (longest list) = {P * kk} codes per token, k={k}")
    cand_v = torch.full((len(lists), kk), float("-inf"), device=dev)
    cand_i = torch.zeros(len(lists), kk, dtype=torch.long, device=dev)
    for x in range(G * L):
        a, b, ca, cb = bounds[x], bounds[x + 1], index.starts[x], index.starts[x + 1]
        if a == b or ca == cb:
            continue
        sc = q_sorted[a:b] @ index.codes[ca:cb].T
        if exclude_GC is not None:
            sc = sc.masked_fill(exclude_GC[x // L, index.ids[ca:cb]].to(dev), float("-inf"))
        j = min(kk, cb - ca)
        v, i = topk_last(sc, j)
        cand_v[a:b, :j], cand_i[a:b, :j] = v, index.ids[ca:cb][i]
    flat_v, flat_i = torch.empty_like(cand_v), torch.empty_like(cand_i)
    flat_v[order], flat_i[order] = cand_v, cand_i
    flat_v, flat_i = flat_v.view(G, N, P * kk), flat_i.view(G, N, P * kk)
    sims, pick = topk_last(flat_v, k)
    ids = flat_i.gather(-1, pick)
    return sims, ids, ~torch.isfinite(sims).all(-1).all(0)
