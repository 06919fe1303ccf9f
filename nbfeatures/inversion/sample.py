"""Sampling the epsilon-preimage: draw candidates, re-run them through the probed model, measure, colour.

Candidates are drawn at several temperatures (optionally with noise on z, the reference's eta), sorted by their
true distance and split at epsilon; each token is coloured by log p(token | z) - log p(token | z_BOS).

Dimension key: B batch, T position, D activation width.
"""

from __future__ import annotations

import itertools
import numbers
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import sites as S
from .decoder import InversionDecoder
from .._checks import check_int, check_number
from .probe import METRICS, FeatureSite, _shape, distance, real_positions, site_acts, site_name


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


def _query_ids(model: S.Model, query: Tensor, decoder: InversionDecoder | None = None) -> Tensor:
    """One query's token ids [T]: integers in the vocabulary, not empty, not batched, within the decoder's context."""
    if isinstance(query, str):
        raise TypeError(f"query must be token ids [T] (an integer tensor or list of ints), not a string; encode it first: {query!r}")
    try:
        ids = torch.as_tensor(query)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"query must be token ids [T] (an integer tensor or list of ints), got {type(query).__name__}") from err
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"query must be integer token ids [T], got dtype {ids.dtype}")
    if ids.dim() > 1 and (ids.dim() > 2 or len(ids) != 1):
        raise ValueError(f"query must be one input [T] (or [1, T]), got shape {list(ids.shape)}; sample one query at a time")
    ids = ids.reshape(-1)
    if not len(ids):
        raise ValueError("query is empty; give at least one token (BOS first)")
    vocab = S.limits(model)[0] if decoder is None else min(S.limits(model)[0] or decoder.cfg.vocab_size, decoder.cfg.vocab_size)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"query token id {bad} is outside the vocabulary: allowed are 0..{vocab - 1}")
    if decoder is not None and len(ids) > decoder.cfg.n_ctx:
        raise ValueError(f"query has {len(ids)} tokens, longer than the decoder's context n_ctx={decoder.cfg.n_ctx}; "
                         f"the decoder writes inputs of at most that length")  # fmt: skip
    return ids


def _check_decoder(decoder: InversionDecoder) -> None:
    if not isinstance(decoder, InversionDecoder):
        raise TypeError(f"decoder must be an InversionDecoder, got {type(decoder).__name__}")


def query_activation(model: S.Model, ids_T: Tensor, site: str | FeatureSite, position: int, latent: int | None = None) -> Tensor:
    """The activation z [D] of a query input at a site and position (at a feature site: restricted to `latent`)."""
    site_name(site)
    ids_T = _query_ids(model, ids_T)
    check_int("position", position)
    if latent is not None:
        if not isinstance(site, FeatureSite):
            raise ValueError(f"latent is for feature sites; {site!r} is a plain site")
        check_int("latent", latent, 0, len(site.W_dec_FD) - 1)
    if not -len(ids_T) <= position < len(ids_T):
        raise ValueError(f"position {position} is outside the query input of {len(ids_T)} tokens; allowed 0..{len(ids_T) - 1}")
    return site_acts(model, ids_T[None], site, None if latent is None else torch.tensor([latent]))[0, position]


def strongest_latent(model: S.Model, ids_T: Tensor, site: FeatureSite, position: int) -> int:
    """The latent of a feature site that fires most at (query, position)."""
    if not isinstance(site, FeatureSite):
        raise TypeError(f"strongest_latent needs a FeatureSite (FeatureSite.from_sae / from_codebook), got {type(site).__name__} {site!r}")
    a_D = query_activation(model, ids_T, site.site, position)
    return int(site.latents(a_D[None, None])[0, 0].argmax())


