"""Which features fire on each token of a prompt: the data behind a prompt view (as in sae_vis and Neuronpedia).

    x_TD = activations at `site` for the prompt          a_TF = encode(x_TD)      (latents, bits or codes)
    token t's features: the f with a_tf "on", ranked by a_tf (strongest first), the best k kept

What "on" and the value mean depends on the dictionary:
    latents   an SAE (TopK, ReLU, SAELens, sparsify, ...): on where a_tf != 0; the value is the latent
    bits      a binary autoencoder: on where the bit is 1, ranked by the pre-activation's margin; with `usual`
              (each bit's mean over a data set) on where the bit leaves its usual state, valued |h - usual|
    codes     a codebook: on where the code is chosen; the value is its cosine similarity. A grouped
              (per-head) codebook numbers code c of group g as g * n_codes + c

Dimension key: T positions, D width at the site, F features, K kept per token, M features kept over the prompt,
G groups (heads), E width per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import sites
from ._checks import check_int
from .codebook.layer import CodebookLayer
from .codebook.model import CodebookModel
from .edits import as_dictionary
from .sae.binary import BinaryAE, deviation_acts


@dataclass(frozen=True)
class PromptFeatures:
    """One prompt's features per token (what PromptView draws)."""

    tokens: list[str]  # [T] the prompt as the model tokenised it, one string per token
    ids: np.ndarray  # [T, K] int: each token's features, strongest first; -1 where fewer than K are on
    values: np.ndarray  # [T, K] float: their values (0 in the padding)
    features: np.ndarray  # [M] int: every feature in some token's top K, strongest over the prompt first
    acts: np.ndarray  # [T, M] float: those features' values on every token (0 where off)
    site: str
    kind: str  # "latents", "codes" or "bits"

    def __len__(self) -> int:
        return len(self.tokens)


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (the text to read features on), got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty: type some text to see which features fire on it")
    return prompt


def _d_in(dictionary: Any) -> int | None:
    """The input width a dictionary expects (ours, SAELens, sparsify: cfg.d_in or d_in), None if it does not say."""
    for obj in (dictionary, getattr(dictionary, "foreign", None)):
        for holder in (obj, getattr(obj, "cfg", None)):
            d = getattr(holder, "d_in", None) if holder is not None else None
            if isinstance(d, int) and not isinstance(d, bool) and d > 0:
                return d
    return None


def _fit_width(site: str, x: Tensor, dictionary: Any) -> Tensor:
    """x [T, ...] as the dictionary takes it: [T, D] as read, or per-head [T, H, E] flattened to [T, H * E]."""
    d = _d_in(dictionary)
    if d is None or x.shape[-1] == d:
        return x
    if math.prod(x.shape[1:]) == d:
        return x.reshape(len(x), d)
    raise ValueError(f"the dictionary expects inputs of width d_in={d}, but site {site!r} has width {x.shape[-1]} "
                     f"(activations {list(x.shape[1:])} per token): use a dictionary trained at this site, or its site")


def _on_device(x: Tensor, module: Any) -> Tensor:
    p = next(module.parameters(), None) if isinstance(module, nn.Module) else None
    return x.to(p.device) if p is not None else x


def _codes_dense(codes_TGK: Tensor, sims_TGK: Tensor, n_codes: int) -> tuple[Tensor, Tensor]:
    """Chosen codes -> (values [T, G*C]: cosine where chosen, on [T, G*C]: chosen), in the g * n_codes + c numbering."""
    T, G, _ = codes_TGK.shape
    flat = (codes_TGK + torch.arange(G, device=codes_TGK.device)[None, :, None] * n_codes).reshape(T, -1)
    values = torch.zeros(T, G * n_codes, device=flat.device).scatter_(1, flat, sims_TGK.reshape(T, -1).float())
    on = torch.zeros(T, G * n_codes, dtype=torch.bool, device=flat.device).scatter_(1, flat, True)
    return values, on


def _codebook_output(out: Any, layer: CodebookLayer) -> tuple[Tensor, Tensor, Tensor]:
    codes, sims = out.codes.reshape(-1, layer.cfg.n_groups, layer.cfg.k), out.sims.reshape(-1, layer.cfg.n_groups, layer.cfg.k)
    values, on = _codes_dense(codes, sims, layer.cfg.n_codes)
    return values, on, values


def _encode(site: str, x: Tensor, dictionary: Any, usual: Tensor | None) -> tuple[str, Tensor, Tensor, Tensor]:
    """(kind, values [T, F], on [T, F], score [T, F]) for activations x [T, ...] read at the site."""
    with torch.no_grad():
        if isinstance(dictionary, CodebookLayer):
            return ("codes", *_codebook_output(dictionary(_on_device(x, dictionary)), dictionary))
        x = _on_device(_fit_width(site, x, dictionary), dictionary)
        if isinstance(dictionary, BinaryAE):
            out = dictionary(x)
            bits = out.latents.reshape(len(x), -1)
            if usual is not None:
                dev = deviation_acts(bits, usual.to(bits.device).float())
                return "bits", dev, dev > 0, dev
            return "bits", bits, bits > 0, out.pre_acts.reshape(len(x), -1)
        out = as_dictionary(dictionary)(x)
        if not isinstance(getattr(out, "latents", None), Tensor):
            raise ValueError(f"{type(dictionary).__name__}(x) returned {type(out).__name__} without .latents; a dictionary "
                             "must return its latents (ours, SAELens, sparsify do) or be a BinaryAE or CodebookLayer")
        latents = out.latents.reshape(len(x), -1).float()
        return "latents", latents, latents != 0, latents


