"""InversionView's view of the probed model: the distance D, the sites it reads, and training pairs made on the fly.

    D(a, z) = min_t ||a_t - z|| / ||z||   (or min_t 1 - cos(a_t, z))      preimage_eps(z) = {x : D(f(x), z) <= eps}

A site is a `sites` name; `blocks.{i}.attn.hook_z.{h}` means head h's output (its slice of the input of the
attention's output projection).

Dimension key: B batch, T position, D activation width (zero-padded to the widest site).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import sites as S
from .._checks import check_int


METRICS = ("euclidean", "cosine")
_HEAD = re.compile(r"(.+\.attn\.hook_z)\.(\d+)")


# ----------------------------------------------------------------------------- argument checks


def _shape(t: Any) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


# ----------------------------------------------------------------------------- distance


def distance(z_D: Tensor, acts_BTD: Tensor, mask_BT: Tensor | None = None, metric: str = "euclidean") -> tuple[Tensor, Tensor]:
    """(min over valid positions of D(acts[b, t], z) [B], the position it is at [B]).

    euclidean: ||a - z|| / ||z||;  cosine: 1 - cos(a, z). `mask_BT` marks the positions a candidate has.
    z is one query [D] for every row, or one query per row [B, D].
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(z_D, Tensor) or not z_D.is_floating_point() or z_D.dim() not in (1, 2):
        raise ValueError(f"z must be a float tensor [D] or [B, D], got {_shape(z_D)}")
    if not isinstance(acts_BTD, Tensor) or not acts_BTD.is_floating_point() or acts_BTD.dim() != 3:
        raise ValueError(f"acts must be a float tensor [B, T, D], got {_shape(acts_BTD)}")
    if not bool(torch.isfinite(z_D).all()):
        raise ValueError(f"z holds {int((~torch.isfinite(z_D)).sum())} non-finite values (NaN or inf); z must be finite")
    if mask_BT is not None and (not isinstance(mask_BT, Tensor) or tuple(mask_BT.shape) != tuple(acts_BTD.shape[:2])):
        raise ValueError(f"mask must be a bool tensor [B, T] = {list(acts_BTD.shape[:2])}, got {_shape(mask_BT)}")
    if acts_BTD.shape[-1] != z_D.shape[-1]:
        raise ValueError(f"z has width {z_D.shape[-1]} but the activations have width {acts_BTD.shape[-1]}")
    if z_D.dim() == 2 and len(z_D) != len(acts_BTD):
        raise ValueError(f"{len(z_D)} queries for {len(acts_BTD)} candidates; pass one z [D] or one per candidate [B, D]")
    z = z_D.float()[:, None] if z_D.dim() == 2 else z_D.float()  # [B, 1, D] or [D]
    acts_BTD = acts_BTD.float()
    if metric == "euclidean":
        d_BT = (acts_BTD - z).norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-12)
    else:
        d_BT = 1 - F.cosine_similarity(acts_BTD, z.expand_as(acts_BTD), dim=-1, eps=1e-12)
    if mask_BT is not None:
        d_BT = d_BT.masked_fill(~mask_BT.bool(), math.inf)
    return d_BT.min(dim=-1)


def split_site(name: str) -> tuple[str, int | None]:
    """'blocks.1.attn.hook_z.0' -> ('blocks.1.attn.hook_z', 0); any other name -> (name, None)."""
    m = _HEAD.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def default_sites(model: S.Model) -> list[str]:
    """The residual stream at every layer, every attention and MLP output, and every head's output."""
    names = S.site_names(model)
    n_layers = sum(n.endswith("hook_resid_post") for n in names)
    heads = S.resolve(model, "blocks.0.attn.hook_z").heads or 1
    out = ["blocks.0.hook_resid_pre"]
    for i in range(n_layers):
        out += [f"blocks.{i}.attn.hook_z.{h}" for h in range(heads)]
        out += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out", f"blocks.{i}.hook_resid_post"]
    return out


