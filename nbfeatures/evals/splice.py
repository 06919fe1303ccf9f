"""Evaluate a dictionary at a site of a model: reconstruction, sparsity, and what splicing costs.

Per batch, three forward passes: clean, with the dictionary's x_hat spliced in, and with the
site zero-ablated. Sums are accumulated over all real tokens, so the numbers do not depend on
how the tokens were batched:

    ce_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)        kl = KL(P_clean || P_sae)
    fvu = sum (x - x_hat)^2 / sum (x - mean x)^2                     l0 = mean active latents per token
    ce_increase = CE_sae - CE_clean                                  alive = latents that fired at least once

A transcoder is evaluated the same way with `in_site`: it reads `in_site` and stands in at `site`
(`evaluate_sae(model, tc, "blocks.1.hook_mlp_out", tokens, in_site="blocks.1.ln2.hook_normalized")`
replaces the MLP), and fvu / mse compare its output with the clean activation at `site`. Foreign
dictionaries (SAELens, sparsify, anything with encode/decode) work through `edits.as_dictionary`.

`compare_density` sets several dictionaries side by side on the same activations: dense and dead
fractions, and for binary autoencoders also the density of deviations from each bit's usual value.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics, sites
from ..edits import Ablate, Splice, Transcode, as_dictionary
from ..harvest import token_batches


def _check_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _nll_and_kl(logits: Tensor, ref_logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token next-token NLL [B, T-1] and KL(P_ref || P) [B, T-1], zero where masked."""
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref = F.log_softmax(ref_logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - logp)).sum(-1)
    m = mask[:, 1:].float()
    return nll * m, kl * m


@torch.no_grad()
def evaluate_sae(model: sites.Model, sae: nn.Module, site: str, tokens: Any, *, in_site: str | None = None,
                 batch_size: int = 16, drop_first: bool = True, downstream: Sequence[str] = ()) -> dict[str, Any]:
    """Metrics of `sae` spliced at `site` over `tokens`; `density` is each latent's firing rate [F].

    With `in_site`, `sae` is a transcoder reading `in_site` and replacing `site` (a `Transcode`; the zero
    baseline ablates `site`). `downstream` sites (e.g. later hook_resid_pre) add `ds_mse/<site>`: mean squared error per element
    between their spliced and clean activations.
    """
    _check_size("batch_size", batch_size)
    for name, s in (("site", site), ("in_site", in_site)):
        if not (isinstance(s, str) or name == "in_site" and s is None):
            raise TypeError(f"{name} must be a site name (str), e.g. 'blocks.1.hook_resid_post'; got {type(s).__name__}")
    if isinstance(downstream, str) or not all(isinstance(d, str) for d in downstream):
        raise TypeError(f"downstream must be a list of site names, e.g. ['blocks.2.hook_resid_pre']; got {downstream!r:.80}")
    sums: dict[str, float] = dict(nll_clean=0.0, nll_sae=0.0, nll_zero=0.0, kl=0.0, n_pred=0.0, sq_err=0.0, sq=0.0,
                                  l0=0.0, n_tok=0.0, norm_ratio=0.0)
    sum_x = None
    fired = None
    ds_sq = {d: 0.0 for d in downstream}
    ds_n = 0.0
    edit = Splice(site, sae) if in_site is None else Transcode(in_site, site, sae)
    for batch in token_batches(tokens, batch_size):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        clean = sites.run(model, batch, read=[site, *downstream])
        spliced = sites.run(model, batch, [edit], read=list(downstream))
        zero = sites.run(model, batch, [Ablate(site)])
        ids, mask = ids.to(clean.logits.device), mask.to(clean.logits.device)
        for name, out in (("clean", clean), ("sae", spliced), ("zero", zero)):
            nll, kl = _nll_and_kl(out.logits, clean.logits, ids, mask)
            sums[f"nll_{name}"] += nll.sum().item()
            if name == "sae":
                sums["kl"] += kl.sum().item()
        sums["n_pred"] += mask[:, 1:].sum().item()

        keep = mask.bool().clone()
        if drop_first:
            keep[:, 0] = False
        x = clean.acts[site][keep].flatten(1).float()
        sae_out = spliced.outputs[site]
        x_hat = sae_out.x_hat[keep].flatten(1).float()
        latents = sae_out.latents[keep]
        latents = latents.reshape(len(x), -1)
        sums["sq_err"] += (x_hat - x).pow(2).sum().item()
        sums["sq"] += x.pow(2).sum().item()
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        sums["l0"] += (latents != 0).sum().item()
        sums["n_tok"] += len(x)
        sums["norm_ratio"] += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        f = (latents != 0).sum(0)
        fired = f if fired is None else fired + f
        for d in downstream:
            diff = (spliced.acts[d] - clean.acts[d])[keep].flatten(1).float()
            ds_sq[d] += diff.pow(2).sum().item()
        ds_n += len(x) * x.shape[-1]
    n = sums["n_tok"]
    if n == 0:
        raise ValueError("no tokens to evaluate")
    variance = sums["sq"] - sum_x.pow(2).sum().item() / n
    ce = {k: sums[f"nll_{k}"] / sums["n_pred"] for k in ("clean", "sae", "zero")}
    density = fired.float() / n
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
        "ce_increase": ce["sae"] - ce["clean"],
        "ce_recovered": metrics.ce_recovered(ce["clean"], ce["sae"], ce["zero"]),
        "kl": sums["kl"] / sums["n_pred"],
        "fvu": sums["sq_err"] / max(variance, 1e-12),
        "explained_variance": 1 - sums["sq_err"] / max(variance, 1e-12),
        "nmse": sums["sq_err"] / max(sums["sq"], 1e-12),
        "mse": sums["sq_err"] / (n * sum_x.numel()),
        "l0": sums["l0"] / n,
        "l2_ratio": sums["norm_ratio"] / n,
        "dead_fraction": metrics.dead_fraction(density),
        "alive": int((density > 0).sum()),
        "alive_fraction": 1 - metrics.dead_fraction(density),
        "dense_fraction": metrics.dense_fraction(density),
        "n_tokens": int(n),
        **{f"ds_mse/{d}": ds_sq[d] / ds_n for d in downstream},
        "density": density.cpu(),
    }


