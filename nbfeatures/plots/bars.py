"""Figures for one feature and for steering: activation histogram, output-token bars, next-token bars, overview.

The two card figures also come as `..._spec` functions returning plotly's figure dict (`go.Figure(spec)` is the
figure): a panel that redraws them on every click diffs the dict into its live figure, which skips go.Figure's
validation (10 ms a figure, most of it the template).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ._checks import as_float, as_int, floats
from .tokens import display_tokens, plotly_text

POS, NEG, BASE, STEER = "#1f77b4", "#d62728", "#7f7f7f", "#ff7f0e"
_VISIBLE = str.maketrans({"\n": "↵", "\t": "→", "\r": "␍", " ": "·"})  # the glyphs tokens_html shows


def show_token(s: str) -> str:
    """A token as a label: the text it stands for (`display_tokens`: no Ġ / ▁), whitespace made visible,
    since a leading space is invisible on an axis."""
    return display_tokens([str(s)], word_level=False)[0].translate(_VISIBLE) or "∅"


def unique_labels(tokens: Sequence[str], ids: Sequence[int] | None = None) -> list[str]:
    """Visible token labels for a plotly axis, made unique with the token id where two decode alike (plotly merges
    equal categories); escaped (`plotly_text`), so a token `<s>` shows as itself instead of striking through the axis."""
    shown = [plotly_text(show_token(t)) for t in tokens]
    ids = list(range(len(shown))) if ids is None else [int(i) for i in ids]
    if len(ids) != len(shown):
        raise ValueError(f"ids must have one entry per token ({len(shown)}), got {len(ids)}")
    seen: dict[str, int] = {}
    for s in shown:
        seen[s] = seen.get(s, 0) + 1
    return [f"{s} #{i}" if seen[s] > 1 else s for s, i in zip(shown, ids)]


def activation_histogram_spec(counts: Sequence[float], edges: Sequence[float], density: float | None = None,
                              title: str | None = None) -> dict:
    """`activation_histogram` as plotly's figure dict."""
    counts, edges = floats("counts", counts), floats("edges", edges)
    if density is not None:
        density = as_float("density", density)
    if len(edges) != len(counts) + 1:
        raise ValueError(f"need len(edges) == len(counts) + 1, got {len(edges)} edges for {len(counts)} counts")
    head = title or "activations when firing"
    if density is not None:
        head += f" · density {density:.3g} ({density:.2%} of tokens)"
    bar = dict(type="bar", x=((edges[:-1] + edges[1:]) / 2).tolist(), y=counts.tolist(), width=np.diff(edges).tolist(),
               marker=dict(color=STEER), name="tokens", hovertemplate="act %{x:.3g}: %{y} tokens<extra></extra>")
    return dict(data=[bar], layout=dict(
        title=dict(text=plotly_text(head), x=0.01), xaxis=dict(title=dict(text="activation")), yaxis=dict(title=dict(text="tokens")),
        bargap=0, height=260, margin=dict(l=50, r=20, t=50, b=40), template="plotly_white"))


def activation_histogram(counts: Sequence[float], edges: Sequence[float], density: float | None = None,
                         title: str | None = None) -> go.Figure:
    """Histogram of a feature's nonzero activations; the title carries its density (fraction of tokens it fires on)."""
    return go.Figure(activation_histogram_spec(counts, edges, density, title))


def output_tokens_spec(pos_tokens: Sequence[str], pos_values: Sequence[float], neg_tokens: Sequence[str],
                       neg_values: Sequence[float], title: str = "output tokens (direction · W_U)") -> dict:
    """`output_tokens_bar` as plotly's figure dict."""
    pos_values, neg_values = floats("pos_values", pos_values, len(pos_tokens)), floats("neg_values", neg_values, len(neg_tokens))
    rows = max(len(pos_tokens), len(neg_tokens), 5)
    traces = []
    for name, toks, vals, color, axis in (("negative", neg_tokens, neg_values, NEG, ""), ("positive", pos_tokens, pos_values, POS, "2")):
        traces.append(dict(type="bar", x=vals.tolist(), y=unique_labels(toks), orientation="h", marker=dict(color=color),
                           name=name, showlegend=False, xaxis="x" + axis, yaxis="y" + axis,
                           hovertemplate="%{y}: %{x:.3g}<extra></extra>"))
    if not len(pos_tokens) and not len(neg_tokens):
        title += " · needs W_dec and W_U"
    # Butterfly: the labels sit on the outer sides (automargin makes room for the longest), the bars meet at zero in
    # the middle, so no label crosses the other plot however wide the column is. First token on top.
    ticks = dict(type="category", autorange="reversed", automargin=True, tickfont=dict(family="monospace", size=12))
    return dict(data=traces, layout=dict(
        title=dict(text=plotly_text(title), x=0.01), showlegend=False, height=90 + 22 * rows, template="plotly_white",
        margin=dict(l=10, r=10, t=50, b=40),
        xaxis=dict(domain=[0.0, 0.48], title=dict(text="lowers the logit"), zeroline=True, anchor="y"),
        xaxis2=dict(domain=[0.52, 1.0], title=dict(text="raises the logit"), zeroline=True, anchor="y2"),
        yaxis=dict(ticks, anchor="x", side="left"),
        yaxis2=dict(ticks, anchor="x2", side="right")))


def output_tokens_bar(pos_tokens: Sequence[str], pos_values: Sequence[float], neg_tokens: Sequence[str],
                      neg_values: Sequence[float], title: str = "output tokens (direction · W_U)") -> go.Figure:
    """Top negative (left) and positive (right) logit contributions of a feature's decoder direction, as horizontal
    bars with the tokens on the outer sides, strongest on top."""
    return go.Figure(output_tokens_spec(pos_tokens, pos_values, neg_tokens, neg_values, title))


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
    fig = go.Figure([go.Bar(x=labels, y=p0[top], name=plotly_text(names[0]), marker_color=BASE),
                     go.Bar(x=labels, y=p1[top], name=plotly_text(names[1]), marker_color=STEER)])
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
    text = [f"#{i}" + (f" {plotly_text(h)}" if h else "") for i, h in zip(ids, hover if hover is not None else [""] * len(ids))]
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
