"""HTML for a prompt view: the prompt's tokens shaded by their strongest feature, and one token's features ranked.

Pure functions returning strings (shown in an ipywidgets.HTML). Token text goes through `tokens.tokens_html`.

    ids [T, K], values [T, K]: each token's features, strongest first (-1 pads a token with fewer than K)
"""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np

from ._checks import as_int
from .tokens import tokens_html

_HEAD = "font-weight:600; margin-top:4px; font-size:12px"


def _grid(name: str, a: object, T: int | None = None, dtype=np.float64) -> np.ndarray:
    a = np.asarray(a, dtype=dtype)
    if a.ndim != 2 or (T is not None and len(a) != T):
        want = f"[T={T}, K]" if T is not None else "[T, K]"
        raise ValueError(f"{name} must be {want} (one row per token), got shape {list(a.shape)}")
    return a


def _name(names: Mapping[int, str] | None, f: int) -> str:
    return str(names.get(f, "")) if names else ""


def token_titles(ids: object, values: object, names: Mapping[int, str] | None = None, n: int = 8) -> list[str]:
    """Hover text per token: its position and its best n features, one per line ("#12  2.31  month")."""
    ids, values = _grid("ids", ids, dtype=np.int64), _grid("values", values)
    if ids.shape != values.shape:
        raise ValueError(f"ids and values must have the same shape [T, K], got {list(ids.shape)} and {list(values.shape)}")
    out = []
    for t, (row, vals) in enumerate(zip(ids, values)):
        lines = [f"#{f}  {v:.3g}  {_name(names, int(f))}".rstrip() for f, v in zip(row[:n], vals[:n]) if f >= 0]
        more = int((row >= 0).sum()) - len(lines)
        out.append("\n".join([f"token {t}"] + (lines or ["no feature fires"]) + ([f"+{more} more"] if more > 0 else [])))
    return out


def prompt_tokens_html(tokens: Sequence[str], ids: object, values: object, *, names: Mapping[int, str] | None = None,
                       token: int | None = None, feature: int | None = None, feature_acts: Sequence[float] | None = None,
                       word_level: bool | None = None) -> str:
    """The prompt shaded by each token's strongest feature (hover a token: its features), the selected `token`
    outlined; with `feature` and its `feature_acts` [T], a second row shaded by that feature alone."""
    T = len(tokens)
    ids, values = _grid("ids", ids, T, np.int64), _grid("values", values, T)
    if token is not None and not 0 <= as_int("token", token) < max(T, 1):
        raise ValueError(f"token must be a position in 0..{T - 1}, got {token}")
    top = np.where(ids[:, 0] >= 0, values[:, 0], 0.0) if ids.shape[1] else np.zeros(T)
    scale = float(np.abs(top).max()) if T and np.abs(top).max() > 0 else 1.0
    titles = token_titles(ids, values, names)
    parts = [f"<div style='{_HEAD}'>strongest feature per token <span style='font-weight:400; color:#888'>"
             f"(hover a token for its features)</span></div>",
             tokens_html(tokens, shade=np.abs(top) / scale, titles=titles, center=token, word_level=word_level)]
    if feature is not None:
        acts = np.asarray(feature_acts if feature_acts is not None else np.zeros(T), dtype=np.float64).reshape(-1)
        if len(acts) != T:
            raise ValueError(f"feature_acts must have one value per token ({T}), got {len(acts)}")
        peak = float(np.abs(acts).max()) if T else 0.0
        name = _name(names, int(feature))
        parts += [f"<div style='{_HEAD}'>feature #{int(feature)}{' · ' + html.escape(name) if name else ''} "
                  f"<span style='font-weight:400; color:#888'>(max {peak:.3g} on this prompt)</span></div>",
                  tokens_html(tokens, shade=np.abs(acts) / (peak or 1.0), titles=[f"#{int(feature)}: {a:.3g}" for a in acts],
                              center=token, word_level=word_level)]
    return "".join(parts)


_NAME_CELL = "padding-left:.8em; text-align:left"  # header and cells alike: the name clear of the bar, left-aligned


def token_features_table(ids: Sequence[int], values: Sequence[float], *, names: Mapping[int, str] | None = None,
                         feature: int | None = None, title: str = "") -> str:
    """One token's features ranked (rank, id, value with a bar, name); the row of `feature` is highlighted."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(ids) != len(values):
        raise ValueError(f"ids and values must have one entry per feature, got {len(ids)} and {len(values)}")
    keep = ids >= 0
    ids, values = ids[keep], values[keep]
    head = f"<div style='{_HEAD}'>{html.escape(title)}</div>" if title else ""
    if not len(ids):
        return head + "<div style='color:#888; font-size:12px'>no feature fires on this token</div>"
    scale = float(np.abs(values).max()) or 1.0
    rows = []
    for r, (f, v) in enumerate(zip(ids, values)):
        bg = " style='background:rgba(31,119,180,0.15)'" if feature is not None and f == feature else ""
        bar = f"<div style='background:#ff7f0e; height:8px; width:{100 * abs(v) / scale:.0f}%'></div>"
        rows.append(f"<tr{bg}><td>{r + 1}</td><td>#{f}</td><td style='text-align:right; padding-right:.8em'>{v:.3g}</td>"
                    f"<td style='width:8em'>{bar}</td><td style='{_NAME_CELL}'>{html.escape(_name(names, int(f)))}</td></tr>")
    return (head + "<table style='font-family: ui-monospace, monospace; font-size:12px; border-collapse:collapse'>"
            "<tr style='color:#888; text-align:left'><th style='padding:0 .8em 0 0'>rank</th>"
            "<th style='padding:0 .8em 0 0'>feature</th><th style='padding:0 .8em 0 0; text-align:right'>value</th>"
            f"<th></th><th style='{_NAME_CELL}'>name</th></tr>"
            + "".join(rows) + "</table>")
