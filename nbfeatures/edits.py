"""Edits to an activation at a site: splice a dictionary, steer by a vector, ablate.

Each edit is a small frozen dataclass with a pure-torch `apply(act, mask)`; the site layer
(`sites.py`) decides *where* and *when* it runs (which site, which forward pass of a
generation, which positions), so the arithmetic here can be tested without a model.

    Splice:  act -> f(act).x_hat                     (+ (act - x_hat).detach() with error_term)
    Steer:   act[:, p] -> act[:, p] + coef * v        for p in positions
    Ablate:  act[:, p] -> 0  or  mean                 for p in positions

Dimension key: B batch, T position, D width at the site (a site's per-token shape may have
more than one dim, e.g. [H, E] for per-head outputs).

Positions are absolute indices into the (padded) token sequence. Negative ints count back
from the end of the prompt, so -1 is the last prompt token. A slice with no stop runs on
through every generated token: `slice(-1, None)` steers the last prompt token and every
token generated after it; `positions=None` means every position, prompt and generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

Positions = Union[None, int, slice, Sequence[int]]


def position_mask(positions: Positions, offset: int, T: int, prompt_len: int, device=None) -> Tensor:
    """Bool [T]: which of the positions offset .. offset+T-1 the edit touches."""
    pos_T = torch.arange(offset, offset + T, device=device)
    if positions is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    if isinstance(positions, slice):
        start, stop, step = positions.start, positions.stop, positions.step or 1
        start = 0 if start is None else (start + prompt_len if start < 0 else start)
        mask = pos_T >= start
        if stop is not None:
            mask &= pos_T < (stop + prompt_len if stop < 0 else stop)
        return mask & ((pos_T - start) % step == 0)
    ints = [positions] if isinstance(positions, int) else list(positions)
    absolute = torch.tensor([p + prompt_len if p < 0 else p for p in ints], device=device, dtype=torch.long)
    return (pos_T[:, None] == absolute[None, :]).any(dim=1)


def check_positions(positions: Positions, prompt_len: int, total_len: int) -> None:
    """Raise if an int position lies outside a sequence of `total_len` tokens."""
    if positions is None or isinstance(positions, slice):
        return
    ints = [positions] if isinstance(positions, int) else list(positions)
    for p in ints:
        if not isinstance(p, int):
            raise ValueError(f"positions must be ints, a slice or None; got {p!r}")
        absolute = p + prompt_len if p < 0 else p
        if not 0 <= absolute < total_len:
            raise ValueError(
                f"position {p} is outside the input: allowed are -{prompt_len}..{total_len - 1} "
                f"(prompt of {prompt_len} tokens, {total_len} in all)"
            )


def _check_like(site: str, what: str, t: Tensor, act: Tensor) -> None:
    """A per-token tensor (vector, mean) must match the site's per-token shape and device."""
    if tuple(t.shape) != tuple(act.shape[2:]):
        raise ValueError(
            f"site {site}: {what} has shape {list(t.shape)}, expected {list(act.shape[2:])} "
            f"(the per-token shape of activations {list(act.shape)})"
        )
    if t.device != act.device:
        raise ValueError(f"site {site}: {what} is on {t.device} but the activations are on {act.device}; move it with .to()")


