"""Training curves: a training history in, one subplot per group of metrics out.

    smoothed_t = sum_i a^(t-i) y_i / sum_i a^(t-i)        (an EMA, debiased as TensorBoard does)

The history is columnar: a mapping metric -> values, one value per logged step (a pandas
DataFrame from `train_sae` works as is). NaN marks a metric that was not logged at that
step (e.g. CE-loss recovered, evaluated every few hundred steps); those points are dropped.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._checks import as_int
from .tokens import plotly_text

# Which subplot each known metric goes to; the names are the keys train_sae's objectives log.
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "mse", "aux_loss", "l1", "kl", "cov", "entropy_bits"),
    "FVU": ("fvu", "fvu_4k"),
    "L0": ("l0",),
    "dead / dense fraction": ("dead_fraction", "dense_fraction"),
    "CE loss recovered": ("ce_recovered",),
}
NOT_PLOTTED = ("step", "lr", "tokens", "elapsed_s", "entropy_on")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def ema(y: Sequence[float], smoothing: float, block: int = 64) -> np.ndarray:
    """Debiased exponential moving average; `smoothing` a in [0, 1) is the weight of the past.

    Vectorised in blocks: within a block the sums are one [block, block] matmul, and only the
    carry between blocks is a Python loop (len / block steps), which keeps a^-block finite.
    """
    y = _column("y", y)
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
    if not np.isfinite(y).all():
        raise ValueError(f"y holds {int((~np.isfinite(y)).sum())} NaN or inf value(s); drop them before smoothing")
    if smoothing == 0 or len(y) == 0:
        return y.copy()
    a, n = float(smoothing), len(y)
    pad = (-n) % block
    num = np.concatenate([y, np.zeros(pad)]).reshape(-1, block)
    den = np.concatenate([np.ones(n), np.zeros(pad)]).reshape(-1, block)
    k = np.arange(block)
    lag = k[:, None] - k[None, :]
    W = np.where(lag >= 0, a ** np.maximum(lag, 0), 0.0)  # W[t, i] = a^(t-i) for i <= t
    num, den = num @ W.T, den @ W.T
    decay = a ** (k + 1)  # the previous block's last value reaches position t of this one as a^(t+1)
    for b in range(1, len(num)):
        num[b] += decay * num[b - 1, -1]
        den[b] += decay * den[b - 1, -1]
    return (num / den).ravel()[:n]


def default_panels(keys: Sequence[str]) -> dict[str, list[str]]:
    """Group the metrics present into subplots: the known groups first, everything else under "other"."""
    keys = list(keys)
    panels: dict[str, list[str]] = {}
    for title, members in PANELS.items():
        present = [k for k in members if k in keys]
        if title == "loss":
            present += [k for k in keys if k.startswith(("ds_mse/", "loss/"))]
        if present:
            panels[title] = present
    placed = {k for v in panels.values() for k in v} | set(NOT_PLOTTED)
    other = [k for k in keys if k not in placed]
    if other:
        panels["other"] = other
    return panels


class Curve(NamedTuple):
    metric: str
    panel: int  # index of its subplot
    x: np.ndarray  # the steps where it was logged
    raw: np.ndarray
    smooth: np.ndarray  # EMA of raw


def curves(history: Mapping[str, Any], panels: Mapping[str, Sequence[str]], smoothing: float = 0.0,
           x: str = "step") -> list[Curve]:
    """The data of every line in `training_curves`, in trace order (LiveCurves updates a figure in place with it)."""
    columns = _history(history)
    n_rows = len(next(iter(columns.values()))) if columns else 0
    xs = columns[x] if x in columns else np.arange(1, n_rows + 1, dtype=np.float64)
    out = []
    for i, metrics in enumerate(panels.values()):
        for m in metrics:
            if m not in columns:
                raise ValueError(f"panels name metric {m!r}, which is not in the history; present are {list(columns)}")
            y = columns[m]
            ok = np.isfinite(y)
            out.append(Curve(m, i, xs[ok], y[ok], ema(y[ok], smoothing)))
    return out


def _column(name: str, values: Any) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"history column {name!r} must hold numbers (NaN where not logged), got {str(values)[:60]}") from None
    if a.ndim != 1:
        raise ValueError(f"history column {name!r} must be a flat list of numbers, got shape {list(a.shape)}")
    return a


def _history(history: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The history's columns as float arrays, all of one length (one value per logged row)."""
    if not isinstance(history, Mapping) and not hasattr(history, "items"):
        raise TypeError(f"history must map metric -> values (a dict or DataFrame), got {type(history).__name__}")
    columns = {k: _column(k, v) for k, v in history.items()}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"history columns must all have one value per row (NaN where not logged); lengths are {lengths}")
    return columns


