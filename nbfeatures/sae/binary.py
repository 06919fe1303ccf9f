"""Binary autoencoder (BAE; Cho et al. 2025, "Binary Autoencoder for Mechanistic Interpretability of LLMs").

    h = 1[W_enc^T x + b_enc > 0]  in {0, 1}^F              x_hat = W_dec^T h + b_dec
    L = MSE(x_hat, x) + lambda_e * H(batch) * [step >= entropy_start] + lambda_c * sum_{i != j} |Cov(h)_ij|
    H(batch) = sum_j Hb(p_j),  p_j = mean over the minibatch of h_j,  Hb = binary entropy in bits

The step has no gradient, so an estimator stands in for it in the backward pass:
    ste          grad_in = grad_out                          (straight-through)
    sigmoid_ste  grad_in = grad_out * s(z) (1 - s(z))         at the pre-activation z
    reference    grad_in = grad_out * (1 - grad_out)          what the reference code does (it applies
                                                              the sigmoid-derivative form to the incoming gradient)
Feature-set entropy: the same sum of per-bit binary entropies over a set of activations.
Reading a bit: it "fires" when it leaves its usual state (`deviation_scores`, `deviation_acts`), so a
usually-on bit switching off counts and dense bits are not mistaken for signal.

Dimension key: N tokens, D input dim (d_in), F bits (d_sae).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .._checks import choice_arg, int_arg, real_arg, sizes_arg
from .io import register_architecture
from .base import DictionaryModule, check_input

Estimator = Literal["ste", "sigmoid_ste", "reference"]


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, estimator: str) -> Tensor:
        ctx.estimator = estimator
        ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        (z,) = ctx.saved_tensors
        if ctx.estimator == "ste":
            return g, None
        if ctx.estimator == "sigmoid_ste":
            s = torch.sigmoid(z)
            return g * s * (1 - s), None
        return g * (1 - g), None


def binary_step(z: Tensor, estimator: Estimator = "reference") -> Tensor:
    """1[z > 0] with the chosen gradient estimator."""
    choice_arg("binary_step", "estimator", estimator, ("ste", "sigmoid_ste", "reference"))
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise ValueError(f"binary_step: z must be a float tensor, got {type(z).__name__} {getattr(z, 'dtype', '')}")
    return _Step.apply(z, estimator)


@dataclass(frozen=True)
class BinaryConfig:
    d_in: int  # width of the activations
    d_sae: int  # number of bits (the reference uses 4 x d_in)
    estimator: Estimator = "reference"

    def __post_init__(self):
        sizes_arg("BinaryConfig", d_in=self.d_in, d_sae=self.d_sae)
        object.__setattr__(self, "d_in", int(self.d_in))
        object.__setattr__(self, "d_sae", int(self.d_sae))
        choice_arg("BinaryConfig", "estimator", self.estimator, ("ste", "sigmoid_ste", "reference"))


class BinaryOutput(NamedTuple):
    x_hat: Tensor  # [..., D]
    latents: Tensor  # [..., F] bits in {0, 1}
    pre_acts: Tensor  # [..., F]


class BinaryAE(DictionaryModule):
    """Binary autoencoder with SAELens-layout names; the input is not shifted by b_dec (as in the reference)."""

    architecture = "nbfeatures.binary"
    apply_b_dec_to_input = False

    def __init__(self, cfg: BinaryConfig, seed: int | None = 0):
        if not isinstance(cfg, BinaryConfig):
            raise ValueError(f"BinaryAE: cfg must be a BinaryConfig, got {type(cfg).__name__}")
        if seed is not None:
            int_arg("BinaryAE", "seed", seed, minimum=0)
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1 / cfg.d_in**0.5  # nn.Linear's default init, as the reference uses
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae).uniform_(-bound, bound, generator=gen))
        self.b_enc = nn.Parameter(torch.empty(cfg.d_sae).uniform_(-bound, bound, generator=gen))
        bound = 1 / cfg.d_sae**0.5
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in).uniform_(-bound, bound, generator=gen))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        return binary_step(x @ self.W_enc + self.b_enc, self.cfg.estimator)

    def decode(self, bits: Tensor) -> Tensor:
        return bits @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> BinaryOutput:
        lead = x.shape[:-1]
        flat = check_input(type(self).__name__, x, self.cfg.d_in, self.W_enc.dtype)
        pre = flat @ self.W_enc + self.b_enc
        bits = binary_step(pre, self.cfg.estimator)
        x_hat = self.decode(bits).to(x.dtype)
        return BinaryOutput(x_hat.reshape(*lead, -1), bits.reshape(*lead, -1), pre.reshape(*lead, -1))

    def default_objective(self) -> BinaryObjective:
        return BinaryObjective(self)


def binary_entropy_bits(p: Tensor, eps: float = 1e-10) -> Tensor:
    """Hb(p) = -p log2 p - (1 - p) log2 (1 - p), elementwise."""
    return -(p * torch.log2(p + eps) + (1 - p) * torch.log2(1 - p + eps))


def minibatch_entropy(bits_NF: Tensor) -> Tensor:
    """Sum over bits of the binary entropy of each bit's firing rate in the batch (bits; differentiable)."""
    return binary_entropy_bits(bits_NF.mean(0)).sum()