def read_sites(model: S.Model, ids_BT: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Activations [B, T, D] at each site (head sites sliced out of hook_z) from one forward pass, on the ids' device
    (the probed model may run elsewhere)."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a list of site names (str), got {names!r}")
    base = {n: split_site(n) for n in names}
    for name, (site, head) in base.items():
        resolved = S.resolve(model, site)  # ValueError naming the valid sites
        if head is not None and not (resolved.heads and head < resolved.heads):
            raise ValueError(f"site {name!r}: head {head} does not exist; the model has {resolved.heads or 0} heads")
    with torch.no_grad():
        acts = S.read_acts(model, ids_BT, sorted({s for s, _ in base.values()}))
    home = ids_BT.device if isinstance(ids_BT, Tensor) else torch.device("cpu")
    return {n: (acts[s][:, :, h] if h is not None else acts[s]).float().to(home) for n, (s, h) in base.items()}


def site_widths(model: S.Model, sites: Sequence, bos_id: int) -> dict[str, int]:
    """Site name -> activation width, for site names and `FeatureSite`s."""
    plain = [s for s in sites if isinstance(s, str)]
    acts = read_sites(model, torch.tensor([[bos_id]]), plain) if plain else {}
    return {site_name(s): (acts[s].shape[-1] if isinstance(s, str) else s.W_dec_FD.shape[1]) for s in sites}


@dataclass(frozen=True, eq=False)
class FeatureSite:
    """One dictionary latent at a time as a decoder site: z = a_i(x_t) W_dec[i], the activation restricted to latent i.

    `encode` maps activations [..., D] at `site` to latent activations [..., F] (an SAE's encoder, a codebook's
    code counts); W_dec [F, D] holds each latent's direction. A training pair picks a random latent active at the
    query position; a candidate is measured on the query's latent, so D = min_t ||a_i(x_t) W_dec[i] - z|| / ||z||
    = min_t |a_i(x_t) / a - 1| asks "does latent i fire like this (within epsilon) somewhere in x?".
    """

    name: str
    site: str
    encode: Callable[[Tensor], Tensor]
    W_dec_FD: Tensor

    def __post_init__(self):
        if not isinstance(self.name, str) or not isinstance(self.site, str):
            raise TypeError(f"FeatureSite: name and site must be strings, got name={self.name!r}, site={self.site!r}")
        if not callable(self.encode):
            raise TypeError(f"FeatureSite {self.name!r}: encode must be callable (activations [..., D] -> latents [..., F]), got {type(self.encode).__name__}")
        W = self.W_dec_FD
        if not isinstance(W, Tensor) or not W.is_floating_point() or W.dim() != 2 or 0 in W.shape:
            raise ValueError(f"FeatureSite {self.name!r}: W_dec must be a non-empty float tensor [F, D], got {_shape(W)}")

    @classmethod
    def from_sae(cls, sae: torch.nn.Module, site: str, name: str | None = None) -> FeatureSite:
        """Any SAE with encode(x) -> [..., F] and W_dec [F, D] (TopK, ReLU, binary)."""
        if not callable(getattr(sae, "encode", None)) or not isinstance(getattr(sae, "W_dec", None), Tensor):
            raise TypeError(f"FeatureSite.from_sae takes an SAE with encode(x) and W_dec [F, D] (TopK, ReLU, binary), got {type(sae).__name__}")
        return cls(name or f"{site}:sae", site, sae.encode, sae.W_dec.detach().float())

    @classmethod
    def from_codebook(cls, layer: torch.nn.Module, site: str, name: str | None = None) -> FeatureSite:
        """A single-group codebook reading `site`: latent i counts how often code i is chosen (k codes per token)."""
        if not isinstance(getattr(getattr(layer, "cfg", None), "n_groups", None), int) or not isinstance(getattr(layer, "codebook", None), Tensor):
            raise TypeError(f"FeatureSite.from_codebook takes a CodebookLayer, got {type(layer).__name__}")
        if layer.cfg.n_groups != 1:
            raise ValueError(f"FeatureSite.from_codebook takes a single-group codebook, got n_groups={layer.cfg.n_groups}")
        return cls(name or f"{site}:codebook", site, lambda x: layer(x).latents, layer.codebook.detach()[0].float())

    def latents(self, acts_BTD: Tensor) -> Tensor:
        with torch.no_grad():
            lat = self.encode(acts_BTD).float()
        if lat.shape[:-1] != acts_BTD.shape[:-1] or lat.shape[-1] != len(self.W_dec_FD):
            raise ValueError(f"feature site {self.name!r}: encode gave shape {list(lat.shape)} for activations "
                             f"{list(acts_BTD.shape)}; expected [..., {len(self.W_dec_FD)}] (one value per W_dec row)")  # fmt: skip
        return lat

    def restrict(self, acts_BTD: Tensor, latent_B: Tensor) -> Tensor:
        """a_i(x_t) W_dec[i] [B, T, D] for each row's latent i."""
        self.check_latents(latent_B, len(acts_BTD))
        lat_BTF = self.latents(acts_BTD)
        a_BT = lat_BTF.gather(-1, latent_B[:, None, None].expand(-1, lat_BTF.shape[1], 1))[..., 0]
        return a_BT[..., None] * self.W_dec_FD[latent_B][:, None, :]


    def check_latents(self, latent_B: Any, n: int) -> None:
        """latent_B: an integer tensor [n] of latents in [0, F)."""
        F_ = len(self.W_dec_FD)
        if (not isinstance(latent_B, Tensor) or latent_B.is_floating_point() or latent_B.dtype == torch.bool
                or tuple(latent_B.shape) != (n,)):  # fmt: skip
            raise ValueError(f"feature site {self.name!r}: latents must be an integer tensor [{n}] (one per row), got {_shape(latent_B)}")
        if n and (int(latent_B.min()) < 0 or int(latent_B.max()) >= F_):
            raise ValueError(f"feature site {self.name!r}: latents must lie in 0..{F_ - 1}, got {int(latent_B.min())}..{int(latent_B.max())}")