@dataclass(frozen=True)
class Splice:
    """Replace the activation by `module(act).x_hat` (any dictionary, or a callable returning a tensor).

    With `error_term=True` the model sees `x_hat + (act - x_hat).detach()`: its output is
    unchanged while the latents are observed, and gradients still reach the module.
    """

    site: str
    module: Callable[[Tensor], Any]
    error_term: bool = False
    positions: Positions = None

    def apply(self, act: Tensor, mask: Tensor) -> tuple[Tensor, Any]:
        dtype = _dtype_of(self.module)
        out = self.module(act if dtype is None or dtype == act.dtype else act.to(dtype))  # a module of another dtype: cast
        x_hat = out if isinstance(out, Tensor) else getattr(out, "x_hat", None)
        if not isinstance(x_hat, Tensor):
            raise ValueError(
                f"site {self.site}: the spliced module returned {type(out).__name__}; "
                "allowed are a Tensor or an output with an `x_hat` tensor field"
            )
        if x_hat.shape != act.shape:
            raise ValueError(
                f"site {self.site}: replacement has shape {list(x_hat.shape)}, expected {list(act.shape)}"
            )
        if x_hat.device.type != "meta" and not bool(torch.isfinite(x_hat).all()):
            raise ValueError(f"site {self.site}: the spliced {type(self.module).__name__} returned NaN or inf "
                             f"({int((~torch.isfinite(x_hat)).sum())} values)")  # fmt: skip
        x_hat = x_hat.to(act.dtype)
        if self.error_term:
            # the value is exactly act (x_hat - x_hat.detach() is exactly 0, in any dtype); the gradient reaches x_hat
            x_hat = act.detach() + (x_hat - x_hat.detach()) if act.requires_grad or x_hat.requires_grad else act
        if not bool(mask.all()):
            x_hat = torch.where(mask.view(1, -1, *([1] * (act.dim() - 2))), x_hat, act)
        return x_hat, out


def _dtype_of(module: Any) -> torch.dtype | None:
    """The floating dtype of a module's parameters (None for a plain callable or a parameterless module)."""
    params = module.parameters() if hasattr(module, "parameters") else ()
    return next((p.dtype for p in params if p.is_floating_point()), None)


@dataclass(frozen=True)
class Steer:
    """Add `coef * vector` at the chosen positions; `vector` has the site's per-token shape."""

    site: str
    vector: Tensor
    coef: float = 1.0
    positions: Positions = None

    def __post_init__(self):
        if not isinstance(self.coef, (int, float)) or not math.isfinite(self.coef):
            raise ValueError(f"Steer at {self.site}: coef must be a finite number, got {self.coef!r}")
        if not isinstance(self.vector, Tensor) or not self.vector.is_floating_point():
            raise ValueError(f"Steer at {self.site}: vector must be a floating-point tensor, got {getattr(self.vector, 'dtype', type(self.vector).__name__)}")
        if self.vector.device.type != "meta" and not bool(torch.isfinite(self.vector).all()):
            raise ValueError(f"Steer at {self.site}: the steering vector contains NaN or inf")

    def apply(self, act: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        _check_like(self.site, "steering vector", self.vector, act)
        delta = self.coef * self.vector.to(act.dtype)
        return act + mask.to(act.dtype).view(1, -1, *([1] * (act.dim() - 2))) * delta, None


@dataclass(frozen=True)
class Ablate:
    """Set the chosen positions to zero, or to `mean` (default: the mean over this pass's batch and positions)."""

    site: str
    how: Literal["zero", "mean"] = "zero"
    positions: Positions = None
    mean: Tensor | None = None

    def __post_init__(self):
        if self.how not in ("zero", "mean"):
            raise ValueError(f"Ablate.how must be 'zero' or 'mean', got {self.how!r}")
        if self.mean is not None and self.how != "mean":
            raise ValueError("Ablate.mean is only used with how='mean'")

    def apply(self, act: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        if self.how == "zero":
            fill = torch.zeros_like(act[0, 0])
        elif self.mean is not None:
            _check_like(self.site, "ablation mean", self.mean, act)
            fill = self.mean.to(act.dtype)
        else:
            fill = act.mean(dim=(0, 1))
        m = mask.view(1, -1, *([1] * (act.dim() - 2)))
        return torch.where(m, fill.expand_as(act), act), None


@runtime_checkable
class Edit(Protocol):
    """What the site layer needs of an edit: where (`site`, `positions`) and what (`apply`). Splice, Steer, Ablate
    and the codebook edits (ForceCodes, PatchCodes, BlockCodes) all satisfy it; so can an edit of your own."""

    site: str
    positions: Positions

    def apply(self, act: Tensor, mask: Tensor) -> tuple[Tensor, Any]: ...
