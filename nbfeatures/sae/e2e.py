"""End-to-end sparse dictionary learning (Braun et al. 2024): train an SAE spliced into a frozen model.

    local:   L = MSE(x_hat, x) + sparsity
    e2e:     L = KL(P_clean || P_spliced) + sparsity
    e2e+ds:  L = kl_coef * KL(P_clean || P_spliced) + sparsity + beta / L_ds * sum_k MSE(a_k spliced, a_k clean)
    kl+mse:  L = alpha * KL + MSE, alpha = (MSE / KL).detach()   (the cheap recipe: finetune a local SAE briefly)

KL direction: the clean model's next-token distribution P_clean is the target, so the loss is
KL(P_clean || P_spliced) = sum_v P_clean (log P_clean - log P_spliced), averaged over tokens. The
reference code computes this direction although its docstring says the reverse. Sparsity is
l1_coef * mean_tokens ||c||_1 / d_in for ReLU SAEs (the paper's lambda / dim) and none for TopK.
The downstream sites a_k are the residual stream entering every later block (hook_resid_pre).
Passes per step: `local` runs one clean pass stopped right after the site; the others need the
clean logits, so they run one full clean pass (no gradients) and one spliced pass.

Warm start (`warm_start_`) copies a trained local SAE into an e2e run, as the authors suggest for
e2e+ds; `finetune_kl_mse` is the cheaper recipe (Karvonen 2025): briefly finetune a local SAE on
alpha * KL + MSE. Geometry: `nearest_neighbour_cosine` of the decoder directions within one SAE.

Dimension key: B sequences, T positions, V vocab, D width at the site, F latents.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import bool_arg, int_arg, real_arg
from .. import sites
from ..edits import Splice
from ..harvest import TokenSource
from ..train import Callback, TrainConfig, train_sae
from .relu import ReLUSAE

Kind = Literal["local", "e2e", "e2e+ds", "kl+mse"]


def kl_clean_to_spliced(logits_clean: Tensor, logits_spliced: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(P_clean || P_spliced) per token, averaged over (unmasked) tokens; differentiable in logits_spliced."""
    if not isinstance(logits_clean, Tensor) or not isinstance(logits_spliced, Tensor) or logits_clean.shape != logits_spliced.shape:
        raise ValueError(f"kl_clean_to_spliced: logits_clean and logits_spliced must be tensors of one shape [..., V], got "
                         f"{list(getattr(logits_clean, 'shape', []))} and {list(getattr(logits_spliced, 'shape', []))}")  # fmt: skip
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != logits_clean.shape[:-1]):
        raise ValueError(f"kl_clean_to_spliced: mask must be a tensor of shape {list(logits_clean.shape[:-1])}, "
                         f"got {list(getattr(mask, 'shape', []))}")  # fmt: skip
    lp = F.log_softmax(logits_clean.float(), dim=-1)
    lq = F.log_softmax(logits_spliced.float(), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def downstream_sites(model: sites.Model, site: str) -> list[str]:
    """hook_resid_pre of every block after the one the site writes into (empty for the last block)."""
    if not isinstance(site, str):
        raise ValueError(f"downstream sites need a site name like blocks.2.hook_resid_pre; got {site!r}")
    n_layers = sum(1 for n in sites.site_names(model) if re.fullmatch(r"blocks\.\d+\.hook_resid_pre", n))
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", site)
    if not m or n_layers <= 0:
        raise ValueError(f"downstream sites need a TransformerLens block site like blocks.2.hook_resid_pre; got {site!r}")
    block, hook = int(m.group(1)), m.group(2)
    first = block + 2 if hook == "hook_resid_post" else block + 1
    return [f"blocks.{j}.hook_resid_pre" for j in range(first, n_layers)]


class E2EObjective:
    """Loss for an SAE spliced at `site` of a frozen `model`; batches are token ids [B, T].

    The model's parameters are frozen (requires_grad off), so only the SAE learns. The clean
    pass runs without gradients and, for `local`, stops after the site.
    """

    def __init__(self, model: sites.Model, sae: nn.Module, site: str, kind: Kind = "e2e", *, l1_coef: float = 0.0,
                 kl_coef: float | None = None, beta: float = 0.0, mask_first: bool = True):
        if kind not in ("local", "e2e", "e2e+ds", "kl+mse"):
            raise ValueError(f"kind must be 'local', 'e2e', 'e2e+ds' or 'kl+mse'; got {kind!r}")
        l1_coef, beta = real_arg("E2EObjective", "l1_coef", l1_coef), real_arg("E2EObjective", "beta", beta)
        if kl_coef is not None:
            kl_coef = real_arg("E2EObjective", "kl_coef", kl_coef)
        bool_arg("E2EObjective", "mask_first", mask_first)
        if not isinstance(sae, nn.Module):
            raise ValueError(f"E2EObjective: sae must be a dictionary module (an nn.Module), got {type(sae).__name__}")
        if not isinstance(site, str):
            raise ValueError(f"E2EObjective: site must be one site name, got {site!r}")
        if kind == "e2e+ds" and beta == 0:
            raise ValueError("kind='e2e+ds' needs beta > 0 (the downstream MSE weight)")
        sites.resolve(model, site)
        self.model, self.sae, self.site, self.kind = model, sae, site, kind
        self.l1_coef, self.beta, self.mask_first = l1_coef, beta, mask_first
        self.kl_coef = kl_coef if kl_coef is not None else (0.5 if kind == "e2e+ds" else 1.0)
        self.downstream = downstream_sites(model, site) if kind == "e2e+ds" else []
        self._width_checked = False
        for p in sites.unwrap(model).parameters():
            p.requires_grad_(False)

    def config_dict(self) -> dict:
        return {"site": self.site, "kind": self.kind, "l1_coef": self.l1_coef, "kl_coef": self.kl_coef, "beta": self.beta,
                "mask_first": self.mask_first, "downstream": self.downstream}

    def _check_width(self, x: Tensor) -> None:
        d_in = getattr(getattr(self.sae, "cfg", None), "d_in", None)
        if d_in is not None and x.shape[-1] != d_in:
            raise ValueError(f"the SAE has d_in={d_in} but site {self.site} has width {x.shape[-1]}; "
                             f"build it with d_in={x.shape[-1]} or pick a site of width {d_in}")
        self._width_checked = True

    def __call__(self, tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        if self.mask_first:
            mask[:, 0] = False  # the first position's activation norm dwarfs the rest
        with torch.no_grad():
            if self.kind == "local":
                clean_acts, clean_logits = sites.read_acts(self.model, tokens, self.site), None
            else:
                clean = sites.run(self.model, tokens, read=[self.site, *self.downstream])
                clean_acts, clean_logits = clean.acts, clean.logits
        x = clean_acts[self.site]
        if not self._width_checked:
            self._check_width(x)
        logs: dict[str, float] = {}
        if self.kind == "local":
            out = self.sae(x)
        else:
            spliced = sites.run(self.model, tokens, [Splice(self.site, self.sae)], read=self.downstream)
            out = spliced.outputs[self.site]
            kl = kl_clean_to_spliced(clean_logits, spliced.logits, mask)
            logs["kl"] = kl.item()
        m = mask[..., None].to(x.dtype)
        mse = ((out.x_hat - x).pow(2) * m).sum() / (m.sum() * x.shape[-1])
        logs["mse"] = mse.item()
        if self.kind == "local":
            loss = mse
        elif self.kind == "kl+mse":
            loss = (mse / kl.clamp_min(1e-12)).detach() * kl + mse
        else:
            loss = self.kl_coef * kl
        if self.downstream:
            ds = [((spliced.acts[s] - clean_acts[s]).pow(2) * m).sum() / (m.sum() * x.shape[-1]) for s in self.downstream]
            loss = loss + self.beta / len(ds) * torch.stack(ds).sum()
            logs.update({f"ds_mse/{s}": d.item() for s, d in zip(self.downstream, ds)})
        latents = out.latents
        if isinstance(self.sae, ReLUSAE) and self.l1_coef > 0:
            l1 = (latents.abs().sum(-1) * mask).sum() / mask.sum() / x.shape[-1]
            loss = loss + self.l1_coef * l1
            logs["l1"] = l1.item()
        with torch.no_grad():
            logs["l0"] = ((latents != 0).sum(-1).float() * mask).sum().item() / mask.sum().item()
            logs["fvu"] = (((out.x_hat - x).pow(2) * m).sum() / ((x - (x * m).sum((0, 1)) / m.sum()).pow(2) * m).sum()).item()
        logs["loss"] = loss.item()
        return loss, logs


@torch.no_grad()
def warm_start_(sae: nn.Module, local: nn.Module) -> nn.Module:
    """Copy a trained (local) SAE's parameters into `sae`, which then starts its e2e run from them."""
    if type(sae) is not type(local):
        raise ValueError(f"warm start needs the same kind of dictionary; got {type(local).__name__} into {type(sae).__name__}")
    mine, theirs = sae.state_dict(), local.state_dict()
    wrong = [f"{k}: {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items() if k not in theirs or theirs[k].shape != v.shape]
    if wrong:
        raise ValueError(f"warm start: the local SAE's widths do not match ({'; '.join(wrong)}); "
                         f"build the e2e SAE with the local one's config ({getattr(local, 'cfg', None)})")
    cfg_a, cfg_b = getattr(sae, "cfg", None), getattr(local, "cfg", None)
    if cfg_a != cfg_b:
        raise ValueError(f"warm start: configs differ ({cfg_b} vs {cfg_a}); allowed only identical configs")
    sae.load_state_dict(theirs)
    return sae


def finetune_kl_mse(model: sites.Model, local: nn.Module, site: str, tokens: Tensor, cfg: TrainConfig, *,
                    callbacks: Sequence[Callback] = (), progress: bool = True) -> tuple[nn.Module, Any]:
    """The cheap recipe: a copy of `local` finetuned on alpha * KL + MSE over token windows [N, T].

    Karvonen (2025) runs it over the last few percent of training at a small learning rate (5e-5
    at GPT-2 scale); returns (finetuned SAE, history). `local` itself is left untouched.
    """
    sae = copy.deepcopy(local)
    objective = E2EObjective(model, sae, site, "kl+mse")
    history = train_sae(sae, TokenSource(tokens, cfg.batch_size, cfg.seed), cfg, objective=objective,
                        callbacks=callbacks, progress=progress)
    return sae, history


@torch.no_grad()
def nearest_neighbour_cosine(W_dec_FD: Tensor, chunk: int = 4096) -> Tensor:
    """[F]: each decoder direction's largest cosine similarity with another direction of the same SAE."""
    if not isinstance(W_dec_FD, Tensor) or W_dec_FD.dim() != 2 or not W_dec_FD.is_floating_point() or len(W_dec_FD) < 2:
        raise ValueError(f"nearest_neighbour_cosine: W_dec must be a float tensor [F, D] with F >= 2, got "
                         f"{type(W_dec_FD).__name__} {list(getattr(W_dec_FD, 'shape', []))}")  # fmt: skip
    int_arg("nearest_neighbour_cosine", "chunk", chunk)
    W = torch.nn.functional.normalize(W_dec_FD.float(), dim=-1)
    out = torch.empty(len(W))
    for i in range(0, len(W), chunk):
        cos = W[i:i + chunk] @ W.t()
        cos[torch.arange(cos.shape[0]), torch.arange(i, i + cos.shape[0])] = -2.0  # not itself
        out[i:i + chunk] = cos.max(dim=1).values.cpu()
    return out