def offdiag_covariance(bits_NF: Tensor) -> Tensor:
    """Sum of absolute off-diagonal entries of the bits' covariance over the batch."""
    c = torch.cov(bits_NF.t())
    return c.abs().sum() - c.diagonal().abs().sum()


@torch.no_grad()
def feature_set_entropy(bae: BinaryAE, acts_ND: Tensor) -> float:
    """Entropy estimate (bits) of a set of activations: the summed per-bit entropy of its BAE codes."""
    return minibatch_entropy(bae(acts_ND).latents.reshape(-1, bae.cfg.d_sae)).item()


def _check_bits(owner: str, bits_NF: Any, mean_F: Any) -> None:
    if not isinstance(bits_NF, Tensor) or bits_NF.dim() != 2:
        raise ValueError(f"{owner}: bits must be a tensor [N, F] of 0/1 codes, got {type(bits_NF).__name__} "
                         f"{list(getattr(bits_NF, 'shape', []))}")  # fmt: skip
    if mean_F is not None and (not isinstance(mean_F, Tensor) or tuple(mean_F.shape) != (bits_NF.shape[1],)):
        raise ValueError(f"{owner}: mean must be a tensor [F] with F={bits_NF.shape[1]}, got {list(getattr(mean_F, 'shape', []))}")


def deviation_scores(bits_NF: Tensor, mean_F: Tensor | None = None) -> Tensor:
    """log2(|h - mean h| + 1e-6): a normally-on bit switching off scores as high as a rare bit switching on."""
    _check_bits("deviation_scores", bits_NF, mean_F)
    mean_F = bits_NF.float().mean(0) if mean_F is None else mean_F
    return torch.log2((bits_NF.float() - mean_F).abs() + 1e-6)


def deviation_acts(bits_NF: Tensor, mean_F: Tensor | None = None) -> Tensor:
    """|h - mean h| where a bit is out of its usual state (1 for a rare bit, 0 for a usually-on bit), else 0.

    Non-negative and zero when "off", so it feeds precision / recall and the feature gallery like SAE latents.
    """
    _check_bits("deviation_acts", bits_NF, mean_F)
    bits = bits_NF.float()
    mean_F = bits.mean(0) if mean_F is None else mean_F.float()
    deviates = bits != (mean_F > 0.5).float()
    return torch.where(deviates, (bits - mean_F).abs(), torch.zeros_like(bits))


class BinaryObjective:
    """MSE + entropy_coef * minibatch entropy (after `entropy_start` steps) + cov_coef * off-diagonal covariance."""

    def __init__(self, bae: BinaryAE, entropy_coef: float = 1e-7, cov_coef: float = 1e-7, entropy_start: int = 0,
                 entropy_threshold: float | None = None):
        if not isinstance(bae, nn.Module) or not isinstance(getattr(getattr(bae, "cfg", None), "d_sae", None), int):
            raise ValueError(f"BinaryObjective: bae must be a dictionary module with cfg.d_sae (a BinaryAE), got {type(bae).__name__}")
        entropy_coef = real_arg("BinaryObjective", "entropy_coef", entropy_coef)
        cov_coef = real_arg("BinaryObjective", "cov_coef", cov_coef)
        entropy_start = int_arg("BinaryObjective", "entropy_start", entropy_start, minimum=0)
        if entropy_threshold is not None:
            entropy_threshold = real_arg("BinaryObjective", "entropy_threshold", entropy_threshold)
        self.bae, self.entropy_coef, self.cov_coef = bae, entropy_coef, cov_coef
        self.entropy_start, self.entropy_threshold = entropy_start, entropy_threshold
        self.step = 0

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        out = self.bae(x)
        mse = (out.x_hat - x).pow(2).mean()
        entropy = minibatch_entropy(out.latents)
        cov = offdiag_covariance(out.latents) if self.cov_coef > 0 else torch.zeros((), device=x.device)
        loss = mse + self.cov_coef * cov
        entropy_on = self.step >= self.entropy_start and (self.entropy_threshold is None or entropy.item() > self.entropy_threshold)
        if entropy_on:
            loss = loss + self.entropy_coef * entropy
        self.step += 1
        x_c = x - x.mean(0)
        density = out.latents.detach().mean(0)
        return loss, {
            "loss": loss.item(), "mse": mse.item(), "entropy_bits": entropy.item(), "cov": cov.item(),
            "fvu": ((out.x_hat.detach() - x).pow(2).sum() / x_c.pow(2).sum().clamp_min(1e-12)).item(),
            "l0": out.latents.detach().sum(-1).mean().item(), "dead_fraction": (density == 0).float().mean().item(),
            "dense_fraction": (density > 0.1).float().mean().item(), "entropy_on": float(entropy_on),
        }

    def config_dict(self) -> dict:
        return {"entropy_coef": self.entropy_coef, "cov_coef": self.cov_coef, "entropy_start": self.entropy_start,
                "entropy_threshold": self.entropy_threshold}

    def state_dict(self) -> dict[str, Tensor]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])


register_architecture("nbfeatures.binary", BinaryAE, BinaryConfig)
