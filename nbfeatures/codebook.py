"""Codebook features (Tamkin, Taufeeque, Goodman 2023): vector-quantisation bottlenecks inside a model.

    a_n = LayerNorm(a)                     (no affine: plain normalisation)
    ids = topk_k cos(a_n, c_j)             over the C codes of the codebook
    out = sum_{j in ids} c_j               (or the mean, as the reference code does)
    forward value out, input gradient straight through (d out / d a_n := I)
    L = L_task + mse_coef * MSE(out, stopgrad(a_n))       only chosen codes receive gradient

A grouped layer holds one codebook per attention head and quantises per-head outputs
[..., H, E] (the site `blocks.{i}.attn.hook_z`), as the paper's attention codebooks do.

At inference the search can be approximate (`layer.use_ivf(IVFConfig(...))`): an inverted-file index, the
codes clustered into L lists by spherical k-means, each token scored against the codes of the `n_probe` lists
nearest to it only (FAISS's IndexIVFFlat in spirit; the paper's speed appendix uses FAISS search). With
n_probe = L it returns exactly the exact search's codes. Training always searches exactly.

Dimension key: N tokens, G groups (heads), E width per group, C codes, K codes chosen, L lists, P lists probed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class CodebookConfig:
    d_in: int  # width quantised per group (d_model, or d_head for a per-head codebook)
    n_codes: int  # codes per codebook
    k: int = 1  # codes chosen per token (per group)
    n_groups: int = 1  # >1: one codebook per head; the input then ends in [n_groups, d_in]
    reduce: Literal["sum", "mean"] = "sum"  # the paper sums the k codes; the reference code averages them
    replace_after: int = 0  # every this many training steps re-initialise codes that never fired (0: never)
    replace_noise: float = 0.01  # relative noise on re-initialised codes

    def __post_init__(self):
        if self.d_in <= 0 or self.n_codes <= 0 or self.n_groups <= 0:
            raise ValueError(f"need d_in, n_codes, n_groups > 0; got {self.d_in}, {self.n_codes}, {self.n_groups}")
        if not 0 < self.k <= self.n_codes:
            raise ValueError(f"need 0 < k <= n_codes, got k={self.k}, n_codes={self.n_codes}")
        if self.reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {self.reduce!r}")
        if self.replace_after < 0:
            raise ValueError(f"replace_after must be >= 0, got {self.replace_after}")


@dataclass(frozen=True)
class IVFConfig:
    """Approximate inference search: score each token against the codes of its `n_probe` nearest lists only."""

    n_lists: int = 0  # lists per codebook; 0: about sqrt(n_codes)
    n_probe: int = 4  # lists searched per token (n_probe = n_lists: exact)
    iters: int = 10  # spherical k-means iterations when the index is built
    seed: int = 0

    def __post_init__(self):
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
    G, C, E = codebook_GCE.shape
    if not 0 < n_lists <= C:
        raise ValueError(f"n_lists must be in 1..n_codes={C}, got {n_lists}")
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
    return IVFIndex(cents, cn.reshape(G * C, E)[order].contiguous(), order % C, starts, _version_of(codebook_GCE))


def _version_of(t: Tensor) -> tuple[int, int]:
    """(data pointer, in-place version): changes when the tensor is replaced or modified in place."""
    return t.data_ptr(), t._version


def exact_topk(q_GNE: Tensor, cn_GCE: Tensor, k: int, exclude_GC: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k cosine (sims, ids) [G, N, K] of unit queries against unit codes, in token chunks whose [G, n, C]
    score block stays in cache, 4 MB (the full [G, N, C] matrix is memory-bound to write and read)."""
    G, N, _ = q_GNE.shape
    C = cn_GCE.shape[1]
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
    return argmax_last(s) if k == 1 else s.topk(k, dim=-1)


def argmax_last(s: Tensor) -> tuple[Tensor, Tensor]:
    """`s.max(-1, keepdim=True)` (values, indices), about twice as fast on CPU.

    torch's max-with-indices reduction is not vectorised there; amax is. The maximum's position is then read with
    a matrix-vector product: w = clamp(s - max + 1e-30, 0) is 1e-30 at the maxima and 0 elsewhere (any other
    float32 entry sits at least one ulp below), so w @ arange gives the index and w.sum() the count. Rows with a
    tie or no finite entry go through torch.max itself, so the result always equals it."""
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


class CodebookOutput(NamedTuple):
    x_hat: Tensor  # [..., (G,) E] what the model sees: the codes' sum, with a straight-through gradient
    codes: Tensor  # [..., (G,) K] chosen code ids, most similar first
    sims: Tensor  # [..., (G,) K] their cosine similarities
    quantized: Tensor  # [..., (G,) E] the codes' sum itself (gradient to the codebook only)
    target: Tensor  # [..., (G,) E] the normalised input, detached (what the codes should reconstruct)
    n_codes: int  # codes per codebook

    @property
    def latents(self) -> Tensor:
        """Counts of the chosen codes [..., (G,) C] (one-hot for k = 1), for galleries and densities."""
        return torch.zeros(*self.codes.shape[:-1], self.n_codes, device=self.codes.device).scatter_add_(
            -1, self.codes, torch.ones_like(self.codes, dtype=torch.float))


