"""Argument checks shared by every layer: a bad value gets an error naming the argument and what is allowed.

A wrong type raises `ArgumentTypeError`, which is both a TypeError and a ValueError (so either `except` clause
catches it); a value out of range raises ValueError. bool is never taken for a number (True would silently mean 1),
nor a float for an int (2.0 where a count belongs is a mix-up). Standard library only, so plots/ may use it too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type."""


def is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def check_int(what: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi]; else an error naming `what` and the range."""
    allowed = "an integer" + (f" >= {lo}" if lo is not None and hi is None else f" in [{lo}, {hi}]" if lo is not None else "")
    if not is_int(value):
        raise ArgumentTypeError(f"{what} must be {allowed}; got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{what} must be {allowed}; got {value}")
    return int(value)


def check_number(what: str, value: Any, lo: float | None = None, strict: bool = False) -> float:
    """`value` as a finite float above lo (> lo when strict, else >=); else an error naming `what`."""
    allowed = "a finite number" + ("" if lo is None else f" {'>' if strict else '>='} {lo}")
    if not is_real(value):
        raise ArgumentTypeError(f"{what} must be {allowed}; got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (lo is not None and (value <= lo if strict else value < lo)):
        raise ValueError(f"{what} must be {allowed}; got {value}")
    return float(value)


def as_int(name: str, value: Any, lo: int = 0) -> int:
    """`value` as an int >= lo (the corpora's and figures' sizes and ids)."""
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be an int >= {lo}, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value}")
    return int(value)


# The configs' and training loop's wording: "<owner>: <name> must be > 0 (an int), got '10' (str)"


def int_arg(owner: str, name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum]."""
    allowed = (f">= {minimum}" if minimum <= 0 else f"> {minimum - 1}") + (f" and <= {maximum}" if maximum is not None else "")
    if not is_int(value):
        raise ArgumentTypeError(f"{owner}: {name} must be {allowed} (an int), got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{owner}: {name} must be {allowed} (an int), got {value}")
    return int(value)


def sizes_arg(owner: str, **sizes: Any) -> None:
    """Every size an int > 0, else one error naming them all: "need d_in > 0 and d_sae > 0 (ints), got ..."."""
    if not all(is_int(v) and v > 0 for v in sizes.values()):
        kind = ValueError if all(is_int(v) for v in sizes.values()) else ArgumentTypeError
        raise kind(f"{owner}: need {' and '.join(f'{k} > 0' for k in sizes)} (ints), got " + ", ".join(f"{k}={v!r}" for k, v in sizes.items()))


def real_arg(owner: str, name: str, value: Any, minimum: float = 0.0, *, strict: bool = False, maximum: float | None = None) -> float:
    """`value` as a finite float >= minimum (> minimum if strict, <= maximum if given)."""
    allowed = f"{'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
    if not is_real(value):
        raise ArgumentTypeError(f"{owner}: {name} must be {allowed} (a finite number), got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{owner}: {name} must be {allowed} (a finite number), got {value!r}")
    return v


def bool_arg(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{owner}: {name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def choice_arg(owner: str, name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value