def _rank(values_TF: Tensor, on_TF: Tensor, score_TF: Tensor, k: int) -> tuple[np.ndarray, ...]:
    """Each token's best k features that are on, and every kept feature's values over the prompt."""
    score = torch.where(on_TF, score_TF.float(), torch.tensor(-math.inf, device=score_TF.device))
    top, idx = score.sort(dim=1, descending=True, stable=True)  # strongest first; ties: the lower id first
    top, idx = top[:, :k], idx[:, :k]
    kept = top > -math.inf
    ids = torch.where(kept, idx, -1)
    values = torch.where(kept, values_TF.gather(1, idx).float(), 0.0)
    chosen = ids[kept].unique()
    best = score[:, chosen].max(0).values  # a feature's strength over the prompt: its best token
    features = chosen[best.argsort(descending=True, stable=True)]
    acts = torch.where(on_TF[:, features], values_TF[:, features].float(), 0.0)
    return ids.cpu().numpy(), values.cpu().numpy(), features.cpu().numpy(), acts.cpu().numpy()


def _codebook_of(model: Any, site: str, dictionary: Any) -> CodebookModel | None:
    """The CodebookModel whose own codebook at `site` is asked for, if that is what (model, dictionary) say."""
    cb = model if isinstance(model, CodebookModel) else dictionary if isinstance(dictionary, CodebookModel) else None
    if cb is None:
        return None
    if isinstance(dictionary, CodebookModel) and model is not cb and model is not cb.model:
        raise ValueError("dictionary is a CodebookModel: pass it (or its .model) as model too, so the codes are read "
                         "with every codebook in place")
    if dictionary is None or dictionary is cb or dictionary is cb.layer(site):
        cb.layer(site)  # names the sites it has when this one has no codebook
        return cb
    return None


def _check_usual(usual: Any, dictionary: Any) -> Tensor | None:
    if usual is None:
        return None
    if not isinstance(dictionary, BinaryAE):
        raise ValueError(f"usual (each bit's mean) is for a BinaryAE's bits; the dictionary is a {type(dictionary).__name__}")
    F = dictionary.cfg.d_sae
    if not isinstance(usual, Tensor) or tuple(usual.shape) != (F,):
        raise ValueError(f"usual must be a tensor [{F}] holding each bit's mean over a data set; "
                         f"got {type(usual).__name__} {list(getattr(usual, 'shape', []))}")
    return usual


def _features(model: Any, site: str, dictionary: Any, ids: Tensor, k: int, usual: Tensor | None) -> tuple[str, ...]:
    """(kind, ids, values, features, acts) for token ids [1, T]."""
    cb = _codebook_of(model, site, dictionary)
    if cb is not None:
        layer = cb.layer(site)
        kind, values, on, score = ("codes", *_codebook_output(cb.run(ids).outputs[site], layer))
    else:
        if dictionary is None:
            raise ValueError("dictionary is None: pass an SAE, a BinaryAE or a CodebookLayer (None only with a CodebookModel)")
        if isinstance(model, CodebookModel):  # another dictionary on the codebook model's activations
            x = model.run(ids, read=[site]).acts[site]
        else:
            x = sites.read_acts(model, ids, site)[site]
        kind, values, on, score = _encode(site, x[0], dictionary, usual)
    return (kind, *_rank(values, on, score, k))


def _tokenizer(model: Any) -> Any:
    tok = sites.tokenizer_of(model.model if isinstance(model, CodebookModel) else model)
    if tok is None:
        raise ValueError("a prompt needs the model's tokenizer: wrap(model, tokenizer=...)")
    return tok


def _check_args(site: Any, k: Any) -> int:
    if not isinstance(site, str):
        raise TypeError(f"site must be a site name (str), e.g. 'blocks.1.hook_resid_pre'; got {type(site).__name__}")
    return check_int("k (features kept per token)", k, 1)


def prompt_features(model: Any, site: str, dictionary: Any, prompt: str, k: int = 8, *,
                    usual: Tensor | None = None) -> PromptFeatures:
    """Which features of `dictionary` fire on each token of `prompt` at `site`, the best k per token.

    model: a wrapped model (`nbf.load_model`, `nbf.wrap`), or a CodebookModel: then `dictionary` may be None (its
        codebook at `site`, read with every codebook in place, as the codebook model runs).
    dictionary: an SAE (TopK, ReLU, SAELens, sparsify, anything with encode / decode), a BinaryAE, a CodebookLayer.
    usual: for a BinaryAE, each bit's mean [F] over a data set: a bit is then on where it leaves its usual state.
    """
    prompt, k = _check_prompt(prompt), _check_args(site, k)
    usual = _check_usual(usual, dictionary)
    tok = _tokenizer(model)
    ids = tok([prompt], return_tensors="pt")["input_ids"]
    kind, top_ids, top_values, features, acts = _features(model, site, dictionary, ids, k, usual)
    return PromptFeatures(sites.decode_each(tok, ids[0].tolist()), top_ids, top_values, features, acts, site, kind)


def prompt_features_fn(model: Any, site: str, dictionary: Any, k: int = 8, *,
                       usual: Tensor | None = None) -> Callable[[str], PromptFeatures]:
    """fn(prompt) -> PromptFeatures: what PromptView calls (the panel never sees the model).

    Checked now on a one-token probe, so a wrong site or a dictionary of the wrong width fails here, not in the panel.
    """
    k = _check_args(site, k)
    usual = _check_usual(usual, dictionary)
    _tokenizer(model)
    _features(model, site, dictionary, torch.zeros(1, 1, dtype=torch.long), k, usual)  # raises on a bad site or width

    def fn(prompt: str) -> PromptFeatures:
        return prompt_features(model, site, dictionary, prompt, k, usual=usual)

    return fn