@torch.no_grad()
def generate(decoder: InversionDecoder, z_D: Tensor, site: str, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """n inputs [n, n_ctx] drawn from p(x | z, site), BOS first, padded with EOS (or BOS) after the end."""
    _check_decoder(decoder)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be > 0 (and finite), got {temperature!r}")
    check_int("n", n, 1)
    _check_z(z_D)
    z_BD = decoder.pad(z_D.reshape(1, -1)).expand(n, -1)
    return _generate(decoder, z_BD, torch.full((n,), decoder.site_index(site), dtype=torch.long), temperature, generator)


def _generate(decoder: InversionDecoder, z_BD: Tensor, site_B: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One input per row of z_BD (any width up to d_act), each conditioned on its own (z, site).

    Tokens are drawn on the CPU with `generator` wherever the decoder runs, so a seed gives the same draws on any
    device (up to the logits' rounding); the ids come back on z's device."""
    cfg, n, device = decoder.cfg, len(z_BD), decoder.act_scale_S.device
    home, z_BD, site_B = z_BD.device, decoder.pad(z_BD).to(device), site_B.to(device)
    pad = cfg.eos_id if cfg.eos_id is not None else cfg.bos_id
    ids = torch.full((n, 1), cfg.bos_id, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(cfg.n_ctx - 1):
        probs = (decoder(ids.to(device), z_BD, site_B)[:, -1].float().cpu() / temperature).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].masked_fill(done, pad)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if cfg.eos_id is not None:
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
    return ids.to(home)


def _check_z(z: Tensor) -> Tensor:
    """z: one finite float activation [D] (or [1, D])."""
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise ValueError(f"z must be a float tensor [D] (one activation), got {_shape(z)}")
    if z.dim() > 1 and (z.dim() > 2 or len(z) != 1):
        raise ValueError(f"z must be one activation [D] (or [1, D]), got shape {list(z.shape)}; sample one z at a time")
    if not z.numel() or not bool(torch.isfinite(z).all()):
        raise ValueError(f"z must be a non-empty finite activation; it holds {int((~torch.isfinite(z)).sum())} NaN/inf of {z.numel()}")
    return z.reshape(-1)


@torch.no_grad()
def token_logprobs(decoder: InversionDecoder, ids_BT: Tensor, z_D: Tensor, site: str) -> Tensor:
    """log p(token_t | tokens_<t, z) [B, T] (0 at BOS)."""
    _check_decoder(decoder)
    cfg = decoder.cfg
    if not isinstance(ids_BT, Tensor) or ids_BT.is_floating_point() or ids_BT.dtype == torch.bool or ids_BT.dim() != 2 or not ids_BT.numel():
        raise ValueError(f"ids must be non-empty integer token ids [B, T], got {_shape(ids_BT)}")
    if int(ids_BT.min()) < 0 or int(ids_BT.max()) >= cfg.vocab_size or ids_BT.shape[1] > cfg.n_ctx:
        raise ValueError(f"ids must lie in 0..{cfg.vocab_size - 1} with at most n_ctx={cfg.n_ctx} positions; got "
                         f"{int(ids_BT.min())}..{int(ids_BT.max())} over {ids_BT.shape[1]} positions")  # fmt: skip
    _check_z(z_D)
    device = decoder.act_scale_S.device  # computed where the decoder is, returned where the ids are
    site_B = torch.full((len(ids_BT),), decoder.site_index(site), dtype=torch.long, device=device)
    ids = ids_BT.to(device)
    logp = decoder(ids, decoder.pad(z_D.reshape(1, -1).to(device)).expand(len(ids), -1), site_B).log_softmax(-1)
    return F.pad(logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0], (1, 0)).to(ids_BT.device)


def sample(decoder: InversionDecoder, model: S.Model, site: str | FeatureSite, *, query: Tensor | None = None,
           position: int | None = None, z: Tensor | None = None, latent: int | None = None,
           temperatures: Sequence[float] = (0.5, 1.0, 2.0), n_per_temperature: int = 32, noise: float = 0.0,
           epsilon: float = 0.1, metric: str = "euclidean", seed: int = 0) -> InversionSamples:  # fmt: skip
    """Draw candidates for the activation at (query, site, position), or for a given z, and measure them.

    At a `FeatureSite`, z is the activation restricted to `latent` (default: the query's strongest latent at
    `position`; with z given, say which latent it is) and candidates are measured on that latent.
    noise > 0 adds Gaussian noise of std noise * std(z) to z for each temperature's draw (the reference's eta).
    """
    _check_decoder(decoder)
    name = site_name(site)
    decoder.site_index(name)
    if (z is None) == (query is None):
        raise ValueError("pass either query (token ids) with position, or z (an activation)")
    if query is not None and position is None:
        raise ValueError("a query needs a position")
    temperatures = _check_sampling(temperatures, n_per_temperature, noise, metric, seed)
    check_number("epsilon", epsilon, 0, strict=True)
    if query is not None:
        query = _query_ids(model, query, decoder)
        check_int("position", position)
    if latent is not None:
        check_int("latent", latent)
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
    z = _check_z(z).float()
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


def _check_sampling(temperatures: Sequence[float], n_per_temperature: int, noise: float, metric: str, seed: int) -> list[float]:
    """The sampling arguments shared by `sample` and `panel_callables`; returns the temperatures as a list."""
    temps = temperatures.tolist() if hasattr(temperatures, "tolist") else temperatures  # numpy / torch arrays too
    if isinstance(temps, (str, bytes)) or not isinstance(temps, Sequence) or not len(temps):
        raise ValueError(f"temperatures must be a non-empty sequence of numbers > 0, e.g. (0.5, 1.0, 2.0); got {temperatures!r}")
    for t in temps:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t < float("inf"):
            raise ValueError(f"temperatures must all be finite numbers > 0, got {list(temps)}")
    check_int("n_per_temperature", n_per_temperature, 1)
    check_number("noise", noise, 0)
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_int("seed", seed)
    return [float(t) for t in temps]


def feature_query(W_dec_FD: Tensor, index: int, scale: float, b_dec_D: Tensor | None = None) -> Tensor:
    """z for "inputs where this feature fires like this": scale * W_dec[index] (+ b_dec).

    With scale = a latent's activation on some input this is that input's activation restricted to the one
    latent: the z a decoder trained on a `FeatureSite` expects (no b_dec); with a codebook, pass the codebook
    [C, D] and the code (scale 1). A decoder trained only on plain sites has never seen such a z (measured on
    TokFSM: its samples fire the latent no more often than random walks), so train it with the feature site.
    """
    if not isinstance(W_dec_FD, Tensor) or not W_dec_FD.is_floating_point() or W_dec_FD.dim() != 2:
        raise ValueError(f"W_dec must be a float tensor [F, D] (one row per feature), got {_shape(W_dec_FD)}")
    check_int("index", index)
    if not 0 <= index < W_dec_FD.shape[0]:
        raise ValueError(f"feature index {index} is outside 0..{W_dec_FD.shape[0] - 1}")
    check_number("scale", scale)
    if b_dec_D is not None and (not isinstance(b_dec_D, Tensor) or tuple(b_dec_D.shape) != (W_dec_FD.shape[1],)):
        raise ValueError(f"b_dec must be None or a tensor [D] = [{W_dec_FD.shape[1]}], got {_shape(b_dec_D)}")
    z = scale * W_dec_FD[index].detach().float()
    return z + b_dec_D.detach().float() if b_dec_D is not None else z


def panel_callables(decoder: InversionDecoder, model: S.Model, vocab: Sequence[str], encode: Callable[[str], list[int]], *,
                    n_per_temperature: int = 32, noise: float = 0.0, metric: str = "euclidean", seed: int = 0):  # fmt: skip
    """(sample, tokenize) for `widgets.inversion.InversionPanel`: token strings in, token strings out.

    Each call draws fresh samples (call i uses seed + i), so pressing Sample again shows new ones; the sequence of
    draws is reproducible from `seed`.
    """
    _check_decoder(decoder)
    _check_sampling((1.0,), n_per_temperature, noise, metric, seed)
    if isinstance(vocab, str) or not isinstance(vocab, Sequence) or not len(vocab):
        raise TypeError(f"vocab must be a non-empty list of token strings (id -> string), got {type(vocab).__name__}")
    if not callable(encode):
        raise TypeError(f"encode must be a callable text -> token ids, got {type(encode).__name__}")
    calls = itertools.count()

    def tokenize(text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        ids = list(encode(text))
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < len(vocab))]
        if bad:
            raise ValueError(f"encode({text!r}) gave ids {bad[:5]} outside the vocab list (allowed 0..{len(vocab) - 1})")
        return [vocab[t] for t in ids]

    def sample_fn(text: str, site: str, position: int, temperature: float) -> InversionSamples:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        out = sample(decoder, model, site, query=torch.tensor(encode(text)), position=position, temperatures=(temperature,),
                     n_per_temperature=n_per_temperature, noise=noise, metric=metric, seed=seed + next(calls))  # fmt: skip
        return out._replace(tokens=[[vocab[t] for t in row] for row in out.tokens])

    return sample_fn, tokenize
