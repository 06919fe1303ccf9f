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
k*N-th value; a token whose candidates all reach it is read again with every value above the bound.

Dimension key: N tokens, D input dim (d_in), F latents (d_sae), M candidate latents per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import int_arg, is_int, real_arg, sizes_arg
from .base import FiringTracker, UnitNormSAE, auxk_loss, check_input, fvu, gather_pre, sparse_decode
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
def batch_topk(pre_NF: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """(idx [N, M], keep [N, M] bool): candidate latents per token, and which of them hold the n_keep largest values
    of relu(pre) in the whole batch (exact up to ties; kept zeros, when fewer values are positive, are harmless). A
    column not kept may repeat a kept one's index (padding): scatter with a sum."""
    N, F_ = pre_NF.shape
    m = min(F_, 2 * math.ceil(n_keep / N))
    vals, idx = pre_NF.topk(m, dim=1, sorted=False)
    top = vals.flatten().topk(n_keep, sorted=False)
    bound = top.values.min()  # <= the true n_keep-th value
    last = vals.min(dim=1).values  # every value a token left out is <= its `last`
    short = ((last >= bound) & (last > 0)).nonzero().squeeze(1)  # tokens that may hold more of the top values
    chosen = top.indices  # exact unless some token may hold more of the top values than its m candidates
    if m < F_ and len(short):
        rows = pre_NF[short]
        wide = int((rows >= bound if bound > 0 else rows > 0).sum(1).max())  # all their values that may be kept
        more_vals, more_idx = rows.topk(wide, dim=1, sorted=False)
        vals = torch.cat([vals, vals.new_full((N, wide - m), float("-inf"))], 1)  # padding: never chosen
        idx = torch.cat([idx, idx.new_zeros(N, wide - m)], 1)
        vals[short], idx[short] = more_vals, more_idx
        chosen = vals.flatten().topk(n_keep, sorted=False).indices
    keep = torch.zeros(vals.numel(), dtype=torch.bool, device=pre_NF.device).index_fill_(0, chosen, True).view(N, -1)
    # drop the columns no token needs: each token's kept candidates first, M = the most any token keeps
    order = keep.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, : max(1, int(keep.sum(1).max()))]
    return idx.gather(1, order), keep.gather(1, order)


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
            idx, keep = batch_topk(pre, self.cfg.k * len(x_ND))
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
    should raise it."""

    def __init__(self, sae: BatchTopKSAE, aux_coef: float = 1 / 32, k_aux: int | None = None,
                 dead_tokens: int = 10_000_000, threshold_lr: float = 0.01):  # fmt: skip
        name = type(self).__name__
        if not isinstance(sae, BatchTopKSAE):
            raise ValueError(f"{name}: sae must be a BatchTopKSAE (or MatryoshkaSAE), got {type(sae).__name__}")
        self.sae = sae
        self.aux_coef = real_arg(name, "aux_coef", aux_coef)
        self.k_aux = max(1, sae.cfg.d_in // 2) if k_aux is None else int_arg(name, "k_aux", k_aux)
        self.threshold_lr = real_arg(name, "threshold_lr", threshold_lr, strict=True, maximum=1.0)
        self.firing = FiringTracker(sae.cfg.d_sae, int_arg(name, "dead_tokens", dead_tokens))

    def reconstruction(self, x: Tensor, acts: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(loss, x_hat, logs) of the reconstruction; MatryoshkaObjective scores every prefix."""
        x_hat = self.sae.decode_sparse(acts, idx)
        loss = fvu(x_hat, x)
        return loss, x_hat, {"fvu": loss.item()}

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        sae = self.sae
        x = check_input(type(self).__name__, x, sae.cfg.d_in, sae.W_enc.dtype)  # it skips forward: check here
        acts, idx, pre = sae.encode_batch(x)
        loss, x_hat, logs = self.reconstruction(x, acts, idx)
        logs["l0"] = (acts > 0).sum(1).float().mean().item()
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=idx.device)
        fired[idx[acts > 0]] = True
        dead = self.firing.update(fired, len(x))
        logs["dead_fraction"] = dead.float().mean().item()
        if self.aux_coef > 0 and bool(dead.any()):
            aux = auxk_loss(sae, x, x_hat, pre, dead, self.k_aux)
            loss = loss + self.aux_coef * aux
            logs["aux_loss"] = aux.item()
        sae.update_threshold_(acts, self.threshold_lr)
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
