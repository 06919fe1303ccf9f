"""Matryoshka BatchTopK sparse autoencoder (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders").

    latents = BatchTopK over all F latents, as batchtopk.py (a JumpReLU with the running threshold at inference)
    x_hat_w = W_dec[:w]^T latents[:w] + b_dec                  for each prefix width w in matryoshka_widths (last = F)
    loss = mean over prefixes of FVU(x_hat_w, x) + 1/32 * AuxK on the full residual x - x_hat_F

Every prefix of the dictionary must reconstruct the input on its own, so the first latents learn the general,
frequent features and later ones refine them instead of absorbing them. The prefix losses are averaged (equal
weights, dictionary_learning's `MatryoshkaBatchTopKTrainer` default of group_weights = 1/G, which it then averages
once more; SAELens sums them), so the loss stays on one FVU's scale and the TopK learning rate and AuxK weight carry
over. AuxK uses the full residual, as both do by default.

Dimension key: N tokens, D input dim (d_in), F latents (d_sae), M candidate latents per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .._checks import is_int
from .base import fvu, span_decode
from .batchtopk import BatchTopKConfig, BatchTopKObjective, BatchTopKSAE, check_k
from .blocked import BLOCK_SIZE
from .io import register_architecture


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    # prefix widths, strictly increasing, the last = d_sae (SAELens's name; dictionary_learning's group_sizes are
    # their differences); None: (d_sae/8, d_sae/4, d_sae/2, d_sae)
    matryoshka_widths: Sequence[int] | None = None

    def __post_init__(self):
        check_k(type(self).__name__, self)
        widths = self.matryoshka_widths
        if widths is None:
            widths = sorted({max(1, self.d_sae // 8), max(1, self.d_sae // 4), max(1, self.d_sae // 2), self.d_sae})
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths or not all(is_int(w) for w in widths):
            raise ValueError(f"MatryoshkaConfig: matryoshka_widths must be a non-empty list of ints, got {widths!r}")
        widths = tuple(int(w) for w in widths)
        if widths[0] <= 0 or any(a >= b for a, b in zip(widths, widths[1:])) or widths[-1] != self.d_sae:
            raise ValueError(f"MatryoshkaConfig: matryoshka_widths must increase strictly from > 0 to d_sae={self.d_sae}, "
                             f"got {list(widths)}")  # fmt: skip
        object.__setattr__(self, "matryoshka_widths", widths)


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: a BatchTopKSAE (same tensors, same inference) trained on nested prefixes."""

    architecture = "matryoshka_batchtopk"

    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def default_objective(self) -> MatryoshkaObjective:
        return MatryoshkaObjective(self)


class MatryoshkaObjective(BatchTopKObjective):
    """Mean over prefixes of FVU(x_hat_w, x) + aux_coef * AuxK, with the threshold's running estimate (as BatchTopK)."""

    def __init__(self, sae: MatryoshkaSAE, aux_coef: float = 1 / 32, k_aux: int | None = None,
                 dead_tokens: int = 10_000_000, threshold_lr: float = 0.01, block_size: int | None = BLOCK_SIZE):  # fmt: skip
        if not isinstance(sae, MatryoshkaSAE):
            raise ValueError(f"MatryoshkaObjective: sae must be a MatryoshkaSAE, got {type(sae).__name__}")
        super().__init__(sae, aux_coef, k_aux, dead_tokens, threshold_lr, block_size)

    def reconstruction(self, x: Tensor, acts: Tensor, idx: Tensor, n_main: int) -> tuple[Tensor, Tensor, Tensor | None, dict[str, float]]:
        sae, widths = self.sae, self.sae.cfg.matryoshka_widths
        grouped, grouped_idx, spans = group_columns(acts[:, :n_main], idx[:, :n_main], widths)
        if acts.shape[1] > n_main:  # AuxK's columns: one more span
            spans.append((grouped.shape[1], grouped.shape[1] + acts.shape[1] - n_main))
            grouped, grouped_idx = torch.cat([grouped, acts[:, n_main:]], 1), torch.cat([grouped_idx, idx[:, n_main:]], 1)
        decoded = span_decode(grouped, grouped_idx, sae.W_dec, spans)  # every group and e_hat: one sparse backward
        x_hat, losses, logs = sae.b_dec.expand_as(x), [], {}
        for hi, part in zip(widths, decoded):  # each prefix adds the decode of its own group of latents
            x_hat = x_hat + part
            losses.append(fvu(x_hat, x))
            logs[f"fvu_{hi}"] = losses[-1].item()
        logs["fvu"] = logs[f"fvu_{widths[-1]}"]
        return torch.stack(losses).mean(), x_hat, decoded[len(widths)] if len(decoded) > len(widths) else None, logs


def group_columns(acts_NM: Tensor, idx_NM: Tensor, widths: Sequence[int]) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Each token's nonzero entries regrouped by prefix group (latents [w_{g-1}, w_g)): (acts, idx) [N, sum_g M_g] and
    the column span of each group, M_g the most entries any token has in group g (padding: value 0, latent 0). acts
    keeps its gradient (a scatter); entries worth 0 are dropped (relu or the batch choice already stopped theirs)."""
    N, G = len(acts_NM), len(widths)
    group = torch.bucketize(idx_NM.contiguous(), torch.tensor(widths[:-1], device=idx_NM.device), right=True)
    group = group.masked_fill(acts_NM.detach() == 0, G)  # dropped: a group of its own, after the others
    order = group.argsort(dim=1, stable=True)
    group = group.gather(1, order)
    counts = torch.zeros(N, G + 1, dtype=torch.long, device=idx_NM.device).scatter_add_(1, group, torch.ones_like(group))
    widths_G = counts[:, :G].amax(0).tolist()
    offsets = torch.tensor([0] + widths_G, device=idx_NM.device).cumsum(0)  # group g's first column
    rank = torch.arange(group.shape[1], device=idx_NM.device) - (counts.cumsum(1) - counts).gather(1, group)
    col = (offsets[group] + rank).masked_fill(group == G, int(offsets[-1]))  # dropped entries: one spare column
    total = int(offsets[-1]) + 1
    acts = acts_NM.new_zeros(N, total).scatter(1, col, acts_NM.gather(1, order))
    idx = idx_NM.new_zeros(N, total).scatter(1, col, idx_NM.gather(1, order).masked_fill(group == G, 0))
    spans = [(int(offsets[g]), int(offsets[g + 1])) for g in range(G)]
    return acts[:, :-1], idx[:, :-1], spans


register_architecture("matryoshka_batchtopk", MatryoshkaSAE, MatryoshkaConfig)