def site_name(site: str | FeatureSite) -> str:
    if not isinstance(site, (str, FeatureSite)):
        raise TypeError(f"site must be a site name (str) or a FeatureSite, got {type(site).__name__} {site!r}")
    return site if isinstance(site, str) else site.name


def site_acts(model: S.Model, ids_BT: Tensor, site: str | FeatureSite, latent_B: Tensor | None = None) -> Tensor:
    """Activations [B, T, D] at a site; at a feature site, restricted to each row's latent."""
    site_name(site)
    if isinstance(site, str):
        return read_sites(model, ids_BT, [site])[site]
    if latent_B is None:
        raise ValueError(f"feature site {site.name!r} needs a latent per row")
    return site.restrict(read_sites(model, ids_BT, [site.site])[site.site], latent_B)


@dataclass
class PairSource:
    """(z, input, site) triples made on the fly through the probed model.

    `inputs(n, seed)` returns token ids [n, T] (right-padded, BOS first); `query_mask(ids)` marks the positions a
    query may sit at (default: every position but BOS, before the first EOS/pad). `sites` holds site names and
    `FeatureSite`s.
    """

    model: S.Model
    sites: Sequence[str | FeatureSite]
    inputs: Callable[[int, int], Tensor]
    query_mask: Callable[[Tensor], Tensor] | None = None
    eos_id: int | None = None

    def __post_init__(self):
        if isinstance(self.sites, (str, FeatureSite)) or not isinstance(self.sites, Sequence) or not self.sites:
            raise TypeError(f"PairSource: sites must be a non-empty list of site names and FeatureSites, got {self.sites!r}")
        names = [site_name(s) for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"PairSource: site names must be distinct, got {names}")
        if not callable(self.inputs):
            raise TypeError(f"PairSource: inputs must be a callable (n, seed) -> token ids [n, T], got {type(self.inputs).__name__}")
        if self.query_mask is not None and not callable(self.query_mask):
            raise TypeError(f"PairSource: query_mask must be None or a callable ids -> bool [n, T], got {type(self.query_mask).__name__}")
        if self.eos_id is not None:
            check_int("PairSource: eos_id", self.eos_id, 0)

    @property
    def names(self) -> list[str]:
        return [site_name(s) for s in self.sites]

    def batch(self, n: int, seed: int, site_weights: Tensor | None = None, site: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(z [n, D_max] zero-padded, ids [n, T], site index [n]).

        Sites are drawn uniformly, from `site_weights` (unnormalised, one per site), or all `site` (an index).
        """
        return self.pairs(n, seed, site_weights, site)[:3]

    def pairs(self, n: int, seed: int, site_weights: Tensor | None = None, site: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`batch` plus the latent each row of a feature site was restricted to [n] (-1 at plain sites)."""
        check_int("n", n, 1), check_int("seed", seed)
        if site is not None:
            check_int("site", site)
        if site is not None and not 0 <= site < len(self.sites):
            raise ValueError(f"site index {site} is outside 0..{len(self.sites) - 1}")
        ids_BT = self.inputs(n, seed)
        if not isinstance(ids_BT, Tensor) or ids_BT.is_floating_point() or ids_BT.dtype == torch.bool or ids_BT.dim() != 2 or len(ids_BT) != n:
            raise ValueError(f"PairSource: inputs({n}, seed) must return integer token ids [{n}, T], got {_shape(ids_BT)}")
        gen = torch.Generator().manual_seed(seed)
        wanted = self.sites if site is None else [self.sites[site]]
        acts = read_sites(self.model, ids_BT, sorted({s if isinstance(s, str) else s.site for s in wanted}))
        mask_BT = self.query_mask(ids_BT) if self.query_mask else real_positions(ids_BT, self.eos_id)
        if not isinstance(mask_BT, Tensor) or mask_BT.dtype != torch.bool or mask_BT.shape != ids_BT.shape:
            raise ValueError(f"PairSource: query_mask(ids) must return a bool tensor of the ids' shape {list(ids_BT.shape)}, got {_shape(mask_BT)}")
        mask_BT = mask_BT.clone()
        mask_BT[:, 0] &= self.query_mask is not None  # BOS carries no information; only a custom mask may ask for it
        if not bool(mask_BT.any(1).all()):
            raise ValueError("query_mask leaves some inputs without a position to query")
        pos_B = torch.multinomial(mask_BT.float(), 1, generator=gen)[:, 0]
        if site is not None:
            site_B = torch.full((n,), site, dtype=torch.long)
        elif site_weights is not None:
            try:
                w = torch.as_tensor(site_weights, dtype=torch.float)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"site_weights must be {len(self.sites)} non-negative numbers, finite and not all zero; got {site_weights!r}") from err
            if w.shape != (len(self.sites),) or not bool((w >= 0).all() & torch.isfinite(w).all()) or not w.sum() > 0:
                raise ValueError(f"site_weights must be {len(self.sites)} non-negative numbers, finite and not all zero; got {w.tolist()}")
            site_B = torch.multinomial(w, n, replacement=True, generator=gen)
        else:
            site_B = torch.randint(len(self.sites), (n,), generator=gen)
        widths = [a.shape[-1] for a in acts.values()] + [s.W_dec_FD.shape[1] for s in wanted if not isinstance(s, str)]
        z_BD = torch.zeros(n, max(widths))
        latent_B = torch.full((n,), -1, dtype=torch.long)
        rows = torch.arange(n)
        for s, st in enumerate(self.sites):
            pick = site_B == s
            if not bool(pick.any()):
                continue
            if isinstance(st, str):
                a = acts[st][rows[pick], pos_B[pick]]
            else:  # a random latent among those active at the query position (any latent where none is)
                lat = st.latents(acts[st.site][rows[pick], pos_B[pick]])
                active = (lat > 0).float()
                active[active.sum(1) == 0] = 1.0
                latent_B[pick] = torch.multinomial(active, 1, generator=gen)[:, 0]
                a = lat.gather(1, latent_B[pick][:, None]) * st.W_dec_FD[latent_B[pick]]
            z_BD[pick, : a.shape[-1]] = a
        return z_BD, ids_BT, site_B, latent_B


def real_positions(ids_BT: Tensor, eos_id: int | None) -> Tensor:
    """Bool [B, T]: positions before the first EOS after BOS (all positions when eos_id is None)."""
    if not isinstance(ids_BT, Tensor) or ids_BT.dim() != 2:
        raise ValueError(f"ids must be token ids [B, T], got {_shape(ids_BT)}")
    if eos_id is None:
        return torch.ones_like(ids_BT, dtype=torch.bool)
    is_eos = ids_BT == eos_id
    is_eos[:, 0] = False
    return is_eos.long().cumsum(1) == 0
