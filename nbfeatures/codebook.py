"""Codebook features (Tamkin, Taufeeque, Goodman 2023): vector-quantisation bottlenecks inside a model.

    a_n = LayerNorm(a)                     (no affine: plain normalisation)
    ids = topk_k cos(a_n, c_j)             over the C codes of the codebook
    out = sum_{j in ids} c_j               (or the mean, as the reference code does)
    forward value out, input gradient straight through (d out / d a_n := I)
    L = L_task + mse_coef * MSE(out, stopgrad(a_n))       only chosen codes receive gradient

A grouped layer holds one codebook per attention head and quantises per-head outputs
[..., H, E] (the site `blocks.{i}.attn.hook_z`), as the paper's attention codebooks do.

Dimension key: N tokens, G groups (heads), E width per group, C codes, K codes chosen.
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
        """Cosine top-k: (ids [N, G, K], sims [N, G, K]); codes marked in `exclude_GC` cannot be chosen."""
        # [G, N, C] straight from a batched matmul: no permuted copy of the (large) similarity matrix
        cos = torch.bmm(F.normalize(xn_NGE, dim=-1).transpose(0, 1), F.normalize(self.codebook, dim=-1).transpose(1, 2))
        if exclude_GC is not None:
            cos = cos.masked_fill(exclude_GC.to(cos.device)[:, None], float("-inf"))
        if self.cfg.k == 1:
            sims, ids = cos.max(dim=-1, keepdim=True)  # much cheaper than topk
        else:
            sims, ids = cos.topk(self.cfg.k, dim=-1)
        return ids.transpose(0, 1), sims.transpose(0, 1)

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
