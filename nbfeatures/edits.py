"""Edits to an activation at a site: splice a dictionary, transcode, steer by a vector, ablate.

Each edit is a small frozen dataclass with a pure-torch `apply(act, mask)`; the site layer
(`sites.py`) decides *where* and *when* it runs (which site, which forward pass of a
generation, which positions), so the arithmetic here can be tested without a model.

    Splice:     act -> f(act).x_hat                  (error_term: the value stays act, the gradient goes to x_hat)
    Transcode:  act -> f(x_in).x_hat                 x_in read at an earlier site of the same forward pass
    Steer:   act[:, p] -> act[:, p] + coef * v        for p in positions
    Ablate:  act[:, p] -> 0  or  mean                 for p in positions

A dictionary from elsewhere (a SAELens `SAE`, an eai-sparsify `SparseCoder`, any module with
`encode`/`decode`) goes through `as_dictionary`, which makes it one of ours: `forward(x)` returns
`DictionaryOutput(x_hat, latents)` with dense latents; `decoder_rows` takes its `W_dec` in either
orientation.

Dimension key: B batch, T position, D width at the site (a site's per-token shape may have
more than one dim, e.g. [H, E] for per-head outputs), N tokens, F latents, K active latents.

Positions are absolute indices into the (padded) token sequence. Negative ints count back
from the end of the prompt, so -1 is the last prompt token. A slice with no stop runs on
through every generated token: `slice(-1, None)` steers the last prompt token and every
token generated after it; `positions=None` means every position, prompt and generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor, nn

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

    With `error_term=True` the model sees `act.detach() + (x_hat - x_hat.detach())`: exactly the
    clean value in any dtype, so its output is unchanged while the latents are observed, and
    gradients still reach the module. A foreign
    dictionary (SAELens, sparsify, anything with encode/decode) is adapted by `as_dictionary`.
    """

    site: str
    module: Callable[[Tensor], Any]
    error_term: bool = False
    positions: Positions = None
    _dictionary: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_dictionary", as_dictionary(self.module))

    def apply(self, act: Tensor, mask: Tensor) -> tuple[Tensor, Any]:
        return _replace(f"site {self.site}", self._dictionary, act, act, mask, self.error_term)


@dataclass(frozen=True)
class Transcode:
    """Read `in_site`, replace `out_site` by `transcoder(x_in).x_hat` in the same forward pass.

    E.g. in_site="blocks.1.ln2.hook_normalized", out_site="blocks.1.hook_mlp_out": the transcoder
    stands in for the MLP. `error_term=True` keeps the model's output exactly (the value is the clean
    activation, the gradient goes through x_hat). The site layer passes the in-site's value as
    `apply(act, mask, source=x_in)`; the in-site must run before the out-site.
    """

    in_site: str
    out_site: str
    transcoder: Callable[[Tensor], Any]
    error_term: bool = False
    positions: Positions = None
    _dictionary: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.in_site, str) or not isinstance(self.out_site, str):
            raise ValueError(f"Transcode needs two site names (in_site, out_site); got {self.in_site!r}, {self.out_site!r}")
        object.__setattr__(self, "_dictionary", as_dictionary(self.transcoder))

    @property
    def site(self) -> str:
        """The site it edits (what the Edit protocol calls `site`): the out-site."""
        return self.out_site

    def apply(self, act: Tensor, mask: Tensor, source: Tensor | None = None) -> tuple[Tensor, Any]:
        where = f"Transcode {self.in_site} -> {self.out_site}"
        if source is None:
            raise ValueError(f"{where}: needs the value of {self.in_site} (source=); run it through sites.run / generate")
        d_in = _d_in(self._dictionary)
        if d_in is not None and source.shape[-1] != d_in:
            raise ValueError(f"{where}: the transcoder reads width {d_in} but {self.in_site} has width {source.shape[-1]} "
                             f"(shape {list(source.shape)}); the in-site must match the transcoder's d_in")
        return _replace(where, self._dictionary, source, act, mask, self.error_term)


