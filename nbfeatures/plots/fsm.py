"""Figures for probing a finite-state machine model: next-state distributions and the codes of a state.

    next_state_bars: P(next state) over all states, before and after an intervention; out-edges marked
    state_codes_table: the codes fired on a state's digits, one row per codebook (site, head)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ._checks import floats, ints
from .bars import BASE, STEER
from .tokens import plotly_text

EDGE, TARGET = "#2ca02c", "#9467bd"


def next_state_bars(before: Sequence[float], after: Sequence[float] | None, edges: Sequence[int],
                    target_edges: Sequence[int] = (), title: str = "next-state distribution") -> go.Figure:
    """Bars over states (before grey, after orange); ▼ marks the true out-edges, ◆ those of a target state."""
    before = np.asarray(before, dtype=np.float64).reshape(-1)
    n = len(before)
    after_arr = None if after is None else np.asarray(after, dtype=np.float64).reshape(-1)
    if after_arr is not None and len(after_arr) != n:
        raise ValueError(f"before and after must have one probability per state, got {n} and {len(after_arr)}")
    before = floats("before", before)
    after_arr = None if after_arr is None else floats("after", after_arr)
    for what, idx in (("edges", edges), ("target_edges", target_edges)):
        if any(not 0 <= int(e) < n for e in idx):
            raise ValueError(f"{what} must be states in [0, {n}), got {list(idx)}")
    width = max(len(str(n - 1)), 1)
    labels = [str(s).zfill(width) for s in range(n)]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=before.tolist(), name="before", marker_color=BASE,
                         hovertemplate="state %{x}: %{y:.3f}<extra>before</extra>"))
    if after_arr is not None:
        fig.add_trace(go.Bar(x=labels, y=after_arr.tolist(), name="after", marker_color=STEER,
                             hovertemplate="state %{x}: %{y:.3f}<extra>after</extra>"))
    top = max(float(before.max(initial=0)), float(after_arr.max(initial=0)) if after_arr is not None else 0.0, 1e-9)
    fig.add_trace(go.Scatter(x=[labels[int(e)] for e in edges], y=[top * 1.08] * len(edges), mode="markers",
                             marker=dict(symbol="triangle-down", size=9, color=EDGE), name="true out-edges",
                             hovertemplate="edge to %{x}<extra></extra>"))
    if len(target_edges):
        fig.add_trace(go.Scatter(x=[labels[int(e)] for e in target_edges], y=[top * 1.16] * len(target_edges), mode="markers",
                                 marker=dict(symbol="diamond", size=8, color=TARGET), name="target state's out-edges",
                                 hovertemplate="target edge to %{x}<extra></extra>"))
    # Upright, readable labels; with many states only every k-th is labelled (nticks) instead of shrinking them all.
    xaxis = dict(title="next state", type="category", tickangle=0 if n <= 40 else -45, tickfont=dict(size=11), nticks=min(n, 25))
    fig.update_layout(title=dict(text=plotly_text(title), x=0.01), barmode="group", bargap=0.1, height=320, template="plotly_white",
                      xaxis=xaxis,
                      yaxis=dict(title="probability", range=[0, top * 1.25]),
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"), margin=dict(l=50, r=20, t=60, b=50))
    return fig


def state_codes_table(rows: Sequence[str], first: Sequence[int], second: Sequence[int], digits: str = "",
                      title: str | None = None) -> go.Figure:
    """A table: one row per codebook (`rows`), the code fired on the state's first and second digit."""
    if not len(rows) == len(first) == len(second):
        raise ValueError(f"rows, first and second need one entry per codebook, got {len(rows)}, {len(first)}, {len(second)}")
    first, second = ints("first", first, 0), ints("second", second, 0)
    # plotly.js wraps a table cell holding a space word by word, measuring each word on the page; in a view drawn
    # while hidden (a panel built before it is shown) every word measures 0 and the cell comes out blank. Non-breaking
    # spaces keep each cell one fragment, drawn as is.
    def cell(s: object) -> str:
        return plotly_text(s).replace(" ", "\u00a0")

    head = [cell(h) for h in ("codebook", f"code on 1st digit {digits[:1]}".strip(), f"code on 2nd digit {digits[1:2]}".strip())]
    header_h, row_h, top, bottom = 28, 22, 40, 6
    fig = go.Figure(go.Table(header=dict(values=head, align="left", fill_color="#eeeeee", height=header_h),
                             cells=dict(values=[[cell(r) for r in rows], [int(c) for c in first], [int(c) for c in second]],
                                        align="left", height=row_h)))
    # The figure as tall as the table it holds (+2 px of borders): no empty band between it and the next figure.
    fig.update_layout(title=dict(text=plotly_text(title or f"codes of state {digits}"), x=0.01),
                      height=top + header_h + row_h * len(rows) + bottom + 2, margin=dict(l=10, r=10, t=top, b=bottom))
    return fig
