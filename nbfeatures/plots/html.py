"""HTML for token sequences: contexts shaded by a feature's activation, generations with steered tokens marked.

Pure functions returning strings (shown in an ipywidgets.HTML); every token is escaped.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np

from ._checks import as_int

_ROW = "font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; line-height: 1.9; margin: 1px 0"
STEERED_STYLE = "background: rgba(255,127,14,0.35); border-bottom: 2px solid #ff7f0e"


def _tok(s: str) -> str:
    return html.escape(s.replace("\n", "↵"), quote=True)


def shaded_tokens(tokens: Sequence[str], acts: Sequence[float], max_act: float, center: int | None = None) -> str:
    """Tokens as spans shaded by activation / max_act (orange); the centre token gets an outline; hover shows the value."""
    acts = np.asarray(acts, dtype=np.float64).reshape(-1)
    if len(acts) != len(tokens):
        raise ValueError(f"acts must have one value per token ({len(tokens)}), got {len(acts)}")
    scale = max_act if max_act > 0 else 1.0
    spans = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = float(np.clip(a / scale, 0, 1))
        style = f"background: rgba(255,127,14,{alpha:.2f})"
        if i == center:
            style += "; outline: 1.5px solid #d62728"
        spans.append(f'<span style="{style}" title="{a:.3g}">{_tok(t)}</span>')
    return "".join(spans)


def contexts_html(contexts: Sequence[Any], max_act: float, title: str = "") -> str:
    """A titled list of contexts (objects with .tokens, .acts, .center, .act, .seq, .pos), one per line."""
    out = [f"<div style='font-weight:600; margin-top:6px'>{html.escape(title)}</div>"] if title else []
    if not contexts:
        out.append("<div style='color:#888'>none</div>")
    for c in contexts:
        out.append(f"<div style='{_ROW}'><span style='color:#888; display:inline-block; width:11em'>"
                   f"{c.act:8.3g}  seq {c.seq} pos {c.pos}</span>{shaded_tokens(c.tokens, c.acts, max_act, c.center)}</div>")
    return "".join(out)


def card_html(card: Any) -> str:
    """A feature card (see nbfeatures.features.FeatureCard): header, top contexts, quantile samples."""
    head = (f"<div style='font-size:14px'><b>feature {card.feature}</b> · density {card.density:.3g} · "
            f"max {card.max_act:.3g} · mean when firing {card.mean_act:.3g}")
    if card.best_label is not None:
        head += (f" · best label <b>{html.escape(str(card.best_label))}</b> "
                 f"(precision {card.precision:.2f}, recall {card.recall:.2f})")
    head += "</div>"
    parts = [head, contexts_html(card.top, card.max_act, f"top {len(card.top)} activations")]
    for label, contexts in card.quantiles:
        parts.append(contexts_html(contexts, card.max_act, label))
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
                    title: str = "", differs: Sequence[bool] | None = None) -> str:
    """Prompt (grey) then completion; steered positions get an orange underline, completion tokens in `differs` are bold."""
    steered = list(steered) if steered is not None else [False] * (len(prompt_tokens) + len(tokens))
    differs = list(differs) if differs is not None else [False] * len(tokens)
    if len(steered) != len(prompt_tokens) + len(tokens):
        raise ValueError(f"steered must have one entry per prompt and generated token "
                         f"({len(prompt_tokens)} + {len(tokens)}), got {len(steered)}")
    if len(differs) != len(tokens):
        raise ValueError(f"differs must have one entry per generated token ({len(tokens)}), got {len(differs)}")
    spans = []
    for i, t in enumerate(list(prompt_tokens) + list(tokens)):
        gen = i >= len(prompt_tokens)
        style = [] if gen else ["color:#777"]
        if i < len(steered) and steered[i]:
            style.append(STEERED_STYLE)
        if gen and differs[i - len(prompt_tokens)]:
            style.append("font-weight:700")
        spans.append(f"<span style=\"{'; '.join(style)}\">{_tok(t)}</span>")
    head = f"<div style='font-weight:600'>{html.escape(title)}</div>" if title else ""
    return f"{head}<div style='{_ROW}'>{''.join(spans)}</div>"