def _replace(where: str, module: Any, x: Tensor, act: Tensor, mask: Tensor, error_term: bool) -> tuple[Tensor, Any]:
    """`module(x).x_hat` in place of `act` at the masked positions (Splice: x is act; Transcode: x is the in-site)."""
    dtype = _dtype_of(module)
    out = module(x if dtype is None or dtype == x.dtype else x.to(dtype))  # a module of another dtype: cast
    x_hat = out if isinstance(out, Tensor) else getattr(out, "x_hat", None)
    if not isinstance(x_hat, Tensor):
        raise ValueError(
            f"{where}: the spliced module returned {type(out).__name__}; "
            "allowed are a Tensor or an output with an `x_hat` tensor field"
        )
    if x_hat.shape != act.shape:
        raise ValueError(f"{where}: replacement has shape {list(x_hat.shape)}, expected {list(act.shape)}")
    if x_hat.device.type != "meta" and not bool(torch.isfinite(x_hat).all()):
        raise ValueError(f"{where}: the spliced {type(module.foreign if isinstance(module, EncodeDecode) else module).__name__} returned NaN or inf "
                         f"({int((~torch.isfinite(x_hat)).sum())} values)")  # fmt: skip
    x_hat = x_hat.to(act.dtype)
    if error_term:
        # the value is exactly act (x_hat - x_hat.detach() is exactly 0, in any dtype); the gradient reaches x_hat
        x_hat = act.detach() + (x_hat - x_hat.detach()) if act.requires_grad or x_hat.requires_grad else act
    if not bool(mask.all()):
        x_hat = torch.where(mask.view(1, -1, *([1] * (act.dim() - 2))), x_hat, act)
    return x_hat, out


def _dtype_of(module: Any) -> torch.dtype | None:
    """The floating dtype of a module's parameters (None for a plain callable or a parameterless module)."""
    params = module.parameters() if hasattr(module, "parameters") else ()
    return next((p.dtype for p in params if p.is_floating_point()), None)


# ----------------------------------------------------------------------------- dictionaries from elsewhere


class DictionaryOutput(NamedTuple):
    x_hat: Tensor  # [..., D] (a transcoder: the out-site's width)
    latents: Tensor  # [..., F] dense, 0 where a latent is off


class EncodeDecode(nn.Module):
    """A dictionary known only by `encode` / `decode` (SAELens `SAE`, sparsify `SparseCoder`, ...) as one of ours.

        latents = encode(x)                        x_hat = decode(latents)                     (dense codes: SAELens)
        (acts, ids) = encode(x)[:2] top-k          x_hat = decode(acts, ids), latents scattered (sparsify's EncoderOutput)
        x_hat += x @ W_skip^T                      when the object has a W_skip (skip transcoders), which decode leaves out
    """

    def __init__(self, foreign: Any):
        super().__init__()
        self.foreign = foreign  # registered as a submodule when it is one: .to(), .parameters() and dtype follow it

    def forward(self, x: Tensor) -> DictionaryOutput:
        code = self.foreign.encode(x)
        if isinstance(code, Tensor):
            latents, x_hat = code, self.foreign.decode(code)
        elif hasattr(code, "top_acts") and hasattr(code, "top_indices"):
            acts_NK, ids_NK = code.top_acts.reshape(-1, code.top_acts.shape[-1]), code.top_indices.reshape(-1, code.top_indices.shape[-1])
            x_hat = self.foreign.decode(acts_NK, ids_NK)  # embedding-bag decoders take [N, K]
            F = _n_latents(self.foreign) or int(ids_NK.max()) + 1
            latents = torch.zeros(len(acts_NK), F, dtype=acts_NK.dtype, device=acts_NK.device).scatter(1, ids_NK, acts_NK)
            latents = latents.reshape(*x.shape[:-1], F)
        else:
            raise ValueError(f"{type(self.foreign).__name__}.encode returned {type(code).__name__}; allowed are dense latents "
                             "(a Tensor [..., F]) or top-k codes with .top_acts and .top_indices")  # fmt: skip
        skip = getattr(self.foreign, "W_skip", None)
        if isinstance(skip, Tensor):
            x_hat = x_hat + (x.to(skip.dtype) @ skip.mT).reshape(x_hat.shape)
        return DictionaryOutput(x_hat.reshape(*x.shape[:-1], -1), latents)

    @property
    def W_dec(self) -> Tensor | None:
        return getattr(self.foreign, "W_dec", None)


