"""Steering callables for SteeringPanel, built from a model with the site layer.

    steer = steering_fn(model, "blocks.1.hook_resid_post", sae.W_dec)    # row f of W_dec is feature f's direction
    SteeringPanel(steer, token_strings(model), names)

    steered activation at positions p:   act[:, p] + strength * directions[f]

`positions` follows nbfeatures.edits: the default `slice(-1, None)` steers the last prompt token
and every generated token; None steers every position. `edits_fn` takes any edits
(a codebook's forced code, an ablation), built per (feature, strength).

The callable `steering_fn` returns also tells a panel what it needs to know about the directions, without a
model: `fn.act_norm`, the site's typical activation norm (the median over a short sample), which sets the
strength slider's range, and `fn.promoted(f)`, the tokens direction f promotes through the unembedding,
which names a feature that has no name.

Dimension key: F features, D width at the site, V vocab.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import sites
from ._checks import as_int
from .edits import Edit, Positions, Steer, decoder_rows, position_mask


class SteeringOutput(NamedTuple):
    """What SteeringPanel needs from one generation."""

    prompt_tokens: list[str]
    tokens: list[str]  # generated
    steered: list[bool]  # per position of prompt + generation: the edit applies there
    probs: Tensor  # [V] next-token probabilities at the last prompt position, with the edit


def token_strings(model: sites.Model) -> list[str]:
    """Every token id decoded alone: the `vocab` a SteeringPanel labels its bars with."""
    tok = sites.tokenizer_of(model)
    if tok is None:
        raise ValueError("token_strings needs a model wrapped with its tokenizer: wrap(model, tokenizer=...)")
    head = sites.unwrap(model).get_output_embeddings() if hasattr(sites.unwrap(model), "get_output_embeddings") else None
    V = head.weight.shape[0] if head is not None else len(tok)
    return sites.decode_each(tok, range(V))


def promoted_tokens(model: sites.Model, directions: Tensor, k: int = 5) -> Callable[[int], list[str]] | None:
    """promoted(f): the k tokens whose logits `directions[f] @ W_U` raises most, decoded; computed per feature when asked.

    directions: [F, D] rows at a site of the residual stream's width D (W_U is [D, V], the model's output embedding).
    None when the model has no output embedding of width D (e.g. an MLP site of another width): nothing to project on.
    """
    k = as_int("k", k, 1)
    if not isinstance(directions, Tensor) or directions.dim() != 2:
        raise ValueError(f"directions must be a tensor [F, D]; got {type(directions).__name__} "
                         f"{list(directions.shape) if isinstance(directions, Tensor) else ''}")
    tok, module = sites.tokenizer_of(model), sites.unwrap(model)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    W_U_VD = getattr(head, "weight", None)
    if tok is None or W_U_VD is None or W_U_VD.dim() != 2 or W_U_VD.shape[1] != directions.shape[1]:
        return None
    cache: dict[int, list[str]] = {}

    def promoted(feature: int) -> list[str]:
        f = int(feature)
        if not 0 <= f < len(directions):
            raise ValueError(f"feature {f} is out of range: directions has {len(directions)} rows (0..{len(directions) - 1})")
        if f not in cache:
            with torch.no_grad():
                logits_V = W_U_VD.detach() @ directions[f].to(W_U_VD.device, W_U_VD.dtype)
                ids = logits_V.float().topk(min(k, len(logits_V))).indices.tolist()
            cache[f] = sites.decode_each(tok, ids)
        return cache[f]

    return promoted


def act_norm(model: sites.Model, site: str, sample: str | Tensor | None = None) -> float:
    """The median L2 norm of the activation at `site` over the positions of `sample` (the first left out: BOS
    positions are outliers); sample: text or token ids, default 32 pseudo-random tokens (seed 0)."""
    if sample is None:
        vocab, context = sites.limits(model)
        vocab = vocab or len(sites.tokenizer_of(model) or ())
        if not vocab:
            raise ValueError("act_norm needs a sample (text or token ids): the model states no vocabulary size")
        n = min(33, context or 33)
        sample = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    acts = sites.read_acts(model, sample, site)[site].detach().float()  # [B, T, D] or [B, T, H, E]
    if acts.dim() >= 3 and acts.shape[1] > 1:
        acts = acts[:, 1:]
    return float(acts.flatten(2).norm(dim=-1).median() if acts.dim() >= 3 else acts.norm(dim=-1).median())


def edits_fn(model: sites.Model, make_edits: Callable[[int, float], Sequence[Edit]], *,
             positions: Positions = slice(-1, None), max_new_tokens: int = 20,
             **generate_kwargs) -> Callable[[str, int | None, float], SteeringOutput]:
    """fn(prompt, feature, strength) generating with `make_edits(feature, strength)` applied; feature None: no edits.

    `positions` must be the positions the edits use: it is what the panel marks as steered. A
    codebook's forced code, for instance (the strength unused):

        force = lambda c, s: [Splice(site, lambda a: layer(a, ids=torch.full((*a.shape[:-1], 1), c)), positions=slice(-1, None))]
        fn = edits_fn(model, force)
    """
    if not callable(make_edits):
        raise TypeError(f"make_edits must be a callable (feature, strength) -> list of edits, got {type(make_edits).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    tok = sites.tokenizer_of(model)
    if tok is None:
        raise ValueError("steering needs a model wrapped with its tokenizer: wrap(model, tokenizer=...)")

    def fn(prompt: str, feature: int | None, strength: float) -> SteeringOutput:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if feature is not None and (isinstance(feature, bool) or not isinstance(feature, int) and not hasattr(feature, "__index__")):
            raise TypeError(f"feature must be an int id (or None for no edit), got {type(feature).__name__} {feature!r}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength != strength or abs(strength) == float("inf"):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        edits = [] if feature is None else list(make_edits(int(feature), float(strength)))
        with torch.no_grad():
            out = sites.generate(model, prompt, edits, max_new_tokens=max_new_tokens, **generate_kwargs)
            logits = sites.run(model, prompt, edits).logits[0, -1]
        ids, T = out.tokens[0].tolist(), out.prompt_len
        mask = position_mask(positions, 0, len(ids), T) if edits else torch.zeros(len(ids), dtype=torch.bool)
        return SteeringOutput(sites.decode_each(tok, ids[:T]), sites.decode_each(tok, ids[T:]), mask.tolist(),
                              logits.float().softmax(-1).cpu())

    return fn


def steering_fn(model: sites.Model, site: str, directions: Tensor | Any, *, positions: Positions = slice(-1, None),
                max_new_tokens: int = 20, k_promoted: int = 5, sample: str | Tensor | None = None,
                **generate_kwargs) -> Callable[[str, int | None, float], SteeringOutput]:
    """fn(prompt, feature, strength): generate with `strength * directions[feature]` added at `site`.

    directions: [F, D], e.g. an SAE's W_dec (rows are feature directions), or [D] for one vector (feature 0); a
    [D, F] matrix or a dictionary with `.W_dec` (ours, SAELens, sparsify) is turned into rows by matching the site's D.
    The callable carries `fn.act_norm` (`act_norm(model, site, sample)`, measured now) and `fn.promoted`
    (`promoted_tokens(model, directions, k_promoted)`: feature -> its top promoted tokens, or None), which
    SteeringPanel reads for its strength range and its feature labels.
    """
    if not isinstance(site, str):
        raise TypeError(f"site must be a site name (str), e.g. 'blocks.1.hook_resid_post'; got {type(site).__name__}")
    param = next(sites.unwrap(model).parameters(), None)
    if not isinstance(directions, Tensor) or directions.dim() == 2:
        probe = torch.zeros(1, 1, dtype=torch.long)  # one token tells the site's width D
        directions = decoder_rows(directions, d=sites.read_acts(model, probe, site)[site].shape[-1])
    directions = directions.detach().to(param.device if param is not None else "cpu")
    if directions.dim() == 1:
        directions = directions[None]
    if directions.dim() != 2:
        raise ValueError(f"directions must be [F, D] (or one vector [D]); got shape {list(directions.shape)}")
    if directions.is_floating_point() and not bool(torch.isfinite(directions).all()):
        raise ValueError("directions hold NaN or inf; steering directions must be finite")

    def make(feature: int, strength: float) -> list[Edit]:
        if not 0 <= feature < len(directions):
            raise ValueError(f"feature {feature} is out of range: directions has {len(directions)} rows (0..{len(directions) - 1})")
        return [Steer(site, directions[feature], coef=strength, positions=positions)]

    fn = edits_fn(model, make, positions=positions, max_new_tokens=max_new_tokens, **generate_kwargs)
    fn.act_norm = act_norm(model, site, sample)
    fn.promoted = promoted_tokens(model, directions, k_promoted)
    return fn
