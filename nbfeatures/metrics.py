"""Metrics as pure functions of tensors, defined as SAELens / sparsify / the papers define them.

    fvu = sum (x - x_hat)^2 / sum (x - mean x)^2        explained_variance = 1 - fvu
    nmse = sum (x - x_hat)^2 / sum x^2                   ce_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    kl = KL(P_clean || P_other), mean over tokens         recovery = mean_i max_j cos(true_i, W_dec_j)

Dimension key: N tokens, D input dim, F latents, V vocab, C concepts.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------- argument checks
# Metrics are pure functions: bad input gets an error naming the argument, never a silent NaN or a broadcast.


def _tensor(name: str, x, *, min_dim: int = 1, finite: bool = True) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch tensor (or numpy array), got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {list(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} NaN or inf value(s); metrics need finite values")
    return x


def _same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:  # no broadcasting: an [N, D] against a [D] is almost always a mistake
        raise ValueError(f"{a_name} and {b_name} must have the same shape, got {list(a.shape)} and {list(b.shape)}")


def _pair(x_hat, x) -> tuple[Tensor, Tensor]:
    x_hat, x = _tensor("x_hat", x_hat), _tensor("x", x)
    _same_shape("x_hat", x_hat, "x", x)
    if x.numel() == 0:
        raise ValueError(f"x must hold at least one value, got shape {list(x.shape)}")
    return x_hat, x


def _latents(latents_NF) -> Tensor:
    """[N, F] (or [..., F], flattened to tokens), at least one token, no NaN (a NaN would count as firing)."""
    z = _tensor("latents_NF", latents_NF, min_dim=2, finite=False)
    if z.is_floating_point() and bool(torch.isnan(z).any()):
        raise ValueError(f"latents_NF holds {int(torch.isnan(z).sum())} NaN value(s); latents must be numbers (0 when off)")
    z = z.reshape(-1, z.shape[-1])
    if len(z) == 0:
        raise ValueError(f"latents_NF must hold at least one token, got shape {list(latents_NF.shape)}")
    return z


def _density(density_F) -> Tensor:
    d = _tensor("density_F", density_F)
    if d.numel() == 0 or bool(((d < 0) | (d > 1)).any()):
        raise ValueError(f"density_F must be a non-empty tensor of firing rates in [0, 1], got {d.numel()} values "
                         f"in [{d.min().item() if d.numel() else 'none'}, {d.max().item() if d.numel() else 'none'}]")
    return d


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return float(v)


def l0(latents_NF: Tensor) -> float:
    """Mean number of nonzero latents per token."""
    return (_latents(latents_NF) != 0).sum(-1).float().mean().item()


def mse(x_hat: Tensor, x: Tensor) -> float:
    x_hat, x = _pair(x_hat, x)
    return (x_hat - x).pow(2).mean().item()


def nmse(x_hat: Tensor, x: Tensor) -> float:
    """Squared error normalised by the squared norm of the input."""
    x_hat, x = _pair(x_hat, x)
    return ((x_hat - x).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12)).item()


def fvu(x_hat: Tensor, x: Tensor) -> float:
    """Fraction of variance unexplained: squared error over the variance around the batch mean."""
    x_hat, x = _pair(x_hat, x)
    x, x_hat = x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x.shape[-1])
    return ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)).item()


def explained_variance(x_hat: Tensor, x: Tensor) -> float:
    return 1.0 - fvu(x_hat, x)


def l2_ratio(x_hat: Tensor, x: Tensor) -> float:
    """Mean ||x_hat|| / ||x|| per token (below 1: feature suppression)."""
    x_hat, x = _pair(x_hat, x)
    return (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean().item()


def cross_entropy(logits_BTV: Tensor, tokens_BT: Tensor, mask_BT: Tensor | None = None) -> float:
    """Next-token cross-entropy in nats: logits at t predict token t+1."""
    logits_BTV, tokens_BT = _logits("logits_BTV", logits_BTV, 3), _tensor("tokens_BT", tokens_BT, min_dim=2)
    B, T, V = logits_BTV.shape
    if tokens_BT.dim() != 2 or tuple(tokens_BT.shape) != (B, T):
        raise ValueError(f"tokens_BT must be [B, T] = {[B, T]} like logits_BTV [B, T, V]; got {list(tokens_BT.shape)}")
    if tokens_BT.is_floating_point() or tokens_BT.dtype == torch.bool:
        raise TypeError(f"tokens_BT must be integer token ids, got dtype {tokens_BT.dtype}")
    if T < 2:
        raise ValueError(f"cross_entropy needs T >= 2 positions (logits at t predict token t+1), got T={T}")
    if tokens_BT.numel() and (int(tokens_BT.min()) < 0 or int(tokens_BT.max()) >= V):
        raise ValueError(f"tokens_BT must be ids in [0, V={V}), got min {int(tokens_BT.min())}, max {int(tokens_BT.max())}")
    if mask_BT is not None:
        mask_BT = _tensor("mask_BT", mask_BT, min_dim=2)
        if tuple(mask_BT.shape) != (B, T):
            raise ValueError(f"mask_BT must be [B, T] = {[B, T]} like tokens_BT; got {list(mask_BT.shape)}")
    logp = F.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens_BT[:, 1:, None]).squeeze(-1)
    if mask_BT is not None:
        m = mask_BT[:, 1:].float()
        return ((nll * m).sum() / m.sum().clamp_min(1)).item()
    return nll.mean().item()


def _logits(name: str, x, min_dim: int) -> Tensor:
    """Logits may hold -inf (a banned token) but not NaN or +inf."""
    x = _tensor(name, x, min_dim=min_dim, finite=False)
    if x.dim() != min_dim and min_dim == 3:
        raise ValueError(f"{name} must be [B, T, V], got shape {list(x.shape)}")
    if x.is_floating_point() and bool((torch.isnan(x) | (x == math.inf)).any()):
        raise ValueError(f"{name} holds NaN or +inf; logits must be finite (or -inf for an impossible token)")
    if x.numel() == 0:
        raise ValueError(f"{name} must hold at least one token, got shape {list(x.shape)}")
    return x


def ce_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 is as good as the clean model, 0 as zero ablation."""
    ce_clean, ce_sae, ce_zero = _number("ce_clean", ce_clean), _number("ce_sae", ce_sae), _number("ce_zero", ce_zero)
    if math.isclose(ce_zero, ce_clean):
        return float("nan")
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_div(logits_clean: Tensor, logits_other: Tensor) -> float:
    """KL(P_clean || P_other) in nats, mean over tokens."""
    logits_clean, logits_other = _logits("logits_clean", logits_clean, 1), _logits("logits_other", logits_other, 1)
    _same_shape("logits_clean", logits_clean, "logits_other", logits_other)
    lp, lq = F.log_softmax(logits_clean.float(), -1), F.log_softmax(logits_other.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def feature_density(latents_NF: Tensor) -> Tensor:
    """Fraction of tokens on which each latent fires [F]."""
    return (_latents(latents_NF) != 0).float().mean(0)


def log10_density(density_F: Tensor, eps: float = 1e-10) -> Tensor:
    """SAELens's sparsity file: log10(density + 1e-10)."""
    density_F, eps = _density(density_F), _number("eps", eps)
    return torch.log10(density_F + eps)


def dead_fraction(density_F: Tensor) -> float:
    """Latents that never fired on the evaluated tokens."""
    density_F = _density(density_F)
    return (density_F == 0).float().mean().item()


def dense_fraction(density_F: Tensor, threshold: float = 0.1) -> float:
    """Latents firing on more than `threshold` of tokens."""
    density_F = _density(density_F)
    if not 0 <= _number("threshold", threshold) < 1:
        raise ValueError(f"threshold must lie in [0, 1) (a fraction of tokens), got {threshold}")
    return (density_F > threshold).float().mean().item()


def recovery(true_CD: Tensor, W_dec_FD: Tensor) -> float:
    """Mean over true directions of the best cosine similarity among decoder rows."""
    true_CD, W_dec_FD = _tensor("true_CD", true_CD, min_dim=2), _tensor("W_dec_FD", W_dec_FD, min_dim=2)
    if true_CD.dim() != 2 or W_dec_FD.dim() != 2 or true_CD.shape[1] != W_dec_FD.shape[1] or not len(true_CD) or not len(W_dec_FD):
        raise ValueError(f"need true_CD [C, D] and W_dec_FD [F, D] with the same D and C, F >= 1; "
                         f"got {list(true_CD.shape)} and {list(W_dec_FD.shape)}")
    cos = F.normalize(true_CD.float(), dim=-1) @ F.normalize(W_dec_FD.float(), dim=-1).t()
    return cos.max(dim=1).values.mean().item()


def precision_recall(fires_NF: Tensor, labels_NC: Tensor) -> tuple[Tensor, Tensor]:
    """Precision and recall [F, C] of each latent as a detector of each label.

    precision[f, c] = P(label c | latent f fires); recall[f, c] = P(latent f fires | label c).
    A nonzero entry fires / holds the label, so latents (>= 0) work as well as bool indicators.
    """
    fires_NF, labels_NC = _tensor("fires_NF", fires_NF, min_dim=2), _tensor("labels_NC", labels_NC, min_dim=2)
    if fires_NF.dim() != 2 or labels_NC.dim() != 2 or len(fires_NF) != len(labels_NC):
        raise ValueError(f"need fires_NF [N, F] and labels_NC [N, C] over the same N tokens; "
                         f"got {list(fires_NF.shape)} and {list(labels_NC.shape)}")
    for name, t in (("fires_NF", fires_NF), ("labels_NC", labels_NC)):
        if t.dtype != torch.bool and bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0 (bool indicators or non-negative activations), got min {t.min().item()}")
    fires, labels = (fires_NF != 0).float(), (labels_NC != 0).float()
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
    values = {"y": y, **factors}
    for name, v in values.items():
        try:
            v = values[name] = torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a sequence of positive numbers, got {type(values[name]).__name__}") from None
        if v.dim() != 1 or len(v) != len(values["y"]):
            raise ValueError(f"{name} must be a flat sequence with one value per point of y ({len(values['y'])}), "
                             f"got shape {list(v.shape)}")
        if not bool((torch.isfinite(v) & (v > 0)).all()):
            raise ValueError(f"{name} must hold positive finite numbers (the fit is in log space), got {v.tolist()}")
    Y = torch.log(values.pop("y"))
    cols = [torch.ones_like(Y)] + [torch.log(v) for v in values.values()]
    X = torch.stack(cols, dim=1)
    if len(Y) <= X.shape[1] - 1:
        raise ValueError(f"need more points ({len(Y)}) than fitted exponents ({X.shape[1] - 1})")
    coef = torch.linalg.lstsq(X, Y[:, None]).solution[:, 0]
    resid = Y - X @ coef
    r2 = 1 - resid.pow(2).sum() / (Y - Y.mean()).pow(2).sum().clamp_min(1e-30)
    return {"c": math.exp(coef[0].item()), **{name: coef[i + 1].item() for i, name in enumerate(factors)}, "r2": r2.item()}
