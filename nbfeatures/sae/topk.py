"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    pre = W_enc^T (x - b_dec) + b_enc          latents = relu(topk_k(pre))          x_hat = W_dec^T latents + b_dec
    loss = FVU(x_hat, x) + 1/32 * FVU(e_hat, x - x_hat)      (AuxK: e_hat decodes the top k_aux dead latents)

Training keeps decoder rows unit-norm (renormalised after each step, the gradient's component
along each row removed before it). The encoder's dense matmul is the only O(N F D) work: the
chosen values get a sparse backward and are decoded as an embedding bag. TopKObjective never holds
the [N, F] pre-activations: it computes them in [rows, block_size] tiles with a running top-k, which
also keeps each token's best AuxK candidates (latents about to die), so one pass serves both; memory
is one tile (2^24 values) + O(N k), not O(N F). `encode_topk(x, block_size=...)` is that encoder
alone; `forward` keeps the dense path, so TopKOutput.pre_acts is always the [..., F] tensor.

Dimension key: N tokens, D input dim (d_in), F latents (d_sae), K active latents.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import bool_arg, int_arg, real_arg, sizes_arg
from .io import register_architecture
from .base import (FiringTracker, UnitNormSAE, check_input, chosen_pre, dense_from_sparse, fvu, gather_pre,
                   span_decode, sparse_decode)
from .blocked import BLOCK_SIZE, auxk_choice, blocked_topk




@dataclass(frozen=True)
class TopKConfig:
    d_in: int  # width of the activations
    d_sae: int  # number of latents
    k: int = 32  # active latents per token

    def __post_init__(self):
        sizes_arg("TopKConfig", d_in=self.d_in, d_sae=self.d_sae)
        object.__setattr__(self, "d_in", int(self.d_in))
        object.__setattr__(self, "d_sae", int(self.d_sae))
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or not 0 < self.k <= self.d_sae:
            raise ValueError(f"TopKConfig: need 0 < k <= d_sae, got k={self.k!r}, d_sae={self.d_sae} (k an int)")
        object.__setattr__(self, "k", int(self.k))

    @property
    def default_lr(self) -> float:
        """Adam learning rate scaled as 1/sqrt(d_sae / 2^14) (Gao et al.; sparsify's 2e-4 base)."""
        return 2e-4 / math.sqrt(self.d_sae / 2**14)


class TopKOutput(NamedTuple):
    x_hat: Tensor  # [..., D]
    acts: Tensor  # [..., K] values of the active latents (>= 0)
    indices: Tensor  # [..., K] which latents
    pre_acts: Tensor  # [..., F] before top-k, no gradient (the training objective does not need it: see TopKObjective)

    @property
    def latents(self) -> Tensor:
        """Dense [..., F] latents, at most K nonzero per token."""
        F_ = self.pre_acts.shape[-1]
        flat = dense_from_sparse(self.acts.reshape(-1, self.acts.shape[-1]), self.indices.reshape(-1, self.indices.shape[-1]), F_)
        return flat.reshape(*self.acts.shape[:-1], F_)


