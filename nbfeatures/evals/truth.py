"""Ground-truth evaluations: a dictionary's latents against what was planted (labels, hierarchies, directions).

    detection   per concept, the latent with the best F1 on one half of the tokens, scored on the other half
    absorption  parent-positive tokens where the parent latent is silent and a latent specific to the child fires
    probing     logistic regression on the k latents of largest mean difference, test accuracy
    mcc, cosine planted factors against latents (matched one to one), planted directions against decoder rows

Pure functions of tensors, no model: pass latents harvested on held-out tokens and labels from a corpus
(`StoryCorpus.concept_labels`, `StoryCorpus.child_labels`); a baseline is the same call on an untrained
dictionary's latents (`compare_detection` sets them side by side). Splits are seeded halves of the tokens.

Dimension key: N tokens, F latents, D input dim, G planted factors, C children of a parent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import metrics
from .._checks import ArgumentTypeError, check_int, check_number

# ---------------------------------------------------------------- inputs and splits


def _latents(z, name: str = "latents_NF") -> Tensor:
    """[N, F] float (or [..., F], flattened to tokens); a NaN would silently count as not firing."""
    if not isinstance(z, Tensor) or z.dim() < 2 or z.shape[-1] == 0:
        got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ArgumentTypeError(f"{name} must be a [N, F] tensor with F >= 1 columns, got {got}")
    if z.is_floating_point() and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} holds {int((~torch.isfinite(z)).sum())} NaN or inf value(s); it must be finite (0 when off)")
    return z.detach().reshape(-1, z.shape[-1]).float()


def _labels(labels, n: int, *, kind: str = "bool") -> dict[str, Tensor]:
    """Each label flattened to [N]: bool per token, or (kind "child") a long child index with -1 for none."""
    if not isinstance(labels, Mapping) or not labels:
        raise ArgumentTypeError(f"labels must be a non-empty dict of name -> [N] tensor, got {type(labels).__name__}")
    out = {}
    for name, y in labels.items():
        ok = isinstance(y, Tensor) and (y.dtype == torch.bool if kind == "bool" else
                                        not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool))
        if not ok:
            allowed = "a bool tensor (True where the concept is present)" if kind == "bool" else \
                "an integer tensor of child indices (-1 where the parent is absent)"
            raise ArgumentTypeError(f"labels[{name!r}] must be {allowed}, got {getattr(y, 'dtype', type(y).__name__)}")
        if y.numel() != n:
            raise ValueError(f"labels[{name!r}] has {y.numel()} tokens but latents_NF has {n}; they must cover the same tokens")
        if kind != "bool" and y.numel() and int(y.min()) < -1:
            raise ValueError(f"labels[{name!r}] must hold child indices >= 0 or -1 (no child), got min {int(y.min())}")
        out[name] = y.reshape(-1).cpu()
    return out


def split_halves(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two disjoint halves of range(n), each sorted, from a seeded permutation: (select, score)."""
    n, seed = check_int("n", n, 2), check_int("seed", seed, 0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2].sort().values, perm[n // 2:].sort().values


def _halves(name: str, y_N: Tensor, select: Tensor, score: Tensor) -> None:
    for half, idx in (("selection", select), ("scoring", score)):
        if not bool(y_N[idx].any()):
            raise ValueError(f"{name!r} has no positive token in the {half} half ({int(y_N.sum())} in all); "
                             "every concept needs positives in both halves: pass more tokens")


def _best_f1(z_NF: Tensor, y_N: Tensor, best_threshold: bool) -> tuple[Tensor, Tensor]:
    """Per latent, the F1 of `z > threshold` against y_N, and the threshold: 0, or the best cut of the sorted values."""
    y, n_pos = y_N.float(), y_N.sum().float()
    if not best_threshold:
        fires = (z_NF > 0).float()
        return 2 * (y @ fires) / (fires.sum(0) + n_pos), torch.zeros(z_NF.shape[1])
    rank = torch.arange(1, len(y) + 1, dtype=torch.float)[:, None]
    f1s, thresholds = [], []
    for i in range(0, z_NF.shape[1], 256):  # chunks bound the [N, F] sort's memory
        v, order = z_NF[:, i:i + 256].sort(0, descending=True)
        f1 = 2 * y[order].cumsum(0) / (rank + n_pos)  # keep the top r tokens: tp = cumsum, predicted = r
        cut = torch.cat([v[:-1] > v[1:], torch.ones_like(v[:1], dtype=torch.bool)])  # no cut inside a tie
        best = torch.where(cut, f1, -1.0).argmax(0)
        at, below = v.gather(0, best[None])[0], v.gather(0, (best + 1).clamp_max(len(v) - 1)[None])[0]
        mid = (at + below) / 2
        thr = torch.where(mid < at, mid, below)  # two adjacent floats have no midpoint between them
        thresholds.append(torch.where(best == len(v) - 1, torch.tensor(-float("inf")), thr))
        f1s.append(f1.gather(0, best[None])[0])
    return torch.cat(f1s), torch.cat(thresholds)


# ---------------------------------------------------------------- (a) concept detection


@dataclass(frozen=True)
class Detection:
    """One row per concept: latent, threshold, f1_select, f1 (held out), precision, recall, n_pos (held out)."""

    table: pd.DataFrame

    @property
    def mean_f1(self) -> float:
        return float(self.table["f1"].mean())


def concept_detection(latents_NF: Tensor, labels: Mapping[str, Tensor], *, seed: int = 0,
                      best_threshold: bool = False) -> Detection:
    """Per concept, the latent with the best F1 on the selection half, scored on the other half.

    The single-latent classifier of Chanin et al. 2024 ("A is for Absorption", the main latent by F1) and
    SAEBench's k=1 sparse probe; the untrained-dictionary baseline follows Cunningham et al. 2023 ("Sparse
    Autoencoders Find Highly Interpretable Features in Language Models"). A latent fires when > 0; with
    `best_threshold`, above a threshold per latent chosen on the selection half (for dense latents).
    """
    z = _latents(latents_NF).cpu()
    labels = _labels(labels, len(z))
    select, score = split_halves(len(z), seed)
    rows = {}
    for name, y in labels.items():
        _halves(name, y, select, score)
        f1_F, thr_F = _best_f1(z[select], y[select], bool(best_threshold))
        j = int(f1_F.argmax())
        fires, truth = z[score, j] > thr_F[j], y[score]
        tp = int((fires & truth).sum())
        rows[name] = dict(latent=j, threshold=float(thr_F[j]), f1_select=float(f1_F[j]),
                          f1=2 * tp / (int(fires.sum()) + int(truth.sum())), precision=tp / max(int(fires.sum()), 1),
                          recall=tp / int(truth.sum()), n_pos=int(truth.sum()))
    return Detection(pd.DataFrame.from_dict(rows, orient="index").rename_axis("concept"))


def compare_detection(latents: Mapping[str, Tensor], labels: Mapping[str, Tensor], *, seed: int = 0,
                      best_threshold: bool = False) -> pd.DataFrame:
    """Held-out F1 per concept (rows, then "mean") of several dictionaries (columns) on one split,
    e.g. {"trained": z, "untrained": z0}: the trained dictionary against its random baseline."""
    if not isinstance(latents, Mapping) or not latents:
        raise ArgumentTypeError("latents must be a dict of name -> [N, F] latents, e.g. {'trained': z, 'untrained': z0}")
    cols = {k: concept_detection(z, labels, seed=seed, best_threshold=best_threshold).table["f1"] for k, z in latents.items()}
    table = pd.DataFrame(cols)
    table.loc["mean"] = table.mean()
    return table


# ---------------------------------------------------------------- (b) feature absorption


@dataclass(frozen=True)
class Absorption:
    """`parents`: latent, f1_select, n, recall, absorption per parent; `children`: n, recall, absorption, absorbers."""

    parents: pd.DataFrame
    children: pd.DataFrame

    @property
    def mean(self) -> float:
        return float(self.parents["absorption"].mean())


def absorption(latents_NF: Tensor, children: Mapping[str, Tensor], W_dec_FD: Tensor, *,
               directions: Mapping[str, Tensor] | None = None, precision: float = 0.9, min_cos: float = 0.0,
               seed: int = 0, child_names: Mapping[str, Sequence[str]] | None = None) -> Absorption:
    """Full feature absorption per parent and child (Chanin et al. 2024, "A is for Absorption"; SAEBench).

    `children[p]` is each token's child index under parent p (-1: not a p token). On the selection half the
    parent latent is the one with the best F1 on "some child", and a latent absorbs child c when it fires with
    precision >= `precision` on c and its decoder row has cosine > `min_cos` with the parent direction
    (`directions[p]`, e.g. a probe; by default the parent latent's decoder row). On the scoring half,
    absorption = fraction of parent tokens where the parent latent is 0 and an absorber of the token's child
    fires. Simplified from SAEBench: ground-truth labels replace the probe's true positives and the absorber's
    precision on its child replaces the share of the probe projection (we hold labels, not activations).
    """
    z = _latents(latents_NF).cpu()
    children = _labels(children, len(z), kind="child")
    if not isinstance(W_dec_FD, Tensor) or W_dec_FD.dim() != 2 or len(W_dec_FD) != z.shape[1]:
        raise ValueError(f"W_dec_FD must be [F, D] with F = {z.shape[1]} rows like latents_NF, "
                         f"got {list(W_dec_FD.shape) if isinstance(W_dec_FD, Tensor) else type(W_dec_FD).__name__}")
    if not 0 < check_number("precision", precision) <= 1 or not -1 <= check_number("min_cos", min_cos) < 1:
        raise ValueError(f"need 0 < precision <= 1 and -1 <= min_cos < 1, got precision={precision}, min_cos={min_cos}")
    for what, given in (("directions", directions), ("child_names", child_names)):
        if given is not None and (not isinstance(given, Mapping) or set(children) - set(given)):
            raise ValueError(f"{what} must be a dict with an entry for every parent {sorted(children)}, got "
                             f"{sorted(given) if isinstance(given, Mapping) else type(given).__name__}")
    unit_FD = F.normalize(W_dec_FD.detach().float().cpu(), dim=-1)
    select, score = split_halves(len(z), seed)
    fires = z > 0
    parents, kids = {}, {}
    for p, child in children.items():
        _halves(p, child >= 0, select, score)
        f1_F, _ = _best_f1(z[select], child[select] >= 0, False)
        main = int(f1_F.argmax())
        d = unit_FD[main] if directions is None else F.normalize(torch.as_tensor(directions[p]).float().cpu().reshape(-1), dim=0)
        if d.shape != unit_FD.shape[1:]:
            raise ValueError(f"directions[{p!r}] must be a [D] = [{unit_FD.shape[1]}] vector like W_dec_FD's rows, got {d.numel()} values")
        n_child = len(child_names[p]) if child_names is not None else int(child.max()) + 1
        if int(child.max()) >= n_child:
            raise ValueError(f"children[{p!r}] holds child index {int(child.max())}; child_names[{p!r}] names {n_child}")
        onehot_NC = F.one_hot(child[select].clamp_min(0), n_child).bool() & (child[select] >= 0)[:, None]
        prec_FC, _ = metrics.precision_recall(fires[select], onehot_NC)
        absorber_FC = (prec_FC >= precision) & (unit_FD @ d > min_cos)[:, None]
        absorber_FC[main] = False
        on = score[child[score] >= 0]
        c_M = child[on]
        main_on = fires[on, main]
        absorbed = ~main_on & (fires[on] & absorber_FC[:, c_M].t()).any(1)
        parents[p] = dict(latent=main, f1_select=float(f1_F[main]), n=len(on), recall=float(main_on.float().mean()),
                          absorption=float(absorbed.float().mean()), n_absorbers=int(absorber_FC.any(1).sum()))
        for c in range(n_child):
            m = c_M == c
            name = child_names[p][c] if child_names else c
            kids[(p, name)] = dict(n=int(m.sum()), recall=float(main_on[m].float().mean()) if m.any() else float("nan"),
                                   absorption=float(absorbed[m].float().mean()) if m.any() else float("nan"),
                                   absorbers=tuple(absorber_FC[:, c].nonzero()[:, 0].tolist()))
    kids_df = pd.DataFrame.from_dict(kids, orient="index")
    kids_df.index = pd.MultiIndex.from_tuples(kids_df.index, names=["parent", "child"])
    return Absorption(pd.DataFrame.from_dict(parents, orient="index").rename_axis("parent"), kids_df)


# ---------------------------------------------------------------- (c) sparse probing


def _fit_logistic(X_NK: Tensor, y_N: Tensor, steps: int, l2: float):
    """Class-balanced, standardised logistic regression by L-BFGS; returns a predict function."""
    mu, sd = X_NK.mean(0), X_NK.std(0).clamp_min(1e-6)
    Xs_NK, y = (X_NK - mu) / sd, y_N.float()
    w, b = torch.zeros(X_NK.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    pos_weight = (~y_N).sum() / y_N.sum()  # weighs positives like negatives: rare concepts are the point
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(Xs_NK @ w + b, y, pos_weight=pos_weight)
        (loss + l2 * w.square().sum()).backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda X: ((X - mu) / sd @ w + b).detach() > 0


def sparse_probing(latents_NF: Tensor, labels: Mapping[str, Tensor], *, ks: Sequence[int] = (1, 2, 5), seed: int = 0,
                   steps: int = 100, l2: float = 1e-3) -> pd.DataFrame:
    """Per concept and k: a logistic probe on the k latents of largest mean difference, scored on held-out tokens.

    Gurnee et al. 2023 ("Finding Neurons in a Haystack") and SAEBench's sparse probing: latents ranked by
    mean(z | positive) - mean(z | negative) on the training half, the probe fit there (class-balanced,
    standardised, L2 `l2`, L-BFGS for `steps` iterations), accuracy and balanced accuracy on the other half.
    Rows (concept, k): latents, accuracy, balanced_accuracy.
    """
    z = _latents(latents_NF).cpu()
    labels = _labels(labels, len(z))
    if isinstance(ks, (int, str)) or not len(ks):
        raise ArgumentTypeError(f"ks must be a list of probe sizes, e.g. (1, 2, 5); got {ks!r}")
    ks = [check_int("each k in ks", k, 1, z.shape[1]) for k in ks]
    steps, l2 = check_int("steps", steps, 1), check_number("l2", l2, 0)
    train, test = split_halves(len(z), seed)
    rows = {}
    for name, y in labels.items():
        _halves(name, y, train, test)
        if bool(y[train].all()) or bool(y[test].all()):
            raise ValueError(f"{name!r} is present on every token of a half; a probe needs negatives too")
        zt, yt = z[train], y[train]
        diff_F = zt[yt].mean(0) - zt[~yt].mean(0)
        order = diff_F.argsort(descending=True, stable=True)
        for k in ks:
            keep = order[:k]
            pred = _fit_logistic(zt[:, keep], yt, steps, l2)(z[test][:, keep])
            truth = y[test]
            tpr, tnr = (pred & truth).sum() / truth.sum(), (~pred & ~truth).sum() / (~truth).sum()
            rows[(name, k)] = dict(latents=tuple(keep.tolist()), accuracy=float((pred == truth).float().mean()),
                                   balanced_accuracy=float((tpr + tnr) / 2))
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=["concept", "k"])
    return out


# ---------------------------------------------------------------- (d) planted directions


def planted_directions(n: int, d_in: int, n_factors: int, p_active: float = 0.05, *,
                       seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """x_ND = factors_NG @ directions_GD: random unit directions, each active with probability p_active at U(0.5, 1.5)."""
    n, d_in, n_factors = check_int("n", n, 1), check_int("d_in", d_in, 1), check_int("n_factors", n_factors, 1)
    if not 0 < check_number("p_active", p_active) <= 1:
        raise ValueError(f"p_active must lie in (0, 1] (the chance a factor is on), got {p_active}")
    g = torch.Generator().manual_seed(check_int("seed", seed, 0))
    directions_GD = F.normalize(torch.randn(n_factors, d_in, generator=g), dim=-1)
    on_NG = torch.rand(n, n_factors, generator=g) < p_active
    factors_NG = on_NG * (torch.rand(n, n_factors, generator=g) + 0.5)
    return factors_NG @ directions_GD, factors_NG, directions_GD


def best_cosine(directions_GD: Tensor, W_dec_FD: Tensor) -> dict[str, float]:
    """Mean best cosine both ways: "true_to_decoder" (each planted direction found; `metrics.recovery`) and
    "decoder_to_true" (each decoder row a planted direction): the mean max cosine similarity of Sharkey et al.
    2022 ("Taking features out of superposition with sparse autoencoders")."""
    forward = metrics.recovery(directions_GD, W_dec_FD)  # checks the shapes too
    true_GD, W_dec_FD = (torch.as_tensor(t).detach().float() for t in (directions_GD, W_dec_FD))
    cos = F.normalize(W_dec_FD, dim=-1) @ F.normalize(true_GD, dim=-1).t()
    return {"true_to_decoder": forward, "decoder_to_true": cos.max(dim=1).values.mean().item()}


def _greedy_match(score_GF: Tensor) -> list[tuple[int, int]]:
    """Pairs (row, col) taken best first, each row and column once: the fallback for a Hungarian matching."""
    used_r, used_c, pairs = set(), set(), []
    for flat in score_GF.flatten().argsort(descending=True, stable=True).tolist():
        r, c = divmod(flat, score_GF.shape[1])
        if r not in used_r and c not in used_c:
            used_r.add(r), used_c.add(c), pairs.append((r, c))
    return pairs


def mcc(factors_NG: Tensor, latents_NF: Tensor) -> dict:
    """Mean correlation coefficient (Khemakhem et al. 2020; SynthSAEBench): |Pearson r| between each planted
    factor and the latent matched to it one to one (Hungarian, scipy's linear_sum_assignment when scipy is
    installed, else greedy best-first), averaged over factors; an unmatched factor (F < G) counts 0.
    Returns {"mcc", "latents": matched latent per factor (-1: none), "corr": |r| per factor}."""
    z, f = _latents(latents_NF).double(), _latents(factors_NG, "factors_NG").double()
    if len(f) != len(z) or len(z) < 2:
        raise ValueError(f"factors_NG and latents_NF must cover the same N >= 2 tokens, got {len(f)} and {len(z)}")
    unit = lambda a: (a - a.mean(0)) / (a - a.mean(0)).norm(dim=0).clamp_min(1e-12)  # noqa: E731 - constant -> r = 0
    corr_GF = (unit(f).t() @ unit(z)).abs().clamp_max(1.0)  # rounding can overshoot 1
    try:
        from scipy.optimize import linear_sum_assignment  # optional: not a dependency of nbfeatures

        pairs = list(zip(*(a.tolist() for a in linear_sum_assignment(corr_GF.numpy(), maximize=True))))
    except ImportError:
        pairs = _greedy_match(corr_GF)
    latent_G, r_G = [-1] * len(corr_GF), [0.0] * len(corr_GF)
    for g, j in pairs:
        latent_G[g], r_G[g] = j, float(corr_GF[g, j])
    return {"mcc": sum(r_G) / len(r_G), "latents": latent_G, "corr": r_G}
