"""Figures for one feature and for steering: activation histogram, output-token bars, next-token bars, overview."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._checks import as_float, as_int, floats

POS, NEG, BASE, STEER = "#1f77b4", "#d62728", "#7f7f7f", "#ff7f0e"


def show_token(s: str) -> str:
    """A token as a label: whitespace made visible, since a leading space is invisible on an axis."""
    return s.replace("\n", "↵").replace("\t", "⇥").replace(" ", "·") or "∅"


def unique_labels(tokens: Sequence[str], ids: Sequence[int] | None = None) -> list[str]:
    """Visible token labels, made unique with the token id where two decode alike (plotly merges equal categories)."""
    shown = [show_token(t) for t in tokens]
    ids = list(range(len(shown))) if ids is None else [int(i) for i in ids]
    if len(ids) != len(shown):
        raise ValueError(f"ids must have one entry per token ({len(shown)}), got {len(ids)}")
    seen: dict[str, int] = {}
    for s in shown:
        seen[s] = seen.get(s, 0) + 1
    return [f"{s} #{i}" if seen[s] > 1 else s for s, i in zip(shown, ids)]


def activation_histogram(counts: Sequence[float], edges: Sequence[float], density: float | None = None,
                         title: str | None = None) -> go.Figure:
    """Histogram of a feature's nonzero activations; the title carries its density (fraction of tokens it fires on)."""
    counts, edges = floats("counts", counts), floats("edges", edges)
    if density is not None:
        density = as_float("density", density)
    if len(edges) != len(counts) + 1:
        raise ValueError(f"need len(edges) == len(counts) + 1, got {len(edges)} edges for {len(counts)} counts")
    head = title or "activations when firing"
    if density is not None:
        head += f" · density {density:.3g} ({density:.2%} of tokens)"
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), marker_color=STEER,
                           name="tokens", hovertemplate="act %{x:.3g}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=dict(text=head, x=0.01), xaxis_title="activation", yaxis_title="tokens",
                      bargap=0, height=260, margin=dict(l=50, r=20, t=50, b=40), template="plotly_white")
    return fig


def output_tokens_bar(pos_tokens: Sequence[str], pos_values: Sequence[float], neg_tokens: Sequence[str],
                      neg_values: Sequence[float], title: str = "output tokens (direction · W_U)") -> go.Figure:
    """Top negative (left) and positive (right) logit contributions of a feature's decoder direction."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("negative", "positive"), horizontal_spacing=0.25)
    pos_values, neg_values = floats("pos_values", pos_values, len(pos_tokens)), floats("neg_values", neg_values, len(neg_tokens))
    for col, toks, vals, color in ((1, neg_tokens, neg_values, NEG), (2, pos_tokens, pos_values, POS)):
        labels = unique_labels(toks)
        fig.add_trace(go.Bar(x=np.asarray(vals, dtype=np.float64), y=labels, orientation="h", marker_color=color,
                             name="negative" if col == 1 else "positive", showlegend=False,
                             hovertemplate="%{y}: %{x:.3g}<extra></extra>"), row=1, col=col)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=col)
    if not len(pos_tokens) and not len(neg_tokens):
        title += " · needs W_dec and W_U"
    fig.update_layout(title=dict(text=title, x=0.01), height=60 + 22 * max(len(pos_tokens), len(neg_tokens), 5),
                      margin=dict(l=80, r=20, t=60, b=30), template="plotly_white")
    return fig


def next_token_bars(probs_before: Sequence[float], probs_after: Sequence[float], vocab: Sequence[str],
                    k: int = 10, names: tuple[str, str] = ("baseline", "steered")) -> go.Figure:
    """Next-token probabilities before and after an edit, over the k tokens most likely under either."""
    k = as_int("k", k, 1)
    p0, p1 = np.asarray(probs_before, dtype=np.float64), np.asarray(probs_after, dtype=np.float64)
    if p0.shape != p1.shape or p0.ndim != 1 or len(p0) != len(vocab):
        raise ValueError(f"need two [V] probability vectors and a vocab of V strings; got {p0.shape}, {p1.shape}, V={len(vocab)}")
    p0, p1 = floats("probs_before", p0), floats("probs_after", p1)
    top = np.argsort(-np.maximum(p0, p1), kind="stable")[:k]
    labels = unique_labels([vocab[i] for i in top], top)
    fig = go.Figure([go.Bar(x=labels, y=p0[top], name=names[0], marker_color=BASE),
                     go.Bar(x=labels, y=p1[top], name=names[1], marker_color=STEER)])
    fig.update_layout(title=dict(text="next-token probabilities at the last prompt position", x=0.01),
                      barmode="group", yaxis=dict(title="p", range=[0, 1]), xaxis=dict(type="category"),
                      height=300, margin=dict(l=50, r=20, t=50, b=60), template="plotly_white")
    return fig


def feature_overview(density: Sequence[float], max_act: Sequence[float], ids: Sequence[int] | None = None,
                     selected: int | None = None, hover: Sequence[str] | None = None) -> go.Figure:
    """Every feature as a point: log10 density against max activation; the selected one is ringed.

    The points carry their feature ids as customdata, so a click handler can select one.
    """
    density = floats("density", density, finite=False)
    max_act = floats("max_act", max_act, len(density), finite=False)  # NaN: a feature with no value is not drawn
    ids = np.arange(len(density)) if ids is None else np.asarray(ids)
    if ids.shape != density.shape:
        raise ValueError(f"ids must have one entry per feature ({len(density)}), got shape {list(ids.shape)}")
    if hover is not None and len(hover) != len(ids):
        raise ValueError(f"hover must have one entry per feature ({len(ids)}), got {len(hover)}")
    logd = np.log10(density + 1e-10)  # SAELens's convention: dead features sit at -10
    text = [f"#{i}" + (f" {h}" if h else "") for i, h in zip(ids, hover if hover is not None else [""] * len(ids))]
    fig = go.Figure(go.Scattergl(x=logd, y=max_act, mode="markers", customdata=ids, text=text, name="features",
                                 marker=dict(size=5, color=POS, opacity=0.5),
                                 hovertemplate="%{text}<br>log10 density %{x:.2f}<br>max %{y:.3g}<extra></extra>"))
    sel = np.flatnonzero(ids == selected) if selected is not None else []
    fig.add_trace(go.Scatter(x=logd[sel], y=max_act[sel], mode="markers", name="selected", hoverinfo="skip",
                             marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(color=STEER, width=3))))
    fig.update_layout(title=dict(text=f"{len(ids)} features", x=0.01), xaxis_title="log10 density",
                      yaxis_title="max activation", showlegend=False, height=260,
                      margin=dict(l=50, r=20, t=40, b=40), template="plotly_white")
    return fig
