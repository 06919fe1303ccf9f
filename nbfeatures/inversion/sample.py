"""Sampling the epsilon-preimage: draw candidates, re-run them through the probed model, measure, colour.

Candidates are drawn at several temperatures (optionally with noise on z, the reference's eta), sorted by their
true distance and split at epsilon; each token is coloured by log p(token | z) - log p(token | z_BOS).

Dimension key: B batch, T position, D activation width.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import sites as S
from .decoder import InversionDecoder
from .probe import FeatureSite, distance, real_positions, site_acts, site_name


class InversionSamples(NamedTuple):
    """Candidates for one query, sorted by true distance."""

    tokens: list[list[int]]  # each candidate, BOS first, EOS and padding dropped
    distance: Tensor  # [N] min over positions of D(f(x), z)
    position: Tensor  # [N] the position where that minimum is
    inside: Tensor  # [N] bool: distance <= epsilon
    temperature: Tensor  # [N] the temperature it was drawn at
    colour: list[Tensor]  # per candidate [len]: log p(token | z) - log p(token | z_BOS) (0 at BOS)
    site: str
    epsilon: float

    @property
    def inside_fraction(self) -> float:
        return float(self.inside.float().mean()) if len(self.inside) else 0.0


def query_activation(model: S.Model, ids_T: Tensor, site: str | FeatureSite, position: int, latent: int | None = None) -> Tensor:
    """The activation z [D] of a query input at a site and position (at a feature site: restricted to `latent`)."""
    ids_T = torch.as_tensor(ids_T).reshape(-1)
    if not -len(ids_T) <= position < len(ids_T):
        raise ValueError(f"position {position} is outside the query input of {len(ids_T)} tokens; allowed 0..{len(ids_T) - 1}")
    return site_acts(model, ids_T[None], site, None if latent is None else torch.tensor([latent]))[0, position]


def strongest_latent(model: S.Model, ids_T: Tensor, site: FeatureSite, position: int) -> int:
    """The latent of a feature site that fires most at (query, position)."""
    a_D = query_activation(model, ids_T, site.site, position)
    return int(site.latents(a_D[None, None])[0, 0].argmax())


@torch.no_grad()
def generate(decoder: InversionDecoder, z_D: Tensor, site: str, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """n inputs [n, n_ctx] drawn from p(x | z, site), BOS first, padded with EOS (or BOS) after the end."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z_BD = decoder.pad(z_D.reshape(1, -1)).expand(n, -1)
    return _generate(decoder, z_BD, torch.full((n,), decoder.site_index(site), dtype=torch.long), temperature, generator)