def curves_title(history: Mapping[str, Any], smoothing: float = 0.0, x: str = "step") -> str:
    keys = list(history.keys())
    xs = np.asarray(history[x]) if x in keys else np.arange(1, (len(history[keys[0]]) if keys else 0) + 1)
    last = f"{x} {float(xs[-1]):g}" if len(xs) else "no data yet"
    return f"training · {last}" + (f" · EMA {smoothing:g}" if smoothing else "")


def training_curves(history: Mapping[str, Any], panels: Mapping[str, Sequence[str]] | None = None, *,
                    smoothing: float = 0.0, log_y: bool = False, x: str = "step", cols: int = 3,
                    height: int | None = None) -> go.Figure:
    """One subplot per group of metrics; each metric is a faint raw line under its EMA.

    `panels` maps subplot title -> metric names (default: `default_panels`); `x` names the
    column for the x axis (the row number when it is absent). With `smoothing` 0 the raw
    lines are hidden, since they coincide with the smoothed ones. Trace 2i is metric i's raw
    line and trace 2i + 1 its smoothed line, in the order of `curves`. The legend lies below the
    plots and the width follows the output area (no fixed width).
    """
    keys = list(history.keys())
    cols = as_int("cols", cols, 1)
    panels = default_panels(keys) if panels is None else {t: list(m) for t, m in panels.items()}
    missing = [m for ms in panels.values() for m in ms if m not in keys]
    if missing:
        raise ValueError(f"panels name metrics that are not in the history: {missing}; present are {keys}")
    titles = list(panels) or [""]
    cols = max(1, min(cols, len(titles)))
    rows = -(-len(titles) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[plotly_text(t) for t in titles], horizontal_spacing=0.07,
                        vertical_spacing=0.3 / rows if rows > 1 else 0.1)
    drawn = curves(history, panels, smoothing, x)
    for j, c in enumerate(drawn):
        r, col, rgb = c.panel // cols + 1, c.panel % cols + 1, COLORS[j % len(COLORS)]
        fig.add_trace(go.Scatter(x=c.x, y=c.raw, name=f"{c.metric} (raw)", mode="lines", line=dict(color=rgb, width=1),
                                 opacity=0.3, hoverinfo="skip", showlegend=False, legendgroup=c.metric,
                                 visible=smoothing > 0), row=r, col=col)
        fig.add_trace(go.Scatter(x=c.x, y=c.smooth, name=c.metric, mode="lines", line=dict(color=rgb, width=2),
                                 legendgroup=c.metric), row=r, col=col)
    fig.update_yaxes(type="log" if log_y else "linear", exponentformat="power" if log_y else "none")
    if log_y:  # label decades only where a panel spans one or more (plotly's default adds tiny, misleading 2 .. 9 labels)
        for i in range(len(titles)):
            y = np.concatenate([np.asarray(c.raw, dtype=np.float64) for c in drawn if c.panel == i] or [np.zeros(0)])
            y = y[np.isfinite(y) & (y > 0)]
            if len(y) and np.log10(y.max()) - np.log10(y.min()) >= 1:
                fig.update_yaxes(dtick=1, row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(title_text=x if x in keys or not keys else "row", title_standoff=2)
    # The legend goes below the plots, under the x-axis titles (a legend above them covered the subplot titles); the
    # width is left to the output area (autosize: plotly.js otherwise draws 700 px wide once a height is given).
    height = height or 240 * rows + 120
    margin = dict(l=50, r=20, t=70, b=90)
    below_px = 50  # tick labels and the x-axis title
    fig.update_layout(height=height, autosize=True, margin=margin,
                      title=dict(text=curves_title(history, smoothing, x), x=0.01),
                      legend=dict(orientation="h", yanchor="top", y=-below_px / max(height - margin["t"] - margin["b"], 50),
                                  xanchor="left", x=0),
                      hovermode="x unified", template="plotly_white")
    return fig
