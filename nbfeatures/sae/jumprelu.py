"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders").

    pre = W_enc^T (x - b_dec) + b_enc      latents = relu(pre) * H(pre - threshold)      x_hat = W_dec^T latents + b_dec
    loss = FVU(x_hat, x) + l0_coef * mean over tokens of one sparsity penalty (`sparsity_loss`):
        "step"       sum_f H(pre_f - threshold_f)                              the L0 itself (the paper; DeepMind)
        "tanh"       sum_f tanh(tanh_scale * latents_f * |W_dec_f|)           Anthropic's smooth L0 (SAELens "tanh")
        "quadratic"  2 / target_l0 * (sum_f H(pre_f - threshold_f) - target_l0)^2   to a target L0 (Gemma Scope 2;
                                                                               the form of SAELens 6's jumprelu_sae.py)

H has no useful derivative; the straight-through estimator puts a rectangle kernel of width eps = `bandwidth` where
the delta would be (the paper's pseudo-code, SAELens's `JumpReLU` / `Step`):
    d/dt [pre H(pre - t)] = -(t / eps) rect((pre - t) / eps)        d/dt H(pre - t) = -(1 / eps) rect((pre - t) / eps)
and pre gets the gradient of pre H(pre - t) where the latent is on, none through H (DeepMind's choice).

`threshold` is a parameter of its own, not the paper's log threshold: Adam moves a parameter by about lr per step,
so a log threshold moves multiplicatively and a small one barely moves in a short run (SAELens made the same change,
SAELens#494); it is kept >= 0 after each step, so relu(pre) H(pre - t) = pre H(pre - t). Decoder rows are unit-norm
as for TopK (so |W_dec_f| = 1 but for the gradient along the row, which the step removes). Training reads only the
entries with a value or a gradient, pre > threshold - eps/2, as a padded [N, M] list found tile by tile without the
[N, F] matrix (blocked.blocked_above), and decodes them sparsely; a batch where more than a quarter of the entries
qualify (at the start) goes through dense matmuls.

Dimension key: N tokens, D input dim (d_in), F latents (d_sae), M latents read per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._checks import choice_arg, int_arg, real_arg, sizes_arg
from .base import FiringTracker, UnitNormSAE, check_input, chosen_pre, fvu, gather_pre, span_decode
from .blocked import BLOCK_SIZE, blocked_above, pack_rows
from .io import register_architecture

SPARSITY_LOSSES = ("step", "tanh", "quadratic")


def rect(z: Tensor) -> Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), else 0."""
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre H(pre - t); grad pre: H(pre - t) g; grad t: -(t / eps) rect((pre - t) / eps) g, summed over tokens."""

    @staticmethod
    def forward(ctx, pre: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, t)
        ctx.eps = eps
        return pre * (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, t = ctx.saved_tensors
        grad_t = -(t / ctx.eps) * rect((pre - t) / ctx.eps) * g
        return (pre > t).to(g.dtype) * g, _sum_to(grad_t, t), None


class _Step(torch.autograd.Function):
    """H(pre - t); grad pre: none; grad t: -(1 / eps) rect((pre - t) / eps) g, summed over tokens."""

    @staticmethod
    def forward(ctx, pre: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, t)
        ctx.eps = eps
        return (pre > t).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, t = ctx.saved_tensors
        return None, _sum_to(-(1.0 / ctx.eps) * rect((pre - t) / ctx.eps) * g, t), None


def _sum_to(grad: Tensor, t: Tensor) -> Tensor:
    """A broadcast [F] threshold gets the sum over tokens; a gathered [N, M] one keeps its shape."""
    return grad.sum(0) if t.dim() < grad.dim() else grad


def jumprelu(pre: Tensor, threshold: Tensor) -> Tensor:
    """Inference: relu(pre) * 1[pre > threshold], exactly as SAELens's JumpReLUSAE.encode."""
    return torch.relu(pre) * (pre > threshold).to(pre.dtype)


@dataclass(frozen=True)
class JumpReLUConfig:
    d_in: int  # width of the activations
    d_sae: int  # number of latents
    sparsity_loss: str = "step"  # one of SPARSITY_LOSSES (see the module docstring)
    l0_coef: float = 2e-3  # weight of the sparsity penalty against the FVU: tune it for the L0 wanted (or "quadratic")
    target_l0: float | None = None  # "quadratic" only, where it is required: the L0 aimed at
    bandwidth: float = 0.001  # eps of the kernel, in activation units: the paper's, for its normalised activations
    # (SAELens 6 defaults to 0.05); a few percent of typical pre-activations trains faster
    tanh_scale: float = 4.0  # "tanh" only: c in tanh(c * latents * |W_dec|) (SAELens's default)
    init_threshold: float = 0.001  # every latent's threshold at initialisation

    def __post_init__(self):
        sizes_arg("JumpReLUConfig", d_in=self.d_in, d_sae=self.d_sae)
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: store normalised values)
        put("d_in", int(self.d_in))
        put("d_sae", int(self.d_sae))
        choice_arg("JumpReLUConfig", "sparsity_loss", self.sparsity_loss, SPARSITY_LOSSES)
        put("l0_coef", real_arg("JumpReLUConfig", "l0_coef", self.l0_coef))
        put("bandwidth", real_arg("JumpReLUConfig", "bandwidth", self.bandwidth, strict=True))
        put("tanh_scale", real_arg("JumpReLUConfig", "tanh_scale", self.tanh_scale, strict=True))
        put("init_threshold", real_arg("JumpReLUConfig", "init_threshold", self.init_threshold))
        if self.sparsity_loss == "quadratic":
            if self.target_l0 is None:
                raise ValueError("JumpReLUConfig: sparsity_loss='quadratic' needs target_l0 (the L0 it pulls towards)")
            put("target_l0", real_arg("JumpReLUConfig", "target_l0", self.target_l0, strict=True, maximum=self.d_sae))
        elif self.target_l0 is not None:
            raise ValueError(f"JumpReLUConfig: target_l0 belongs to sparsity_loss='quadratic', not {self.sparsity_loss!r}; "
                             "leave it None")  # fmt: skip


class JumpReLUOutput(NamedTuple):
    x_hat: Tensor  # [..., D]
    latents: Tensor  # [..., F] dense, 0 where a latent is off
    pre_acts: Tensor  # [..., F]


class TrainEncoding(NamedTuple):
    """What the objectives read: values and gates with their straight-through gradients, at `idx` (None: all F)."""

    acts: Tensor  # [N, M] pre H(pre - threshold), 0 where off (and at padding)
    gate: Tensor | None  # [N, M] H(pre - threshold) with the STE to the threshold; None unless asked for
    idx: Tensor | None  # [N, M] which latent each column is; None: the dense [N, F] path


class JumpReLUSAE(UnitNormSAE):
    """JumpReLU SAE with SAELens's jumprelu tensors: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F]."""

    architecture = "jumprelu"
    saelens_architecture = "jumprelu"  # saved as this, with the config in metadata.training_architecture_details

    config_class = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig, seed: int | None = 0):
        super().__init__(cfg, seed)
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), cfg.init_threshold))

    def pre_acts(self, x_ND: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x_ND - self.b_dec, self.W_enc)

    def forward(self, x: Tensor) -> JumpReLUOutput:
        lead = x.shape[:-1]
        flat = check_input(type(self).__name__, x, self.cfg.d_in, self.W_enc.dtype)
        pre = self.pre_acts(flat)
        latents = jumprelu(pre, self.threshold)
        x_hat = self.decode(latents).to(x.dtype)
        return JumpReLUOutput(x_hat.reshape(*lead, -1), latents.reshape(*lead, -1), pre.reshape(*lead, -1))

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., F]."""
        return self(x).latents

    def encode_train(self, x_ND: Tensor, gate: bool = False, block_size: int | None = BLOCK_SIZE) -> TrainEncoding:
        """The entries with a value or a gradient (pre > threshold - eps/2) with their straight-through gradients,
        found tile by tile (blocked.blocked_above) with block_size, else from the dense [N, F] pre (the reference);
        a batch where more than a quarter of the entries qualify (at the start) goes through dense matmuls."""
        t, eps = self.threshold, self.cfg.bandwidth
        found = None
        if block_size is not None:
            found = blocked_above((x_ND - self.b_dec).detach(), self.W_enc.detach(), self.b_enc.detach(), (t - eps / 2).detach(), block_size)
        if found is not None:
            vals, idx, valid = found
            vals = chosen_pre(x_ND, self.b_dec, self.W_enc, self.b_enc, idx, vals)
        else:
            pre_grad = self.pre_acts(x_ND)  # its graph holds no [N, F] tensor: free when the sparse path drops it
            pre = pre_grad.detach()
            with torch.no_grad():
                near = pre > t - eps / 2
            if 4 * int(near.count_nonzero()) > near.numel():  # dense regime: matmuls beat gathers
                vals, idx, valid = pre_grad, None, None
            else:
                rows, cols = near.nonzero(as_tuple=True)
                _, idx, valid = pack_rows(rows, cols, pre[rows, cols], len(pre))
                vals = gather_pre(x_ND - self.b_dec, self.W_enc, self.b_enc, idx, pre) if torch.is_grad_enabled() else pre.gather(1, idx)
        theta = t if idx is None else t[idx]
        acts = _JumpReLU.apply(vals, theta, eps)
        gates = _Step.apply(vals, theta, eps) if gate else None
        if valid is not None:  # padding: no value, and the zero factor stops its gradients
            acts = acts * valid
            gates = gates * valid if gates is not None else None
        return TrainEncoding(acts, gates, idx)

    def decode_train(self, acts: Tensor, idx: Tensor | None) -> Tensor:
        return (acts @ self.W_dec if idx is None else span_decode(acts, idx, self.W_dec, [(0, idx.shape[1])])[0]) + self.b_dec

    def after_step_(self) -> None:
        super().after_step_()
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations

    def default_objective(self) -> JumpReLUObjective:
        return JumpReLUObjective(self)


def sparsity_penalty(cfg: JumpReLUConfig, acts: Tensor, gates: Tensor | None, dec_norms: Tensor) -> Tensor:
    """l0_coef * mean over tokens of the penalty `cfg.sparsity_loss` (module docstring); dec_norms |W_dec_f| per column."""
    if cfg.sparsity_loss == "tanh":
        per_token = torch.tanh(cfg.tanh_scale * acts * dec_norms).sum(-1)
    else:
        l0 = gates.sum(-1)
        per_token = l0 if cfg.sparsity_loss == "step" else 2 / cfg.target_l0 * (l0 - cfg.target_l0) ** 2
    return cfg.l0_coef * per_token.mean()


class JumpReLUObjective:
    """FVU + the config's sparsity penalty, + pre_act_coef * the pre-activation loss on dead latents (SAELens's
    `calculate_pre_act_loss`, after Anthropic: mean over tokens of sum_dead relu(threshold - pre) |W_dec|, which
    pulls a dead latent's pre-activation up to its threshold); tracks dead latents like TopK.

    block_size: latents per encoder tile (JumpReLUSAE.encode_train), or None for the dense path (the reference); a
    compute setting, not in config_dict."""

    def __init__(self, sae: JumpReLUSAE, pre_act_coef: float = 0.0, dead_tokens: int = 10_000_000,
                 block_size: int | None = BLOCK_SIZE):  # fmt: skip
        if not isinstance(sae, JumpReLUSAE):
            raise ValueError(f"JumpReLUObjective: sae must be a JumpReLUSAE, got {type(sae).__name__}")
        self.sae = sae
        self.pre_act_coef = real_arg("JumpReLUObjective", "pre_act_coef", pre_act_coef)
        self.block_size = None if block_size is None else int_arg("JumpReLUObjective", "block_size", block_size)
        self.firing = FiringTracker(sae.cfg.d_sae, int_arg("JumpReLUObjective", "dead_tokens", dead_tokens))

    def losses(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The loss terms ({"fvu", "sparsity"} and "pre_act" when it applies) and the logs."""
        sae, cfg = self.sae, self.sae.cfg
        x = check_input(type(self).__name__, x, cfg.d_in, sae.W_enc.dtype)
        enc = sae.encode_train(x, gate=cfg.sparsity_loss != "tanh", block_size=self.block_size)
        x_hat = sae.decode_train(enc.acts, enc.idx)
        norms = sae.W_dec.norm(dim=1)
        terms = {"fvu": fvu(x_hat, x), "sparsity": sparsity_penalty(cfg, enc.acts, enc.gate, norms if enc.idx is None else norms[enc.idx])}
        on = enc.acts > 0
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=on.device)
        if enc.idx is None:
            fired |= on.any(0)
        else:
            fired[enc.idx[on]] = True
        dead = self.firing.update(fired, len(x)).to(x.device)
        if self.pre_act_coef > 0 and bool(dead.any()):
            d = dead.nonzero().squeeze(1)  # only the dead columns: cheap while few are dead
            pre_d = torch.addmm(sae.b_enc[d], x - sae.b_dec, sae.W_enc[:, d])
            terms["pre_act"] = self.pre_act_coef * ((sae.threshold[d] - pre_d).relu() * norms[d]).sum(-1).mean()
        logs = {name: v.item() for name, v in terms.items()}
        logs |= {"l0": on.sum(-1).float().mean().item(), "dead_fraction": dead.float().mean().item()}
        return terms, logs

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        terms, logs = self.losses(x)
        loss = sum(terms.values())
        logs["loss"] = loss.item()
        return loss, logs

    def config_dict(self) -> dict[str, Any]:
        return {"pre_act_coef": self.pre_act_coef, "dead_tokens": self.firing.dead_tokens}

    def state_dict(self) -> dict[str, Tensor]:
        return self.firing.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.firing.load_state_dict(state)


register_architecture("jumprelu", JumpReLUSAE, JumpReLUConfig)
