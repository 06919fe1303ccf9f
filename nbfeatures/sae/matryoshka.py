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
from .base import fvu, sparse_decode
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
        sae, lo = self.sae, 0
        main_acts, main_idx = acts[:, :n_main], idx[:, :n_main]
        x_hat, losses, logs = sae.b_dec.expand_as(x), [], {}
        for hi in sae.cfg.matryoshka_widths:  # each prefix adds the decode of its own group of latents
            x_hat = x_hat + sparse_decode(main_acts * ((main_idx >= lo) & (main_idx < hi)), main_idx, sae.W_dec)
            losses.append(fvu(x_hat, x))
            logs[f"fvu_{hi}"] = losses[-1].item()
            lo = hi
        logs["fvu"] = logs[f"fvu_{lo}"]
        e_hat = sparse_decode(acts[:, n_main:], idx[:, n_main:], sae.W_dec) if acts.shape[1] > n_main else None
        return torch.stack(losses).mean(), x_hat, e_hat, logs


register_architecture("matryoshka_batchtopk", MatryoshkaSAE, MatryoshkaConfig)