def as_dictionary(obj: Any) -> Any:
    """`obj` as a dictionary whose forward returns a NamedTuple starting with `x_hat` (with `.latents` where it has latents).

    Our own dictionaries (they have `default_objective`) and plain callables without encode/decode come back
    unchanged; anything else with `encode` and `decode` (a SAELens `SAE`, a sparsify `SparseCoder`) is wrapped
    in `EncodeDecode`.
    """
    if isinstance(obj, EncodeDecode) or hasattr(obj, "default_objective"):
        return obj
    if callable(getattr(obj, "encode", None)) and callable(getattr(obj, "decode", None)):
        return EncodeDecode(obj)
    if not callable(obj):
        raise ValueError(f"a dictionary must be callable (a module) or have encode/decode; got {type(obj).__name__}")
    return obj


def decoder_rows(dictionary: Any, d: int | None = None, n_latents: int | None = None) -> Tensor:
    """Decoder directions [F, D] of a dictionary (its `W_dec`) or of a `W_dec` tensor, in whichever orientation it is stored.

    `W_dec` may be [F, D] (SAELens, sparsify, ours) or [D, F] (a Linear decoder's weight); the orientation is
    the one whose D (and F, when given) matches: `d` defaults to the dictionary's d_out / d_in. A square
    matrix that fits both ways is taken as [F, D].
    """
    W = dictionary if isinstance(dictionary, Tensor) else getattr(dictionary, "W_dec", None)
    if W is None and isinstance(getattr(dictionary, "decoder", None), nn.Linear):
        W = dictionary.decoder.weight  # dictionary_learning: a Linear decoder [D, F]
    if not isinstance(W, Tensor):
        raise ValueError(f"{type(dictionary).__name__} has no decoder matrix: pass a W_dec tensor or an object with .W_dec")
    if W.dim() != 2:
        raise ValueError(f"W_dec must be a matrix [F, D] or [D, F]; got shape {list(W.shape)}")
    if not isinstance(dictionary, Tensor):
        d = d if d is not None else _d_out(dictionary)
        n_latents = n_latents if n_latents is not None else _n_latents(dictionary)
    W = W.detach()
    fits = lambda F_, D_: (d is None or D_ == d) and (n_latents is None or F_ == n_latents)  # noqa: E731
    if fits(*W.shape):
        return W
    if fits(*reversed(W.shape)):
        return W.T
    want = f"D={d}" + (f" and F={n_latents}" if n_latents is not None else "")
    raise ValueError(f"W_dec has shape {list(W.shape)}: neither [F, D] nor [D, F] with {want}")


def _cfg_int(obj: Any, *names: str) -> int | None:
    """The first of these sizes found on obj or obj.cfg (as SAELens, sparsify and ours name them)."""
    obj = obj.foreign if isinstance(obj, EncodeDecode) else obj
    for holder in (obj, getattr(obj, "cfg", None)):
        for name in names:
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _d_in(obj: Any) -> int | None:
    return _cfg_int(obj, "d_in")


def _d_out(obj: Any) -> int | None:
    return _cfg_int(obj, "d_out", "d_in")


def _n_latents(obj: Any) -> int | None:
    return _cfg_int(obj, "d_sae", "num_latents", "n_latents")


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
    """What the site layer needs of an edit: where (`site`, `positions`) and what (`apply`). Splice, Transcode, Steer,
    Ablate and the codebook edits (ForceCodes, PatchCodes, BlockCodes) all satisfy it; so can an edit of your own.
    An edit that also reads an earlier site names it `in_site` and gets its value as `apply(act, mask, source=x_in)`."""

    site: str
    positions: Positions

    def apply(self, act: Tensor, mask: Tensor) -> tuple[Tensor, Any]: ...
