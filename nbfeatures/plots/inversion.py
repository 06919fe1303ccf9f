"""InversionView figures: sampled inputs as coloured token rows beside their distance bars, the query, a summary.

Pure functions over plain data (token strings, floats); numpy and plotly only. Tokens are shown as the text they
stand for (`plots.tokens`): the query through `tokens_html`, heatmap cells and the summary through `show_token`.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._checks import as_float, as_int, floats, ints
from .bars import show_token
from .tokens import plotly_text, tokens_html

INSIDE, OUTSIDE = "#1f77b4", "#bbbbbb"


def inversion_samples(tokens: Sequence[Sequence[str]], distance: Sequence[float], colour: Sequence[Sequence[float]],
                      position: Sequence[int], epsilon: float, title: str = "") -> go.Figure:  # fmt: skip
    """Left: one row per sample, tokens coloured by log p(tok | z) - log p(tok | z_BOS), the matched position boxed.
    Right: the sample's distance, inside epsilon in blue, with the epsilon line. Rows in the given order, first on top."""
    n = len(tokens)
    if not (len(distance) == len(colour) == len(position) == n):
        raise ValueError(f"tokens, distance, colour and position need one entry per sample; got {n}, {len(distance)}, "
                         f"{len(colour)}, {len(position)}")  # fmt: skip
    epsilon = as_float("epsilon", epsilon)
    distance = floats("distance", distance).tolist()
    for i, (row, p) in enumerate(zip(tokens, ints("position", position, 0))):
        if p >= len(row):
            raise ValueError(f"position of sample {i} must lie in [0, {len(row)}) (its tokens), got {p}")
    width = max((len(t) for t in tokens), default=1)
    z = np.full((n, width), np.nan)
    text = [[""] * width for _ in range(n)]
    for i, (row, c) in enumerate(zip(tokens, colour)):
        if len(c) != len(row):
            raise ValueError(f"sample {i}: {len(row)} tokens but {len(c)} colour values")
        z[i, : len(row)] = c
        text[i][: len(row)] = [plotly_text(show_token(t)) for t in row]  # escaped: plotly reads <s> as strike-through
    labels = [f"#{i} d={d:.3f}" for i, d in enumerate(distance)]
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.78, 0.22], horizontal_spacing=0.02)
    z_cells = [[None if np.isnan(v) else float(v) for v in row] for row in z]  # JSON has no NaN: a FigureWidget would choke
    fig.add_trace(go.Heatmap(z=z_cells, text=text, texttemplate="%{text}", y=labels, x=list(range(width)),
                             colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, xgap=1, ygap=1,
                             colorbar=dict(title="Δ log p", x=-0.12, len=0.8),
                             hovertemplate="%{y} pos %{x}: %{text}<br>Δ log p = %{z:.2f}<extra></extra>"), 1, 1)  # fmt: skip
    inside = [d <= epsilon for d in distance]
    fig.add_trace(go.Bar(x=list(map(float, distance)), y=labels, orientation="h", marker_color=[INSIDE if k else OUTSIDE for k in inside],
                         hovertemplate="%{y}<extra></extra>", showlegend=False), 1, 2)  # fmt: skip
    fig.add_vline(x=float(epsilon), line_dash="dash", line_color="#444", row=1, col=2,
                  annotation_text=f"ε={epsilon:g}", annotation_position="top")  # fmt: skip
    for i, p in enumerate(position):
        fig.add_shape(type="rect", x0=p - 0.5, x1=p + 0.5, y0=i - 0.5, y1=i + 0.5, line=dict(color="black", width=2), row=1, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=False, col=1)
    fig.update_xaxes(title_text="position", col=1)
    fig.update_xaxes(title_text="distance", col=2)
    fig.update_layout(title=plotly_text(title) or f"{sum(inside)} of {n} samples inside ε = {epsilon:g}", height=min(1200, 120 + 22 * n),
                      margin=dict(l=70, r=20, t=60, b=40), plot_bgcolor="white")  # fmt: skip
    return fig


QUERY_STYLE = "background: #ff7f0e; color: white; font-weight: bold"  # the queried token


def query_html(tokens: Sequence[str], position: int, label: str = "query", *, word_level: bool | None = None) -> str:
    """The query input as text (`tokens_html`), the queried token in white on orange; each token's position on hover.

    word_level: as in `display_tokens` (None: detect from `tokens`).
    """
    if not 0 <= as_int("position", position, 0) < len(tokens):
        raise ValueError(f"position {position} is outside the query of {len(tokens)} tokens; allowed 0..{len(tokens) - 1}")
    marks = [QUERY_STYLE if i == position else None for i in range(len(tokens))]
    body = tokens_html(tokens, marks=marks, titles=[f"pos {i}" for i in range(len(tokens))], word_level=word_level)
    return f"<div><b>{html.escape(label)}</b> (position {position}):{body}</div>"


def shared_tokens(tokens: Sequence[Sequence[str]], position: Sequence[int], inside: Sequence[bool], min_share: float = 1.0) -> list[dict]:
    """What the in-epsilon samples share, aligned at each sample's matched position.

    One entry per offset (0 = the matched token, -1 the one before, ...) where at least `min_share` of the
    in-epsilon samples that reach that offset have the same token: {offset, token, share, n}.
    """
    if not len(tokens) == len(position) == len(inside):
        raise ValueError(f"tokens, position and inside need one entry per sample; got {len(tokens)}, {len(position)}, {len(inside)}")
    if not 0 < as_float("min_share", min_share) <= 1:
        raise ValueError(f"min_share must lie in (0, 1], got {min_share}")
    for i, (t, p) in enumerate(zip(tokens, ints("position", position, 0))):
        if p >= len(t):
            raise ValueError(f"position of sample {i} must lie in [0, {len(t)}) (its tokens), got {p}")
    rows = [(t, p) for t, p, k in zip(tokens, position, inside) if k]
    if not rows:
        return []
    out = []
    for offset in range(0, -max(p for _, p in rows) - 1, -1):
        seen = [t[p + offset] for t, p in rows if p + offset >= 0]
        token, count = Counter(seen).most_common(1)[0]
        if count / len(seen) >= min_share:
            out.append({"offset": offset, "token": token, "share": count / len(seen), "n": len(seen)})
    return out


def shared_html(shared: Sequence[dict], n_inside: int) -> str:
    if not n_inside:
        return "<div><b>shared by the in-ε samples:</b> no sample is inside ε</div>"
    if not shared:
        return f"<div><b>shared by the {n_inside} in-ε samples:</b> no position is constant</div>"
    parts = [f"{s['offset']:+d}: <code>{html.escape(show_token(s['token']))}</code>" + (f" ({s['share']:.0%})" if s["share"] < 1 else "")
             for s in shared]  # fmt: skip
    return (f"<div><b>shared by the {n_inside} in-ε samples</b> (offset from the matched position: token): "
            f"{', '.join(parts)}</div>")
