"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

    pre = W_enc^T (x - b_dec) + b_enc
    training:  latents = the k*N largest values of relu(pre) over the whole batch of N tokens, the rest 0
    inference: latents = relu(pre) * 1[pre > threshold]         a JumpReLU with one threshold for every latent
    x_hat = W_dec^T latents + b_dec           loss = FVU(x_hat, x) + 1/32 * AuxK            (both as for TopK)

The threshold is a running estimate of the smallest activation kept in a batch, threshold <- (1 - lr) threshold +
lr * min kept with lr = 0.01: SAELens's `BatchTopKTrainingSAE.update_topk_threshold` (`topk_threshold_lr`), which
starts from 0; here it starts at the first batch's value (0 means "not estimated yet"), as dictionary_learning's
`update_threshold` does (an EMA with beta = 0.999 there). The module follows nn.Module's mode: in training mode
(train() sets it while it trains) a token's latents depend on the batch; in eval mode (where train() and load_sae
leave it) each token is thresholded alone. save_sae writes what SAELens's `save_inference_model` writes: a
`jumprelu` folder with threshold = ones(d_sae) * threshold, metadata.training_architecture = "batchtopk".

The batch top-k is exact without sorting all N*F values: each token's top 2k candidates give a lower bound on the
k*N-th value; a token whose candidates all reach it is read again with every value above the bound
(blocked.batch_select). Training finds the candidates tile by tile, never holding the [N, F] pre-activations.

Dimension key: N tokens, D input dim (d_in), F latents (d_sae), M candidate latents per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import int_arg, is_int, real_arg, sizes_arg
from .base import FiringTracker, UnitNormSAE, check_input, chosen_pre, fvu, gather_pre, span_decode, sparse_decode
from .blocked import BLOCK_SIZE, auxk_choice, batch_select, blocked_batch_topk, top_at_least
from .io import register_architecture
from .jumprelu import JumpReLUOutput, jumprelu


@dataclass(frozen=True)
class BatchTopKConfig:
    d_in: int  # width of the activations
    d_sae: int  # number of latents
    k: int = 32  # active latents per token, on average over a batch

    def __post_init__(self):
        check_k(type(self).__name__, self)

    @property
    def default_lr(self) -> float:
        """Adam learning rate scaled as 1/sqrt(d_sae / 2^14), as for TopK (dictionary_learning's BatchTopK trainer)."""
        return 2e-4 / math.sqrt(self.d_sae / 2**14)


def check_k(owner: str, cfg: Any) -> None:
    """d_in, d_sae > 0 and 0 < k <= d_sae, all ints (stored as such)."""
    sizes_arg(owner, d_in=cfg.d_in, d_sae=cfg.d_sae)
    object.__setattr__(cfg, "d_in", int(cfg.d_in))
    object.__setattr__(cfg, "d_sae", int(cfg.d_sae))
    if not is_int(cfg.k) or not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(f"{owner}: need 0 < k <= d_sae, got k={cfg.k!r}, d_sae={cfg.d_sae} (k an int)")
    object.__setattr__(cfg, "k", int(cfg.k))


