"""Argument checks for the figure functions: bad data gets an error naming it and what is allowed, not a plotly trace."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._checks import ArgumentTypeError, as_int  # noqa: F401  (re-exported for this package)


def as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def floats(name: str, values: Any, n: int | None = None, *, finite: bool = True) -> np.ndarray:
    """A 1-D float64 array (of n values when n is given), without NaN / inf when `finite`."""
    try:
        a = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__} {str(values)[:60]}") from None
    if a.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got shape {list(a.shape)}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} must have {n} values, got {len(a)}")
    if finite and not np.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} NaN or inf value(s); it must hold finite numbers")
    return a


def ints(name: str, values: Any, lo: int, hi: int | None = None) -> list[int]:
    """Integers in [lo, hi) (positions, states, codes); numpy / torch integer scalars count as ints."""
    allowed = f"ints in [{lo}, {hi})" if hi is not None else f"ints >= {lo}"
    out = []
    for v in values:
        v = v.item() if hasattr(v, "item") else v
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must hold {allowed}, got {type(v).__name__} {v!r}")
        if v < lo or hi is not None and v >= hi:
            raise ValueError(f"{name} must hold {allowed}, got {v}")
        out.append(v)
    return out