@torch.no_grad()
def compare_density(dictionaries: Mapping[str, nn.Module], acts_ND: Tensor, *, threshold: float = 0.1,
                    batch_size: int = 8192) -> pd.DataFrame:
    """One row per dictionary over the same activations: l0, fvu, dense / dead / alive fractions.

    `dense_fraction` counts latents firing on more than `threshold` of tokens. `deviation_dense_fraction`
    counts them by deviation from each latent's usual state (on -> off counts as firing for a bit that
    is usually on: density min(p, 1 - p)), the BAE paper's reading of binary codes.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    if not isinstance(dictionaries, Mapping) or not dictionaries:
        raise ValueError("compare_density needs a dict of at least one dictionary, e.g. {'topk': sae}")
    _check_size("batch_size", batch_size)
    if not isinstance(acts_ND, Tensor) or acts_ND.dim() != 2 or len(acts_ND) == 0:
        raise ValueError(f"acts_ND must be a [N, D] tensor of activations with N >= 1, got "
                         f"{list(acts_ND.shape) if isinstance(acts_ND, Tensor) else type(acts_ND).__name__}")
    if acts_ND.is_floating_point() and not bool(torch.isfinite(acts_ND).all()):
        raise ValueError(f"acts_ND holds {int((~torch.isfinite(acts_ND)).sum())} NaN or inf value(s); activations must be finite")
    rows = []
    for name, d in dictionaries.items():
        fired = sq_err = n = 0
        sum_x, sq = 0.0, 0.0
        d = as_dictionary(d)
        for i in range(0, len(acts_ND), batch_size):
            x = acts_ND[i:i + batch_size].float()
            out = d(x)
            fired = fired + (out.latents != 0).sum(0).double()
            sq_err += (out.x_hat - x).pow(2).sum().item()
            sum_x = sum_x + x.sum(0).double()
            sq += x.double().pow(2).sum().item()
            n += len(x)
        p = fired / n
        variance = sq - (sum_x.pow(2).sum() / n).item()
        rows.append({"dictionary": name, "d_sae": len(p), "l0": p.sum().item(), "fvu": sq_err / max(variance, 1e-12),
                     "dense_fraction": (p > threshold).double().mean().item(),
                     "deviation_dense_fraction": (torch.minimum(p, 1 - p) > threshold).double().mean().item(),
                     "dead_fraction": (p == 0).double().mean().item()})
    return pd.DataFrame(rows).set_index("dictionary")
