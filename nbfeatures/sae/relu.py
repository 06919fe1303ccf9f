"""ReLU sparse autoencoder with an L1 penalty: the standard SAE, the e2e paper's "local" baseline.

    latents = relu(W_enc^T (x - b_dec) + b_enc)          x_hat = W_dec^T latents + b_dec
    loss = mean_elements (x_hat - x)^2 + l1_coef * mean_tokens ||latents||_1 / d_in     (Braun et al. 2024)

Decoder rows are kept unit-norm, so the L1 penalty cannot be dodged by shrinking latents and
growing decoder rows.

Dimension key: N tokens, D input dim (d_in), F latents (d_sae).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import int_arg, real_arg, sizes_arg
from .io import register_architecture
from .base import FiringTracker, UnitNormSAE, check_input, fvu


@dataclass(frozen=True)
class ReLUConfig:
    d_in: int  # width of the activations
    d_sae: int  # number of latents

    def __post_init__(self):
        sizes_arg("ReLUConfig", d_in=self.d_in, d_sae=self.d_sae)
        object.__setattr__(self, "d_in", int(self.d_in))
        object.__setattr__(self, "d_sae", int(self.d_sae))


class ReLUOutput(NamedTuple):
    x_hat: Tensor  # [..., D]
    latents: Tensor  # [..., F], >= 0
    pre_acts: Tensor  # [..., F]


class ReLUSAE(UnitNormSAE):
    """Standard SAE with SAELens-layout parameters: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]."""

    architecture = "standard"

    config_class = ReLUConfig
    cfg: ReLUConfig

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def forward(self, x: Tensor) -> ReLUOutput:
        lead = x.shape[:-1]
        flat = check_input(type(self).__name__, x, self.cfg.d_in, self.W_enc.dtype)
        pre = (flat - self.b_dec) @ self.W_enc + self.b_enc
        latents = torch.relu(pre)
        x_hat = self.decode(latents).to(x.dtype)
        return ReLUOutput(x_hat.reshape(*lead, -1), latents.reshape(*lead, -1), pre.reshape(*lead, -1))

    def default_objective(self) -> ReLUObjective:
        return ReLUObjective(self)


class ReLUObjective:
    """MSE (mean over elements) + l1_coef * mean over tokens of ||latents||_1 / d_in; tracks dead latents."""

    def __init__(self, sae: ReLUSAE, l1_coef: float = 1.0, dead_tokens: int = 10_000_000):
        if not isinstance(sae, torch.nn.Module) or not isinstance(getattr(getattr(sae, "cfg", None), "d_sae", None), int):
            raise ValueError(f"ReLUObjective: sae must be a dictionary module with cfg.d_in and cfg.d_sae (a ReLUSAE), got {type(sae).__name__}")
        l1_coef = real_arg("ReLUObjective", "l1_coef", l1_coef)
        dead_tokens = int_arg("ReLUObjective", "dead_tokens", dead_tokens)
        self.sae, self.l1_coef = sae, l1_coef
        self.firing = FiringTracker(sae.cfg.d_sae, dead_tokens)

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        out = self.sae(x)
        mse = (out.x_hat - x).pow(2).mean()
        l1 = out.latents.abs().sum(-1).mean() / self.sae.cfg.d_in
        loss = mse + self.l1_coef * l1
        active = out.latents > 0
        dead = self.firing.update(active.any(0), x.shape[0])
        return loss, {
            "loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "fvu": fvu(out.x_hat.detach(), x).item(),
            "l0": active.sum(-1).float().mean().item(), "dead_fraction": dead.float().mean().item(),
        }

    def config_dict(self) -> dict:
        return {"l1_coef": self.l1_coef, "dead_tokens": self.firing.dead_tokens}

    def state_dict(self) -> dict[str, Tensor]:
        return self.firing.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.firing.load_state_dict(state)


register_architecture("standard", ReLUSAE, ReLUConfig)