def _generate(decoder: InversionDecoder, z_BD: Tensor, site_B: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One input per row of z_BD (any width up to d_act), each conditioned on its own (z, site)."""
    cfg, n = decoder.cfg, len(z_BD)
    z_BD = decoder.pad(z_BD)
    pad = cfg.eos_id if cfg.eos_id is not None else cfg.bos_id
    ids = torch.full((n, 1), cfg.bos_id, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(cfg.n_ctx - 1):
        probs = (decoder(ids, z_BD, site_B)[:, -1] / temperature).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].masked_fill(done, pad)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if cfg.eos_id is not None:
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
    return ids


@torch.no_grad()
def token_logprobs(decoder: InversionDecoder, ids_BT: Tensor, z_D: Tensor, site: str) -> Tensor:
    """log p(token_t | tokens_<t, z) [B, T] (0 at BOS)."""
    site_B = torch.full((len(ids_BT),), decoder.site_index(site), dtype=torch.long)
    logp = decoder(ids_BT, decoder.pad(z_D.reshape(1, -1)).expand(len(ids_BT), -1), site_B).log_softmax(-1)
    return F.pad(logp[:, :-1].gather(-1, ids_BT[:, 1:, None])[..., 0], (1, 0))


def sample(decoder: InversionDecoder, model: S.Model, site: str | FeatureSite, *, query: Tensor | None = None,
           position: int | None = None, z: Tensor | None = None, latent: int | None = None,
           temperatures: Sequence[float] = (0.5, 1.0, 2.0), n_per_temperature: int = 32, noise: float = 0.0,
           epsilon: float = 0.1, metric: str = "euclidean", seed: int = 0) -> InversionSamples:  # fmt: skip
    """Draw candidates for the activation at (query, site, position), or for a given z, and measure them.

    At a `FeatureSite`, z is the activation restricted to `latent` (default: the query's strongest latent at
    `position`; with z given, say which latent it is) and candidates are measured on that latent.
    noise > 0 adds Gaussian noise of std noise * std(z) to z for each temperature's draw (the reference's eta).
    """
    name = site_name(site)
    decoder.site_index(name)
    if (z is None) == (query is None):
        raise ValueError("pass either query (token ids) with position, or z (an activation)")
    if query is not None and position is None:
        raise ValueError("a query needs a position")
    if isinstance(site, FeatureSite):
        if latent is None and z is not None:
            raise ValueError(f"feature site {name!r}: with z given, pass the latent it is restricted to")
        if latent is None:
            latent = strongest_latent(model, query, site, position)
        if not 0 <= latent < len(site.W_dec_FD):
            raise ValueError(f"latent {latent} is outside 0..{len(site.W_dec_FD) - 1} for feature site {name!r}")
    elif latent is not None:
        raise ValueError(f"latent is for feature sites; {name!r} is a plain site")
    one = None if latent is None else torch.tensor([latent])
    if z is None:
        z = query_activation(model, query, site, position, latent)
        if latent is not None and not z.norm() > 0:
            raise ValueError(f"latent {latent} does not fire at position {position} of the query; pick a position where it does")
    z = torch.as_tensor(z).float().reshape(-1)
    bos = torch.tensor([[decoder.cfg.bos_id]])
    z_bos = site_acts(model, bos, site, one)[0, 0]
    if z.shape[-1] != z_bos.shape[-1]:
        raise ValueError(f"z has width {z.shape[-1]} but site {name!r} has width {z_bos.shape[-1]}")
    gen = torch.Generator().manual_seed(seed)
    drawn, temps = [], []
    for t in temperatures:
        z_t = z + noise * z.std() * torch.randn(z.shape, generator=gen) if noise > 0 else z
        drawn.append(generate(decoder, z_t, name, n_per_temperature, t, gen))
        temps += [float(t)] * n_per_temperature
    width = max(d.shape[1] for d in drawn)
    pad = decoder.cfg.eos_id if decoder.cfg.eos_id is not None else decoder.cfg.bos_id
    ids_BT = torch.cat([F.pad(d, (0, width - d.shape[1]), value=pad) for d in drawn])
    mask_BT = real_positions(ids_BT, decoder.cfg.eos_id)
    acts = site_acts(model, ids_BT, site, None if one is None else one.expand(len(ids_BT)))
    dist_B, pos_B = distance(z, acts, mask_BT, metric)
    diff_BT = token_logprobs(decoder, ids_BT, z, name) - token_logprobs(decoder, ids_BT, z_bos, name)
    order = dist_B.argsort(stable=True)
    lengths = mask_BT.sum(1)
    if decoder.cfg.eos_id is not None:  # keep the EOS token in what is shown: it ends the input
        lengths = (lengths + 1).clamp(max=width)
    return InversionSamples(
        tokens=[ids_BT[i, : lengths[i]].tolist() for i in order.tolist()],
        distance=dist_B[order], position=pos_B[order], inside=dist_B[order] <= epsilon,
        temperature=torch.tensor(temps)[order], colour=[diff_BT[i, : lengths[i]] for i in order.tolist()],
        site=name, epsilon=epsilon,
    )  # fmt: skip


def feature_query(W_dec_FD: Tensor, index: int, scale: float, b_dec_D: Tensor | None = None) -> Tensor:
    """z for "inputs where this feature fires like this": scale * W_dec[index] (+ b_dec).

    With scale = a latent's activation on some input this is that input's activation restricted to the one
    latent: the z a decoder trained on a `FeatureSite` expects (no b_dec); with a codebook, pass the codebook
    [C, D] and the code (scale 1). A decoder trained only on plain sites has never seen such a z (measured on
    TokFSM: its samples fire the latent no more often than random walks), so train it with the feature site.
    """
    if not 0 <= index < W_dec_FD.shape[0]:
        raise ValueError(f"feature index {index} is outside 0..{W_dec_FD.shape[0] - 1}")
    z = scale * W_dec_FD[index].detach().float()
    return z + b_dec_D.detach().float() if b_dec_D is not None else z


def panel_callables(decoder: InversionDecoder, model: S.Model, vocab: Sequence[str], encode: Callable[[str], list[int]], *,
                    n_per_temperature: int = 32, noise: float = 0.0, metric: str = "euclidean", seed: int = 0):  # fmt: skip
    """(sample, tokenize) for `widgets.inversion.InversionPanel`: token strings in, token strings out.

    Each call draws fresh samples (call i uses seed + i), so pressing Sample again shows new ones; the sequence of
    draws is reproducible from `seed`.
    """
    calls = itertools.count()

    def tokenize(text: str) -> list[str]:
        return [vocab[t] for t in encode(text)]

    def sample_fn(text: str, site: str, position: int, temperature: float) -> InversionSamples:
        out = sample(decoder, model, site, query=torch.tensor(encode(text)), position=position, temperatures=(temperature,),
                     n_per_temperature=n_per_temperature, noise=noise, metric=metric, seed=seed + next(calls))  # fmt: skip
        return out._replace(tokens=[[vocab[t] for t in row] for row in out.tokens])

    return sample_fn, tokenize