class CodebookLayer(nn.Module):
    """One codebook (or one per group) with cosine top-k snapping and a straight-through estimator."""

    architecture = "nbfeatures.codebook"

    def __init__(self, cfg: CodebookConfig, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # codes start at the scale of a LayerNorm'd vector (norm sqrt(E))
        self.codebook = nn.Parameter(F.normalize(torch.randn(cfg.n_groups, cfg.n_codes, cfg.d_in, generator=gen), dim=-1) * cfg.d_in**0.5)
        self.register_buffer("counts", torch.zeros(cfg.n_groups, cfg.n_codes, dtype=torch.long), persistent=False)
        self._recent: Tensor | None = None  # a batch of normalised inputs, for dead-code replacement
        self._steps = 0
        self.ivf: IVFConfig | None = None  # approximate inference search (see use_ivf)
        self._index: IVFIndex | None = None

    @classmethod
    def from_saved(cls, config: dict, codebook: Tensor | None, where: str) -> CodebookLayer:
        """A layer in eval mode from its `config_dict()` and codebook tensor as saved; `where` names them in errors."""
        layer = cls(CodebookConfig(**config), seed=None)
        found = codebook if codebook is not None else torch.empty(0)
        if found.shape != layer.codebook.shape:
            raise ValueError(f"{where} missing or of shape {list(found.shape)}, expected {list(layer.codebook.shape)}")
        with torch.no_grad():
            layer.codebook.copy_(found)
        return layer.eval()

    def _grouped(self, x: Tensor) -> Tensor:
        """[..., G, E] (or [..., E] when G = 1) -> [N, G, E]."""
        G, E = self.cfg.n_groups, self.cfg.d_in
        expected = (G, E) if G > 1 else (E,)
        if tuple(x.shape[-len(expected):]) != expected:
            raise ValueError(f"CodebookLayer: input ends in {list(x.shape[-len(expected):])} (shape {list(x.shape)}), expected {list(expected)}")
        if not x.is_floating_point():
            raise ValueError(f"CodebookLayer: input dtype {x.dtype} is not floating point")
        return x.reshape(-1, G, E)

    def snap(self, xn_NGE: Tensor, exclude_GC: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cosine top-k: (ids [N, G, K], sims [N, G, K]); codes marked in `exclude_GC` cannot be chosen.

        Exact while training; in eval mode the IVF index is used when one is set (`use_ivf`)."""
        q = F.normalize(xn_NGE, dim=-1).transpose(0, 1).contiguous()  # [G, N, E]
        k = self.cfg.k
        if self.ivf is None or self.training:
            sims, ids = exact_topk(q, F.normalize(self.codebook.detach(), dim=-1), k, exclude_GC)
            return ids.transpose(0, 1), sims.transpose(0, 1)
        index = self._index
        if index is None or index.version != _version_of(self.codebook):  # not built yet, or stale
            n_lists = self.ivf.n_lists or max(1, round(self.cfg.n_codes**0.5))
            index = self._index = build_ivf(self.codebook, min(n_lists, self.cfg.n_codes), self.ivf.iters, self.ivf.seed)
        sims, ids, unsure = ivf_topk(index, q, k, self.ivf.n_probe, exclude_GC)
        if unsure.any():
            rows = unsure.nonzero().flatten()
            sims[:, rows], ids[:, rows] = exact_topk(q[:, rows], F.normalize(self.codebook.detach(), dim=-1), k, exclude_GC)
        return ids.transpose(0, 1), sims.transpose(0, 1)

    def use_ivf(self, ivf: IVFConfig | None = IVFConfig()) -> CodebookLayer:
        """Search with an IVF index in eval mode (None: exact search again). The index is (re)built lazily from the
        current codebook, so loading new weights or training never leaves a stale index behind."""
        if ivf is not None and not isinstance(ivf, IVFConfig):
            raise TypeError(f"use_ivf takes an IVFConfig or None, got {type(ivf).__name__}")
        self.ivf, self._index = ivf, None
        return self

    def lookup(self, ids_NGK: Tensor) -> Tensor:
        """Sum (or mean) of the chosen codes [N, G, E]; differentiable in the codebook."""
        picked = self._codes_at(ids_NGK)  # [N, G, K, E]
        return picked.sum(-2) if self.cfg.reduce == "sum" else picked.mean(-2)

    def forward(self, x: Tensor, ids: Tensor | None = None, exclude: Tensor | None = None) -> CodebookOutput:
        """Quantise x; `ids` [..., (G,) K] forces those codes, `exclude` [G, C] bars codes from being chosen."""
        lead = x.shape[:-2] if self.cfg.n_groups > 1 else x.shape[:-1]
        xn = F.layer_norm(self._grouped(x).float(), (self.cfg.d_in,))
        near_ids, sims = self.snap(xn.detach(), exclude)
        if ids is not None:
            ids = ids.reshape(near_ids.shape[0], self.cfg.n_groups, -1).to(near_ids.device)
            sims = torch.einsum("nge,ngke->ngk", F.normalize(xn.detach(), dim=-1), F.normalize(self._codes_at(ids), dim=-1))
        else:
            ids = near_ids
        quantized = self.lookup(ids)
        x_hat = quantized + (xn - xn.detach())  # value: the codes; input gradient: straight through
        if self.training:
            with torch.no_grad():
                self.counts.scatter_add_(1, ids.permute(1, 0, 2).reshape(self.cfg.n_groups, -1),
                                         torch.ones(1, dtype=torch.long, device=ids.device).expand(self.cfg.n_groups, ids.numel() // self.cfg.n_groups))
                self._recent = xn.detach()
        shape = (*lead, self.cfg.n_groups) if self.cfg.n_groups > 1 else tuple(lead)
        return CodebookOutput(x_hat.reshape(*shape, -1).to(x.dtype), ids.reshape(*shape, -1), sims.reshape(*shape, -1),
                              quantized.reshape(*shape, -1), xn.detach().reshape(*shape, -1), self.cfg.n_codes)

    def _codes_at(self, ids_NGK: Tensor) -> Tensor:
        """The code vectors [N, G, K, E] at per-group ids [N, G, K]."""
        G = self.cfg.n_groups
        flat = self.codebook.reshape(G * self.cfg.n_codes, self.cfg.d_in)
        return F.embedding(ids_NGK + (torch.arange(G, device=ids_NGK.device) * self.cfg.n_codes)[None, :, None], flat)

    @torch.no_grad()
    def after_step_(self) -> None:
        """Training hook: every `replace_after` steps, re-seed codes that never fired from recent inputs."""
        self._steps += 1
        if not self.cfg.replace_after or self._steps % self.cfg.replace_after or self._recent is None:
            return
        gen = torch.Generator(device=self.codebook.device).manual_seed(self._steps)
        for g in range(self.cfg.n_groups):
            dead = (self.counts[g] == 0).nonzero().flatten()
            if len(dead):
                pool = self._recent[:, g]
                pick = pool[torch.randint(len(pool), (len(dead),), generator=gen, device=pool.device)]
                noise = torch.randn(pick.shape, generator=gen, device=pick.device) * self.cfg.replace_noise * pick.norm(dim=-1, keepdim=True)
                self.codebook[g, dead] = pick + noise
        self.counts.zero_()

    @torch.no_grad()
    def init_kmeans_(self, x: Tensor, iters: int = 20, seed: int = 0) -> None:
        """Initialise each codebook with k-means centroids of normalised activations x [..., (G,) E]."""
        xn = F.layer_norm(self._grouped(x).float(), (self.cfg.d_in,))
        gen = torch.Generator().manual_seed(seed)
        for g in range(self.cfg.n_groups):
            pts = xn[:, g]
            if len(pts) < self.cfg.n_codes:
                raise ValueError(f"k-means needs at least n_codes={self.cfg.n_codes} activations, got {len(pts)}")
            centroids = _kmeans_plus_plus(pts, self.cfg.n_codes, gen)
            for _ in range(iters):
                assign = torch.cdist(pts, centroids).argmin(1)
                sums = torch.zeros_like(centroids).index_add_(0, assign, pts)
                counts = torch.bincount(assign, minlength=self.cfg.n_codes)
                filled = counts > 0
                centroids[filled] = sums[filled] / counts[filled, None]
            self.codebook[g] = centroids

    def config_dict(self) -> dict:
        c = self.cfg
        return {"d_in": c.d_in, "n_codes": c.n_codes, "k": c.k, "n_groups": c.n_groups, "reduce": c.reduce}


def _kmeans_plus_plus(pts_NE: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centroid drawn with probability proportional to its squared distance."""
    centroids = [pts_NE[torch.randint(len(pts_NE), (1,), generator=gen)].squeeze(0)]
    d2 = (pts_NE - centroids[0]).pow(2).sum(-1)
    for _ in range(n - 1):
        i = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=gen)
        centroids.append(pts_NE[i].squeeze(0))
        d2 = torch.minimum(d2, (pts_NE - centroids[-1]).pow(2).sum(-1))
    return torch.stack(centroids).clone()


def codebook_mse(out: CodebookOutput) -> Tensor:
    """MSE between the chosen codes and the (detached) normalised input: the codebook's own loss."""
    return (out.quantized - out.target).pow(2).mean()
