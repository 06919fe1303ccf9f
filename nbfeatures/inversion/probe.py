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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import sites as S


METRICS = ("euclidean", "cosine")
_HEAD = re.compile(r"(.+\.attn\.hook_z)\.(\d+)")


# ----------------------------------------------------------------------------- distance


def distance(z_D: Tensor, acts_BTD: Tensor, mask_BT: Tensor | None = None, metric: str = "euclidean") -> tuple[Tensor, Tensor]:
    """(min over valid positions of D(acts[b, t], z) [B], the position it is at [B]).

    euclidean: ||a - z|| / ||z||;  cosine: 1 - cos(a, z). `mask_BT` marks the positions a candidate has.
    z is one query [D] for every row, or one query per row [B, D].
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
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
    """Activations [B, T, D] at each site (head sites sliced out of hook_z) from one forward pass."""
    base = {n: split_site(n) for n in names}
    for name, (site, head) in base.items():
        resolved = S.resolve(model, site)  # ValueError naming the valid sites
        if head is not None and not (resolved.heads and head < resolved.heads):
            raise ValueError(f"site {name!r}: head {head} does not exist; the model has {resolved.heads or 0} heads")
    with torch.no_grad():
        acts = S.read_acts(model, ids_BT, sorted({s for s, _ in base.values()}))
    return {n: (acts[s][:, :, h] if h is not None else acts[s]).float() for n, (s, h) in base.items()}


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

    @classmethod
    def from_sae(cls, sae: torch.nn.Module, site: str, name: str | None = None) -> FeatureSite:
        """Any SAE with encode(x) -> [..., F] and W_dec [F, D] (TopK, ReLU, binary)."""
        return cls(name or f"{site}:sae", site, sae.encode, sae.W_dec.detach().float())

    @classmethod
    def from_codebook(cls, layer: torch.nn.Module, site: str, name: str | None = None) -> FeatureSite:
        """A single-group codebook reading `site`: latent i counts how often code i is chosen (k codes per token)."""
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
        lat_BTF = self.latents(acts_BTD)
        a_BT = lat_BTF.gather(-1, latent_B[:, None, None].expand(-1, lat_BTF.shape[1], 1))[..., 0]
        return a_BT[..., None] * self.W_dec_FD[latent_B][:, None, :]


def site_name(site: str | FeatureSite) -> str:
    return site if isinstance(site, str) else site.name


def site_acts(model: S.Model, ids_BT: Tensor, site: str | FeatureSite, latent_B: Tensor | None = None) -> Tensor:
    """Activations [B, T, D] at a site; at a feature site, restricted to each row's latent."""
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
        if site is not None and not 0 <= site < len(self.sites):
            raise ValueError(f"site index {site} is outside 0..{len(self.sites) - 1}")
        ids_BT = self.inputs(n, seed)
        gen = torch.Generator().manual_seed(seed)
        wanted = self.sites if site is None else [self.sites[site]]
        acts = read_sites(self.model, ids_BT, sorted({s if isinstance(s, str) else s.site for s in wanted}))
        mask_BT = self.query_mask(ids_BT) if self.query_mask else real_positions(ids_BT, self.eos_id)
        mask_BT = mask_BT.clone()
        mask_BT[:, 0] &= self.query_mask is not None  # BOS carries no information; only a custom mask may ask for it
        if not bool(mask_BT.any(1).all()):
            raise ValueError("query_mask leaves some inputs without a position to query")
        pos_B = torch.multinomial(mask_BT.float(), 1, generator=gen)[:, 0]
        if site is not None:
            site_B = torch.full((n,), site, dtype=torch.long)
        elif site_weights is not None:
            w = torch.as_tensor(site_weights, dtype=torch.float)
            if w.shape != (len(self.sites),) or not bool((w >= 0).all()) or not w.sum() > 0:
                raise ValueError(f"site_weights must be {len(self.sites)} non-negative numbers, not all zero; got {w.tolist()}")
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
    if eos_id is None:
        return torch.ones_like(ids_BT, dtype=torch.bool)
    is_eos = ids_BT == eos_id
    is_eos[:, 0] = False
    return is_eos.long().cumsum(1) == 0
