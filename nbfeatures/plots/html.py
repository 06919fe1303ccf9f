"""HTML for token sequences: contexts shaded by a feature's activation, generations with steered tokens marked.

Pure functions returning strings (shown in an ipywidgets.HTML); every token goes through `tokens.tokens_html`,
so it reads as text, wraps in its column and is escaped.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np

from ._checks import as_int
from .tokens import STEERED_STYLE, looks_word_level, tokens_html

_LABEL = "color:#888; flex:none; width:13em; white-space:nowrap; font-family: ui-monospace, monospace; font-size: 12px; line-height: 1.9"


def shaded_tokens(tokens: Sequence[str], acts: Sequence[float], max_act: float, center: int | None = None,
                  word_level: bool | None = None) -> str:
    """Tokens shaded by activation / max_act (orange); the centre token gets an outline; hover shows the value."""
    acts = np.asarray(acts, dtype=np.float64).reshape(-1)
    if len(acts) != len(tokens):
        raise ValueError(f"acts must have one value per token ({len(tokens)}), got {len(acts)}")
    scale = max_act if max_act > 0 else 1.0
    return tokens_html(tokens, shade=acts / scale, titles=[f"{a:.3g}" for a in acts], center=center, word_level=word_level)


def contexts_html(contexts: Sequence[Any], max_act: float, title: str = "", word_level: bool | None = None) -> str:
    """A titled list of contexts (objects with .tokens, .acts, .center, .act, .seq, .pos), one per row.

    word_level: as in `display_tokens`; None decides once from all the contexts' tokens together.
    """
    out = [f"<div style='font-weight:600; margin-top:6px'>{html.escape(title)}</div>"] if title else []
    if not contexts:
        out.append("<div style='color:#888'>none</div>")
    if word_level is None and contexts:
        word_level = looks_word_level([t for c in contexts for t in c.tokens])
    for c in contexts:
        out.append(f"<div style='display:flex; align-items:baseline; gap:0.5em; max-width:100%'>"
                   f"<span style='{_LABEL}'>{c.act:8.3g}  seq {c.seq} pos {c.pos}</span>"
                   f"{shaded_tokens(c.tokens, c.acts, max_act, c.center, word_level)}</div>")
    return "".join(out)


def card_html(card: Any) -> str:
    """A feature card (see nbfeatures.features.FeatureCard): header, top contexts, quantile samples."""
    head = (f"<div style='font-size:14px'><b>feature {card.feature}</b> · density {card.density:.3g} · "
            f"max {card.max_act:.3g} · mean when firing {card.mean_act:.3g}")
    if card.best_label is not None:
        head += (f" · best label <b>{html.escape(str(card.best_label))}</b> "
                 f"(precision {card.precision:.2f}, recall {card.recall:.2f})")
    head += "</div>"
    # one word_level for the whole card: a short context alone can look word level when it is not
    every = [t for c in list(card.top) + [c for _, cs in card.quantiles for c in cs] for t in c.tokens]
    word_level = looks_word_level(every) if every else None
    parts = [head, contexts_html(card.top, card.max_act, f"top {len(card.top)} activations", word_level)]
    for label, contexts in card.quantiles:
        parts.append(contexts_html(contexts, card.max_act, label, word_level))
    return "".join(parts)


def describe_steered(steered: Sequence[bool], prompt_len: int) -> str:
    """Which positions an edit touched, in words: 'last prompt token and every generated token', ..."""
    s = np.asarray(steered, dtype=bool).reshape(-1)
    if not 0 <= as_int("prompt_len", prompt_len, 0) <= len(s):
        raise ValueError(f"prompt_len must lie in [0, {len(s)}] (steered has one entry per prompt and generated token), got {prompt_len}")
    prompt, gen = s[:prompt_len], s[prompt_len:]
    if not s.any():
        return "nothing steered"
    parts = []
    if prompt.all():
        parts.append("every prompt token")
    elif prompt.any():
        idx = np.flatnonzero(prompt)
        if len(idx) == 1 and idx[0] == prompt_len - 1:
            parts.append("last prompt token")
        elif len(idx) == idx[-1] - idx[0] + 1:
            parts.append(f"prompt tokens {idx[0]}–{idx[-1]}")
        else:
            parts.append("prompt tokens " + ", ".join(map(str, idx)))
    if len(gen) and gen.all():
        parts.append("every generated token")
    elif gen.any():
        parts.append("generated tokens " + ", ".join(map(str, np.flatnonzero(gen))))
    return " and ".join(parts)


def generation_html(prompt_tokens: Sequence[str], tokens: Sequence[str], steered: Sequence[bool] | None = None,
                    title: str = "", differs: Sequence[bool] | None = None, word_level: bool | None = None) -> str:
    """Prompt (grey) then completion, as one wrapping text; steered positions get an orange underline
    (`STEERED_STYLE`), completion tokens in `differs` are bold on green. word_level: as in `display_tokens`."""
    steered = list(steered) if steered is not None else [False] * (len(prompt_tokens) + len(tokens))
    differs = list(differs) if differs is not None else [False] * len(tokens)
    if len(steered) != len(prompt_tokens) + len(tokens):
        raise ValueError(f"steered must have one entry per prompt and generated token "
                         f"({len(prompt_tokens)} + {len(tokens)}), got {len(steered)}")
    if len(differs) != len(tokens):
        raise ValueError(f"differs must have one entry per generated token ({len(tokens)}), got {len(differs)}")
    n = len(prompt_tokens)
    marks = ["; ".join(([] if i >= n else ["color:#777"]) + ([STEERED_STYLE] if s else [])) or None
             for i, s in enumerate(steered)]
    head = f"<div style='font-weight:600'>{html.escape(title)}</div>" if title else ""
    return head + tokens_html(list(prompt_tokens) + list(tokens), marks=marks, bold=[False] * n + [bool(d) for d in differs],
                              titles=["prompt"] * n + ["generated"] * len(tokens), word_level=word_level)
