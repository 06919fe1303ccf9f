"""EleutherAI sparsify's two SparseCoder variants that SAELens 6 has no architecture for, computed as sparsify does.

    pre     = relu((x - b_dec if apply_b_dec_to_input else x) W_enc + b_enc)          (FusedEncoder: relu first)
    nbfeatures.topk_transcoder  latents = pre on its k largest entries per row, 0 elsewhere
    nbfeatures.groupmax         latents = pre at the max of each of k contiguous groups of d_sae / k, 0 elsewhere
    x_hat   = latents W_dec + b_dec (+ x W_skip^T, on the raw input x, with skip_connection)

sparsify's transcoders (transcode=True) never subtract b_dec, a top-k SAE with a skip connection does; both are
`nbfeatures.topk_transcoder` here (a plain top-k SAE is SAELens's own `topk`). Both modules are inference only and
`save_sae` writes them with their `nbfeatures.*` architecture name, which SAELens 6 cannot load (it has no such
class); nbfeatures and `producers.read_foreign` on sparsify's own folder can.

Dimension key: N tokens, D input dim (d_in), O output dim (d_out), F latents (d_sae), K groups / active latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .base import DictionaryModule


@dataclass(frozen=True)
class SparsifyConfig:
    d_in: int  # input width
    d_sae: int  # number of latents
    k: int = 32  # active latents per token (topk) or number of groups (groupmax)
    d_out: int | None = None  # output width; None means d_in
    apply_b_dec_to_input: bool = True  # subtract b_dec before encoding (sparsify: unless transcoding)
    skip_connection: bool = False  # add x W_skip^T, W_skip [d_out, d_in]

    def __post_init__(self):
        for name in ("d_in", "d_sae", "k") + (("d_out",) if self.d_out is not None else ()):
            v = getattr(self, name)
            if type(v) is not int or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        if self.k > self.d_sae:
            raise ValueError(f"need k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        for name in ("apply_b_dec_to_input", "skip_connection"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ValueError(f"apply_b_dec_to_input needs d_out == d_in (b_dec is subtracted from x), "
                             f"got d_in={self.d_in}, d_out={self.d_out}")  # fmt: skip


class SparsifyOutput(NamedTuple):
    x_hat: Tensor  # [..., O]
    latents: Tensor  # [..., F], at most k nonzero per row
    pre_acts: Tensor  # [..., F] relu'd, before the selection (sparsify's EncoderOutput.pre_acts)


class SparsifySAE(DictionaryModule):
    """A sparsify SparseCoder with SAELens's parameter names: W_enc [D, F], b_enc [F], W_dec [F, O], b_dec [O],
    W_skip [O, D] (with skip_connection). Subclasses choose the active latents (`_select`)."""

    architecture: ClassVar[str]

    def __init__(self, cfg: SparsifyConfig, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        D, F, O = cfg.d_in, cfg.d_sae, cfg.d_out
        rand = (lambda *s: torch.randn(*s, generator=gen) / D**0.5) if seed is not None else torch.zeros
        self.W_enc = nn.Parameter(rand(D, F), requires_grad=False)
        self.b_enc = nn.Parameter(torch.zeros(F), requires_grad=False)
        self.W_dec = nn.Parameter(rand(F, O), requires_grad=False)
        self.b_dec = nn.Parameter(torch.zeros(O), requires_grad=False)
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(O, D), requires_grad=False)
        self.metadata: dict = {}

    @property
    def apply_b_dec_to_input(self) -> bool:
        return self.cfg.apply_b_dec_to_input

    def _select(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        """pre -> (values_NK, indices_NK) of the active latents."""
        raise NotImplementedError

    def _flat(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape[-1:] != (self.cfg.d_in,):
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: input must be a float Tensor [..., d_in={self.cfg.d_in}], got {got}")
        return x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)

    def _encode(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (pre_NF, latents_NF)."""
        sae_in = x_ND - self.b_dec if self.cfg.apply_b_dec_to_input else x_ND
        pre = torch.relu(sae_in @ self.W_enc + self.b_enc)
        vals, idx = self._select(pre)
        return pre, torch.zeros_like(pre).scatter_(-1, idx, vals)

    def _decode(self, latents_NF: Tensor, x_ND: Tensor | None) -> Tensor:
        y = latents_NF @ self.W_dec + self.b_dec
        if self.cfg.skip_connection and x_ND is not None:
            y = y + x_ND @ self.W_skip.T
        return y

    def encode(self, x: Tensor) -> Tensor:
        """x [..., D] -> latents [..., F]."""
        return self._encode(self._flat(x))[1].reshape(*x.shape[:-1], -1)

    def decode(self, latents: Tensor, x: Tensor | None = None) -> Tensor:
        """latents [..., F] -> x_hat [..., O]; pass the encoded input `x` to add the skip connection's x W_skip^T."""
        flat = latents.reshape(-1, self.cfg.d_sae).to(self.W_dec.dtype)
        y = self._decode(flat, None if x is None else self._flat(x)).reshape(*latents.shape[:-1], -1)
        return y if x is None else y.to(x.dtype)

    def forward(self, x: Tensor) -> SparsifyOutput:
        x_ND = self._flat(x)
        pre, latents = self._encode(x_ND)
        lead = x.shape[:-1]
        x_hat = self._decode(latents, x_ND)
        return SparsifyOutput(x_hat.reshape(*lead, -1).to(x.dtype), latents.reshape(*lead, -1), pre.reshape(*lead, -1))

    def default_objective(self):
        raise NotImplementedError(f"{type(self).__name__} ({self.architecture}) is inference only: train it with sparsify, "
                                  "or train a TopKSAE here")  # fmt: skip


class TopKTranscoder(SparsifySAE):
    """sparsify's top-k SparseCoder with transcode or skip_connection: the k largest relu'd pre-activations."""

    architecture = "nbfeatures.topk_transcoder"

    def _select(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        return pre_NF.topk(self.cfg.k, dim=-1, sorted=False)


class GroupMaxSAE(SparsifySAE):
    """sparsify's activation="groupmax": the largest relu'd pre-activation of each of k contiguous groups."""

    architecture = "nbfeatures.groupmax"

    def __init__(self, cfg: SparsifyConfig, seed: int | None = 0):
        if cfg.d_sae % cfg.k:
            raise ValueError(f"groupmax needs k to divide d_sae, got k={cfg.k}, d_sae={cfg.d_sae}")
        super().__init__(cfg, seed)

    def _select(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        vals, idx = pre_NF.unflatten(-1, (self.cfg.k, -1)).max(dim=-1)
        group = self.cfg.d_sae // self.cfg.k  # max gives the index inside each group; add the group's offset
        return vals, idx + torch.arange(0, self.cfg.d_sae, group, device=idx.device)


# cfg.json architecture -> (module, config), read by saelens_format.from_saelens / to_saelens like ARCHITECTURES
SPARSIFY_ARCHITECTURES: dict[str, tuple[type[SparsifySAE], type]] = {
    cls.architecture: (cls, SparsifyConfig) for cls in (TopKTranscoder, GroupMaxSAE)
}
