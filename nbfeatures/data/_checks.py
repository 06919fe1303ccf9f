"""Argument checks shared by the corpora: a bad size or id gets an error naming it and what is allowed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import ArgumentTypeError, as_int  # noqa: F401  (re-exported for this package)


def as_ids(name: str, ids: Any, vocab_size: int | None) -> Tensor:
    """Token ids as a LongTensor, each in [0, vocab_size) (any integer with vocab_size None)."""
    try:
        t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, Tensor) else ids)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be integer token ids (a tensor, array or list), got {type(ids).__name__}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integer token ids, got dtype {t.dtype}")
    if vocab_size is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"{name} must be in [0, {vocab_size}), got min {int(t.min())}, max {int(t.max())}")
    return t.long()