class TopKSAE(UnitNormSAE):
    """TopK SAE with SAELens-layout parameters: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]."""

    architecture = "topk"

    config_class = TopKConfig
    cfg: TopKConfig

    def encode_topk(self, x: Tensor, k: int | None = None, block_size: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [N, D] -> (acts [N, k], indices [N, k], pre_acts [N, F]); values sorted descending. With block_size, the
        pre-activations are computed that many latents at a time and never held whole: pre_acts is then None."""
        k = self.cfg.k if k is None else int_arg("TopKSAE.encode_topk", "k", k, maximum=self.cfg.d_sae)
        if block_size is not None:
            block_size = int_arg("TopKSAE.encode_topk", "block_size", block_size)
            vals, idx, _, _ = blocked_topk((x - self.b_dec).detach(), self.W_enc.detach(), self.b_enc.detach(), k, block_size)
            return torch.relu(chosen_pre(x, self.b_dec, self.W_enc, self.b_enc, idx, vals)), idx, None
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
            idx = pre.topk(k, dim=1, sorted=True).indices
        if torch.is_grad_enabled():
            vals = gather_pre(x - self.b_dec, self.W_enc, self.b_enc, idx, pre)
        else:
            vals = pre.gather(1, idx)
        return torch.relu(vals), idx, pre

    def decode_sparse(self, acts: Tensor, indices: Tensor) -> Tensor:
        return sparse_decode(acts, indices, self.W_dec) + self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., F]."""
        return self(x).latents

    def forward(self, x: Tensor) -> TopKOutput:
        lead = x.shape[:-1]
        flat = check_input(type(self).__name__, x, self.cfg.d_in, self.W_enc.dtype)
        acts, idx, pre = self.encode_topk(flat)
        x_hat = self.decode_sparse(acts, idx).to(x.dtype)
        return TopKOutput(x_hat.reshape(*lead, -1), acts.reshape(*lead, -1), idx.reshape(*lead, -1), pre.reshape(*lead, -1))

    def default_objective(self) -> TopKObjective:
        return TopKObjective(self)


class TopKObjective:
    """FVU + aux_coef * AuxK, optionally + FVU at 4k / 8 (Multi-TopK); tracks dead latents.

    A latent is dead once it has not fired for `dead_tokens` tokens. AuxK reconstructs the
    detached residual x - x_hat from the top `k_aux` dead latents (no b_dec: the residual has
    none), with the same FVU reduction as the main loss, so the two terms are on one scale.

    block_size: latents per tile of the encoder (see blocked.blocked_topk: a tile holds 2^24 pre-activations, 64 MiB
    in float32, never the [N, F] matrix; the running top-k also keeps each token's top 2 k_aux among the latents
    that die unless they fire in this batch, so AuxK needs no second pass over W_enc), or None for the dense path
    that holds [N, F] (the reference). A compute setting, not a hyperparameter: the results agree to float
    rounding, so it is not in config_dict.
    """

    def __init__(self, sae: TopKSAE, aux_coef: float = 1 / 32, k_aux: int | None = None,
                 dead_tokens: int = 10_000_000, multi_topk: bool = False, block_size: int | None = BLOCK_SIZE):
        if not hasattr(sae, "encode_topk") or not isinstance(getattr(sae, "cfg", None), TopKConfig):
            raise ValueError(f"TopKObjective: sae must be a TopKSAE (with encode_topk and a TopKConfig), got {type(sae).__name__}")
        aux_coef = real_arg("TopKObjective", "aux_coef", aux_coef)
        dead_tokens = int_arg("TopKObjective", "dead_tokens", dead_tokens)
        if bool_arg("TopKObjective", "multi_topk", multi_topk) and 4 * sae.cfg.k > sae.cfg.d_sae:
            raise ValueError(f"TopKObjective: multi_topk needs 4 * k <= d_sae, got k={sae.cfg.k}, d_sae={sae.cfg.d_sae}")
        self.sae, self.aux_coef, self.multi_topk = sae, aux_coef, multi_topk
        self.k_aux = max(1, sae.cfg.d_in // 2) if k_aux is None else int_arg("TopKObjective", "k_aux", k_aux)
        self.block_size = None if block_size is None else int_arg("TopKObjective", "block_size", block_size)
        self.firing = FiringTracker(sae.cfg.d_sae, dead_tokens)

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        sae, k = self.sae, self.sae.cfg.k
        x = check_input(type(self).__name__, x, sae.cfg.d_in, sae.W_enc.dtype)  # it skips forward: check here
        k_all = 4 * k if self.multi_topk else k
        W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
        with torch.no_grad():  # choose the latents; their values get gradients below, in one sparse call
            xc = x - sae.b_dec
            pre = cand_vals = cand_idx = None
            if self.block_size is None:
                pre = torch.addmm(b_enc, xc, W_enc)
                vals, idx = pre.topk(k_all, dim=1)
            else:
                dying = self.firing.dying(len(x)) if self.aux_coef > 0 else None
                vals, idx, cand_vals, cand_idx = blocked_topk(xc, W_enc, b_enc, k_all, self.block_size, dying, 2 * self.k_aux)
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=idx.device)
            fired[idx[:, :k][vals[:, :k] > 0]] = True
        dead = self.firing.update(fired, x.shape[0])
        n_aux = min(self.k_aux, int(dead.sum())) if self.aux_coef > 0 else 0
        if n_aux:
            aux_vals, aux_idx = auxk_choice(dead, n_aux, pre, xc, W_enc, b_enc, cand_vals, cand_idx, self.block_size)
            vals, idx = torch.cat([vals, aux_vals], 1), torch.cat([idx, aux_idx], 1)
        acts_all = torch.relu(chosen_pre(x, sae.b_dec, sae.W_enc, sae.b_enc, idx, vals))
        spans = [(0, k)] + [(0, k_all)] * self.multi_topk + [(k_all, k_all + n_aux)] * (n_aux > 0)
        decoded = span_decode(acts_all, idx, sae.W_dec, spans)  # x_hat, the 4k x_hat, AuxK's e_hat: one backward
        x_hat = decoded[0] + sae.b_dec
        acts = acts_all[:, :k]
        main = fvu(x_hat, x)
        loss = main
        logs = {"fvu": main.item(), "l0": (acts > 0).sum(1).float().mean().item()}
        if self.multi_topk:
            multi = fvu(decoded[1] + sae.b_dec, x)
            loss = loss + multi / 8
            logs["fvu_4k"] = multi.item()
        logs["dead_fraction"] = dead.float().mean().item()
        if n_aux:
            e = (x - x_hat).detach()
            aux = fvu(decoded[-1], e)
            loss = loss + self.aux_coef * aux
            logs["aux_loss"] = aux.item()
        logs["loss"] = loss.item()
        return loss, logs

    def config_dict(self) -> dict:
        return {"aux_coef": self.aux_coef, "k_aux": self.k_aux, "dead_tokens": self.firing.dead_tokens, "multi_topk": self.multi_topk}

    def state_dict(self) -> dict[str, Tensor]:
        return self.firing.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.firing.load_state_dict(state)


register_architecture("topk", TopKSAE, TopKConfig)
