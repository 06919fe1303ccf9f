"""Codebook features (Tamkin, Taufeeque, Goodman 2023): vector-quantisation bottlenecks inside a model.

    a_n = LayerNorm(a)                     (no affine: plain normalisation)
    ids = topk_k cos(a_n, c_j)             over the C codes of the codebook
    out = sum_{j in ids} c_j               (or the mean, as the reference code does)
    forward value out, input gradient straight through (d out / d a_n := I)
    L = L_task + mse_coef * MSE(out, stopgrad(a_n))       only chosen codes receive gradient

A grouped layer holds one codebook per attention head and quantises per-head outputs
[..., H, E] (the site `blocks.{i}.attn.hook_z`), as the paper's attention codebooks do.

At inference the search can be approximate (`layer.use_ivf(IVFConfig(...))`, see `search.py`; the paper's
speed appendix uses FAISS search). Training always searches exactly.

Dimension key: N tokens, G groups (heads), E width per group, C codes, K codes chosen, L lists, P lists probed.
"""

from __future__ import annotations

import numbers
import os
import pathlib
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import atomic_folder, load_json, load_tensors, save_json, save_tensors
from .search import IVFConfig, IVFIndex, build_ivf, check_int, exact_topk, ivf_topk, version_of


@dataclass(frozen=True)
class CodebookConfig:
    d_in: int  # width quantised per group (d_model, or d_head for a per-head codebook)
    n_codes: int  # codes per codebook
    k: int = 1  # codes chosen per token (per group)
    n_groups: int = 1  # >1: one codebook per head; the input then ends in [n_groups, d_in]
    reduce: Literal["sum", "mean"] = "sum"  # the paper sums the k codes; the reference code averages them

    def __post_init__(self):
        for name in ("d_in", "n_codes", "k", "n_groups"):
            check_int(f"CodebookConfig.{name}", getattr(self, name))
        if self.d_in <= 0 or self.n_codes <= 0 or self.n_groups <= 0:
            raise ValueError(f"need d_in, n_codes, n_groups > 0; got {self.d_in}, {self.n_codes}, {self.n_groups}")
        if not 0 < self.k <= self.n_codes:
            raise ValueError(f"need 0 < k <= n_codes, got k={self.k}, n_codes={self.n_codes}")
        if not isinstance(self.reduce, str) or self.reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {self.reduce!r}")


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
        if not isinstance(cfg, CodebookConfig):
            raise TypeError(f"CodebookLayer takes a CodebookConfig, got {type(cfg).__name__}")
        if seed is not None:
            check_int("seed", seed)
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        # codes start at the scale of a LayerNorm'd vector (norm sqrt(E))
        self.codebook = nn.Parameter(F.normalize(torch.randn(cfg.n_groups, cfg.n_codes, cfg.d_in, generator=gen), dim=-1) * cfg.d_in**0.5)
        self.register_buffer("counts", torch.zeros(cfg.n_groups, cfg.n_codes, dtype=torch.long), persistent=False)
        self._recent: Tensor | None = None  # a batch of normalised inputs, for dead-code replacement
        self.ivf: IVFConfig | None = None  # approximate inference search (see use_ivf)
        self._index: IVFIndex | None = None

    @classmethod
    def from_saved(cls, config: dict, codebook: Tensor | None, where: str) -> CodebookLayer:
        """A layer in eval mode from its `config_dict()` and codebook tensor as saved; `where` names them in errors."""
        try:
            layer = cls(CodebookConfig(**config), seed=None)
        except (TypeError, ValueError) as err:  # not a dict, unknown or missing fields, bad values
            raise ValueError(f"{where}: the saved config {config!r} is not a CodebookConfig ({err})") from err
        found = codebook if isinstance(codebook, Tensor) else torch.empty(0)
        if found.shape != layer.codebook.shape:
            raise ValueError(f"{where} missing or of shape {list(found.shape)}, expected {list(layer.codebook.shape)}")
        if not found.is_floating_point() or not bool(torch.isfinite(found).all()):
            raise ValueError(f"{where} must hold finite floats, got {found.dtype} with {int((~torch.isfinite(found.float())).sum())} NaN/inf")
        with torch.no_grad():
            layer.codebook.copy_(found)
        return layer.eval()

    def __repr__(self) -> str:  # names the layer in errors: its site when a CodebookModel holds it
        c = self.cfg
        where = f" at {self.site}" if getattr(self, "site", None) else ""
        return f"CodebookLayer{where}(d_in={c.d_in}, n_codes={c.n_codes}, k={c.k}, n_groups={c.n_groups})"

    def _grouped(self, x: Tensor) -> Tensor:
        """[..., G, E] (or [..., E] when G = 1) -> [N, G, E]; a non-float or non-finite input is refused."""
        G, E = self.cfg.n_groups, self.cfg.d_in
        expected = (G, E) if G > 1 else (E,)
        if not isinstance(x, Tensor):
            raise TypeError(f"{self!r}: input must be a float tensor [..., {', '.join(map(str, expected))}], got {type(x).__name__}")
        if x.dim() < len(expected) or tuple(x.shape[-len(expected):]) != expected:
            raise ValueError(f"{self!r}: input ends in {list(x.shape[-len(expected):])} (shape {list(x.shape)}), expected {list(expected)}")
        if not x.is_floating_point():
            raise ValueError(f"{self!r}: input dtype {x.dtype} is not floating point")
        if not bool(torch.isfinite(x).all()):  # NaN would pick code 0 everywhere, silently
            raise ValueError(f"{self!r}: input holds {int((~torch.isfinite(x)).sum())} non-finite values (NaN or inf) "
                             f"of {x.numel()}; only finite activations can be quantised")  # fmt: skip
        return x.reshape(-1, G, E)

    def _check_ids(self, ids: Tensor, n_tokens: int) -> Tensor:
        """Forced ids [..., (G,) K]: integers in [0, n_codes), k per token (per group)."""
        c = self.cfg
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{self!r}: ids must be an integer tensor [..., {'G, ' if c.n_groups > 1 else ''}K={c.k}], "
                             f"got {getattr(ids, 'dtype', type(ids).__name__)}")  # fmt: skip
        if ids.numel() != n_tokens * c.n_groups * c.k:
            raise ValueError(f"{self!r}: ids of shape {list(ids.shape)} do not give k={c.k} codes per token"
                             f"{f' and group (n_groups={c.n_groups})' if c.n_groups > 1 else ''} for {n_tokens} tokens")  # fmt: skip
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.n_codes):
            raise ValueError(f"{self!r}: ids must lie in [0, n_codes={c.n_codes}), got {int(ids.min())}..{int(ids.max())}")
        return ids

    def _check_exclude(self, exclude: Tensor) -> Tensor:
        """exclude [G, C] bool, leaving at least k codes per group to choose from."""
        c = self.cfg
        if not isinstance(exclude, Tensor) or exclude.dtype != torch.bool or tuple(exclude.shape) != (c.n_groups, c.n_codes):
            raise ValueError(f"{self!r}: exclude must be a bool tensor [n_groups, n_codes] = {[c.n_groups, c.n_codes]}, got "
                             f"{getattr(exclude, 'dtype', type(exclude).__name__)} {list(getattr(exclude, 'shape', []))}")  # fmt: skip
        left = int((~exclude).sum(1).min())
        if left < c.k:
            raise ValueError(f"{self!r}: exclude leaves {left} codes in some group, fewer than k={c.k}; "
                             f"at most n_codes - k = {c.n_codes - c.k} codes may be excluded")  # fmt: skip
        return exclude

    def snap(self, xn_NGE: Tensor, exclude_GC: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cosine top-k: (ids [N, G, K], sims [N, G, K]); codes marked in `exclude_GC` cannot be chosen.

        Exact while training; in eval mode the IVF index is used when one is set (`use_ivf`)."""
        q = F.normalize(xn_NGE, dim=-1).transpose(0, 1).contiguous()  # [G, N, E]
        k = self.cfg.k
        if self.ivf is None or self.training:
            sims, ids = exact_topk(q, F.normalize(self.codebook.detach(), dim=-1), k, exclude_GC)
            return ids.transpose(0, 1), sims.transpose(0, 1)
        index = self._index
        if index is None or index.version != version_of(self.codebook):  # not built yet, or stale
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
        grouped = self._grouped(x)
        lead = x.shape[:-2] if self.cfg.n_groups > 1 else x.shape[:-1]
        if exclude is not None:
            self._check_exclude(exclude)
        if ids is not None:
            self._check_ids(ids, len(grouped))
        xn = F.layer_norm(grouped.float(), (self.cfg.d_in,))
        near_ids, sims = self.snap(xn.detach(), exclude)
        if ids is not None:
            ids = ids.long().reshape(near_ids.shape[0], self.cfg.n_groups, -1).to(near_ids.device)
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
    def replace_dead_codes_(self, noise: float = 0.01, seed: int = 0) -> int:
        """Re-seed the codes that never fired since the last call from recent inputs (+ relative noise); returns
        how many. Training objectives call it every few steps (`CodebookObjective(replace_after=...)`)."""
        if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not 0 <= noise < float("inf"):
            raise ValueError(f"noise must be a finite number >= 0 (relative noise on re-seeded codes), got {noise!r}")
        check_int("seed", seed)
        replaced = 0
        if self._recent is not None:
            gen = torch.Generator(device=self.codebook.device).manual_seed(seed)
            for g in range(self.cfg.n_groups):
                dead = (self.counts[g] == 0).nonzero().flatten()
                if len(dead):
                    pool = self._recent[:, g]
                    pick = pool[torch.randint(len(pool), (len(dead),), generator=gen, device=pool.device)]
                    self.codebook[g, dead] = pick + torch.randn(pick.shape, generator=gen, device=pick.device) * noise * pick.norm(dim=-1, keepdim=True)
                    replaced += len(dead)
        self.counts.zero_()
        return replaced

    @torch.no_grad()
    def init_kmeans_(self, x: Tensor, iters: int = 20, seed: int = 0) -> None:
        """Initialise each codebook with k-means centroids of normalised activations x [..., (G,) E]."""
        check_int("iters", iters, 0), check_int("seed", seed)
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
        return asdict(self.cfg)


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


def save_codebook_layer(layer: CodebookLayer, folder: str | os.PathLike, **meta: Any) -> None:
    """codebook.safetensors + codebook.json (the config and `meta`, e.g. the site it was fitted at), the folder atomically."""
    if not isinstance(layer, CodebookLayer):
        raise TypeError(f"save_codebook_layer saves a CodebookLayer, got {type(layer).__name__}")
    if "config" in meta:
        raise ValueError("save_codebook_layer: 'config' is reserved for the layer's own config; name the metadata otherwise")
    with atomic_folder(folder) as tmp:
        save_tensors(tmp / "codebook.safetensors", {"codebook": layer.codebook})
        save_json(tmp / "codebook.json", {"config": layer.config_dict(), **meta})


def load_codebook_layer(folder: str | os.PathLike) -> CodebookLayer:
    """A layer saved by `save_codebook_layer`, in eval mode; `layer.meta` holds what was saved with it."""
    folder = pathlib.Path(folder)
    meta = load_json(folder / "codebook.json")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{folder}/codebook.json has no 'config' object: not a codebook layer folder")
    layer = CodebookLayer.from_saved(meta.pop("config"), load_tensors(folder / "codebook.safetensors").get("codebook"), f"{folder}: codebook")
    layer.meta = meta
    return layer