@torch.no_grad()
def batch_topk(pre_NF: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """(vals, idx, keep) [N, M]: the n_keep largest values of relu(pre) in the whole batch, from the dense [N, F] pre
    (blocked.batch_select: each token's top 2 n_keep / N candidates, widened where a token may hold more)."""
    N, F_ = pre_NF.shape
    vals, idx = pre_NF.topk(min(F_, 2 * math.ceil(n_keep / N)), dim=1, sorted=False)
    return batch_select(vals, idx, F_, n_keep, lambda rows, bound: top_at_least(pre_NF[rows], bound))


class BatchTopKSAE(UnitNormSAE):
    """BatchTopK SAE, SAELens's jumprelu tensors: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F]
    (a buffer, every entry the same estimate)."""

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"  # saved as this, with the config in metadata.training_architecture_details

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))  # 0: not estimated yet (eval mode is then a ReLU SAE)

    def encode_batch(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, D] -> (acts [N, M], idx [N, M], pre [N, F]): the batch's top k*N values (0 at candidates not kept)."""
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_ND - self.b_dec, self.W_enc)
            _, idx, keep = batch_topk(pre, self.cfg.k * len(x_ND))
        if torch.is_grad_enabled():
            vals = gather_pre(x_ND - self.b_dec, self.W_enc, self.b_enc, idx, pre)
        else:
            vals = pre.gather(1, idx)
        return torch.relu(vals) * keep, idx, pre

    def decode_sparse(self, acts: Tensor, indices: Tensor) -> Tensor:
        return sparse_decode(acts, indices, self.W_dec) + self.b_dec

    @torch.no_grad()
    def update_threshold_(self, acts: Tensor, lr: float) -> None:
        """threshold <- (1 - lr) threshold + lr * (smallest positive kept activation); the first estimate is taken whole."""
        kept = acts[acts > 0]
        if kept.numel():
            low, old = kept.min().double(), self.threshold[0].double()  # double: an EMA of small steps
            self.threshold.fill_(low if old == 0 else (1 - lr) * old + lr * low)

    def forward(self, x: Tensor) -> JumpReLUOutput:
        lead = x.shape[:-1]
        flat = check_input(type(self).__name__, x, self.cfg.d_in, self.W_enc.dtype)
        if self.training:
            acts, idx, pre = self.encode_batch(flat)
            # scatter_add: a padding column may repeat a kept latent's index (with value 0)
            latents = torch.zeros(len(flat), self.cfg.d_sae, dtype=acts.dtype, device=acts.device).scatter_add(1, idx, acts)
            x_hat = self.decode_sparse(acts, idx)
        else:
            pre = torch.addmm(self.b_enc, flat - self.b_dec, self.W_enc)
            latents = jumprelu(pre, self.threshold)
            x_hat = self.decode(latents)
        return JumpReLUOutput(x_hat.to(x.dtype).reshape(*lead, -1), latents.reshape(*lead, -1), pre.reshape(*lead, -1))

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., F] (training mode: the batch's top k*N; eval mode: thresholded)."""
        return self(x).latents

    def default_objective(self) -> BatchTopKObjective:
        return BatchTopKObjective(self)


class BatchTopKObjective:
    """FVU + aux_coef * AuxK (as TopKObjective), and the threshold's running estimate (lr `threshold_lr`).

    SAELens's 0.01 needs about 1000 steps to settle while the encoder still moves: after a 300-step run the
    threshold lagged (inference L0 about 11 at k = 16 in notebook 08, 15.5 with threshold_lr=0.05). Short runs
    should raise it.

    block_size: latents per encoder tile (blocked.blocked_batch_topk: never the [N, F] matrix; the same pass finds
    AuxK's candidates), or None for the dense path (the reference). A compute setting, as for TopKObjective: the
    results agree to float rounding, so it is not in config_dict."""

    def __init__(self, sae: BatchTopKSAE, aux_coef: float = 1 / 32, k_aux: int | None = None,
                 dead_tokens: int = 10_000_000, threshold_lr: float = 0.01, block_size: int | None = BLOCK_SIZE):  # fmt: skip
        name = type(self).__name__
        if not isinstance(sae, BatchTopKSAE):
            raise ValueError(f"{name}: sae must be a BatchTopKSAE (or MatryoshkaSAE), got {type(sae).__name__}")
        self.sae = sae
        self.aux_coef = real_arg(name, "aux_coef", aux_coef)
        self.k_aux = max(1, sae.cfg.d_in // 2) if k_aux is None else int_arg(name, "k_aux", k_aux)
        self.threshold_lr = real_arg(name, "threshold_lr", threshold_lr, strict=True, maximum=1.0)
        self.block_size = None if block_size is None else int_arg(name, "block_size", block_size)
        self.firing = FiringTracker(sae.cfg.d_sae, int_arg(name, "dead_tokens", dead_tokens))

    def reconstruction(self, x: Tensor, acts: Tensor, idx: Tensor, n_main: int) -> tuple[Tensor, Tensor, Tensor | None, dict[str, float]]:
        """(loss, x_hat, e_hat, logs): columns [:n_main] decode x_hat, the rest (AuxK's dead latents, if any) e_hat;
        MatryoshkaObjective scores every prefix."""
        spans = [(0, n_main)] + [(n_main, acts.shape[1])] * (acts.shape[1] > n_main)
        decoded = span_decode(acts, idx, self.sae.W_dec, spans)  # x_hat and e_hat with one sparse backward
        x_hat = decoded[0] + self.sae.b_dec
        loss = fvu(x_hat, x)
        return loss, x_hat, decoded[1] if len(decoded) > 1 else None, {"fvu": loss.item()}

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        sae = self.sae
        x = check_input(type(self).__name__, x, sae.cfg.d_in, sae.W_enc.dtype)  # it skips forward: check here
        W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
        with torch.no_grad():  # choose the entries; their values get gradients below, in one sparse call
            xc = x - sae.b_dec
            pre = cand_vals = cand_idx = None
            if self.block_size is None:
                pre = torch.addmm(b_enc, xc, W_enc)
                vals, idx, keep = batch_topk(pre, sae.cfg.k * len(x))
            else:
                dying = self.firing.dying(len(x)) if self.aux_coef > 0 else None
                vals, idx, keep, cand_vals, cand_idx = blocked_batch_topk(xc, W_enc, b_enc, sae.cfg.k, self.block_size, dying,
                                                                          2 * self.k_aux)  # fmt: skip
            on = keep & (vals > 0)
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=idx.device)
            fired[idx[on]] = True
        dead = self.firing.update(fired, len(x))
        n_main, n_aux = idx.shape[1], min(self.k_aux, int(dead.sum())) if self.aux_coef > 0 else 0
        if n_aux:
            aux_vals, aux_idx = auxk_choice(dead, n_aux, pre, xc, W_enc, b_enc, cand_vals, cand_idx, self.block_size)
            vals, idx = torch.cat([vals, aux_vals], 1), torch.cat([idx, aux_idx], 1)
            keep = torch.cat([keep, keep.new_ones(len(x), n_aux)], 1)
        acts = torch.relu(chosen_pre(x, sae.b_dec, sae.W_enc, sae.b_enc, idx, vals)) * keep
        loss, x_hat, e_hat, logs = self.reconstruction(x, acts, idx, n_main)
        logs["l0"] = on.sum(1).float().mean().item()
        logs["dead_fraction"] = dead.float().mean().item()
        if e_hat is not None:
            aux = fvu(e_hat, (x - x_hat).detach())  # AuxK (Gao et al.): the detached residual from the dead latents
            loss = loss + self.aux_coef * aux
            logs["aux_loss"] = aux.item()
        sae.update_threshold_(acts[:, :n_main], self.threshold_lr)
        logs["threshold"] = sae.threshold[0].item()
        logs["loss"] = loss.item()
        return loss, logs

    def config_dict(self) -> dict[str, Any]:
        return {"aux_coef": self.aux_coef, "k_aux": self.k_aux, "dead_tokens": self.firing.dead_tokens,
                "threshold_lr": self.threshold_lr}  # fmt: skip

    def state_dict(self) -> dict[str, Tensor]:
        return self.firing.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.firing.load_state_dict(state)


register_architecture("batchtopk", BatchTopKSAE, BatchTopKConfig)
