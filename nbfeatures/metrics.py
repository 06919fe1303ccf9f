"""Metrics as pure functions of tensors, defined as SAELens / sparsify / the papers define them.

    fvu = sum (x - x_hat)^2 / sum (x - mean x)^2        explained_variance = 1 - fvu
    nmse = sum (x - x_hat)^2 / sum x^2                   ce_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    kl = KL(P_clean || P_other), mean over tokens         recovery = mean_i max_j cos(true_i, W_dec_j)

Dimension key: N tokens, D input dim, F latents, V vocab, C concepts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def l0(latents_NF: Tensor) -> float:
    """Mean number of nonzero latents per token."""
    return (latents_NF != 0).sum(-1).float().mean().item()


def mse(x_hat: Tensor, x: Tensor) -> float:
    return (x_hat - x).pow(2).mean().item()


def nmse(x_hat: Tensor, x: Tensor) -> float:
    """Squared error normalised by the squared norm of the input."""
    return ((x_hat - x).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12)).item()


def fvu(x_hat: Tensor, x: Tensor) -> float:
    """Fraction of variance unexplained: squared error over the variance around the batch mean."""
    x, x_hat = x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x.shape[-1])
    return ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)).item()


def explained_variance(x_hat: Tensor, x: Tensor) -> float:
    return 1.0 - fvu(x_hat, x)


def l2_ratio(x_hat: Tensor, x: Tensor) -> float:
    """Mean ||x_hat|| / ||x|| per token (below 1: feature suppression)."""
    return (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean().item()


def cross_entropy(logits_BTV: Tensor, tokens_BT: Tensor, mask_BT: Tensor | None = None) -> float:
    """Next-token cross-entropy in nats: logits at t predict token t+1."""
    logp = F.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens_BT[:, 1:, None]).squeeze(-1)
    if mask_BT is not None:
        m = mask_BT[:, 1:].float()
        return ((nll * m).sum() / m.sum().clamp_min(1)).item()
    return nll.mean().item()


def ce_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 is as good as the clean model, 0 as zero ablation."""
    if math.isclose(ce_zero, ce_clean):
        return float("nan")
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_div(logits_clean: Tensor, logits_other: Tensor) -> float:
    """KL(P_clean || P_other) in nats, mean over tokens."""
    lp, lq = F.log_softmax(logits_clean.float(), -1), F.log_softmax(logits_other.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def feature_density(latents_NF: Tensor) -> Tensor:
    """Fraction of tokens on which each latent fires [F]."""
    return (latents_NF != 0).float().mean(0)


def log10_density(density_F: Tensor, eps: float = 1e-10) -> Tensor:
    """SAELens's sparsity file: log10(density + 1e-10)."""
    return torch.log10(density_F + eps)


def dead_fraction(density_F: Tensor) -> float:
    """Latents that never fired on the evaluated tokens."""
    return (density_F == 0).float().mean().item()


def dense_fraction(density_F: Tensor, threshold: float = 0.1) -> float:
    """Latents firing on more than `threshold` of tokens."""
    return (density_F > threshold).float().mean().item()


def recovery(true_CD: Tensor, W_dec_FD: Tensor) -> float:
    """Mean over true directions of the best cosine similarity among decoder rows."""
    cos = F.normalize(true_CD.float(), dim=-1) @ F.normalize(W_dec_FD.float(), dim=-1).t()
    return cos.max(dim=1).values.mean().item()


def precision_recall(fires_NF: Tensor, labels_NC: Tensor) -> tuple[Tensor, Tensor]:
    """Precision and recall [F, C] of each latent as a detector of each label.

    precision[f, c] = P(label c | latent f fires); recall[f, c] = P(latent f fires | label c).
    """
    fires, labels = fires_NF.float(), labels_NC.float()
    both = fires.t() @ labels
    precision = both / fires.sum(0)[:, None].clamp_min(1)
    recall = both / labels.sum(0)[None, :].clamp_min(1)
    return precision, recall


def fit_power_law(y: Sequence[float], **factors: Sequence[float]) -> dict[str, float]:
    """Least squares in log space: log y = log c + sum_i a_i log x_i. Returns {"c", each factor's exponent, "r2"}.

    e.g. fit_power_law(nmse, d_sae=widths, k=ks) fits nmse = c * d_sae^a * k^b.
    """
    if not factors:
        raise ValueError("fit_power_law needs at least one factor, e.g. fit_power_law(nmse, d_sae=widths)")
    Y = torch.log(torch.as_tensor(y, dtype=torch.float64))
    cols = [torch.ones_like(Y)] + [torch.log(torch.as_tensor(v, dtype=torch.float64)) for v in factors.values()]
    X = torch.stack(cols, dim=1)
    if len(Y) <= X.shape[1] - 1:
        raise ValueError(f"need more points ({len(Y)}) than fitted exponents ({X.shape[1] - 1})")
    coef = torch.linalg.lstsq(X, Y[:, None]).solution[:, 0]
    resid = Y - X @ coef
    r2 = 1 - resid.pow(2).sum() / (Y - Y.mean()).pow(2).sum().clamp_min(1e-30)
    return {"c": math.exp(coef[0].item()), **{name: coef[i + 1].item() for i, name in enumerate(factors)}, "r2": r2.item()}
