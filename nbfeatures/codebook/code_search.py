"""Finding codes (or latents) for a concept: which ones fire where the concept holds.

    target[n] = 1 where the concept holds (a regex's capture group over the decoded text, or a label)
    precision(c) = P(target | c fires)            recall(c) = P(c fires | target)
    neuron baseline: threshold each neuron (either sign) so it reaches the same recall; best precision

Dimension key: B sequences, T positions, N tokens (flattened), G groups, K codes per token, D neurons.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from .model import CodebookModel
from .search import check_int
from ..harvest import token_batches


def _check_codes(codes: Any, n_codes: int, lead: tuple[int, ...] | None = None) -> None:
    """codes: an integer tensor [B, T, (G,) K] with ids in [0, n_codes)."""
    check_int("n_codes", n_codes, 1)
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.dtype == torch.bool or codes.dim() not in (3, 4):
        raise ValueError(f"codes must be an integer tensor [B, T, K] or [B, T, G, K], got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} {list(getattr(codes, 'shape', []))}")  # fmt: skip
    if lead is not None and tuple(codes.shape[:2]) != tuple(lead):
        raise ValueError(f"codes [B, T, ...] = {list(codes.shape)} must match the targets/labels [B, T] = {list(lead)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n_codes):
        raise ValueError(f"codes must lie in [0, n_codes={n_codes}), got {int(codes.min())}..{int(codes.max())}")


def _check_acts(acts_ND: Any) -> None:
    if not isinstance(acts_ND, Tensor) or not acts_ND.is_floating_point() or acts_ND.dim() < 2 or not len(acts_ND):
        raise ValueError(f"acts must be a float tensor [N, D] (or [N, ...]), got {getattr(acts_ND, 'dtype', type(acts_ND).__name__)} "
                         f"{list(getattr(acts_ND, 'shape', []))}")  # fmt: skip
    if not bool(torch.isfinite(acts_ND).all()):
        raise ValueError(f"acts hold {int((~torch.isfinite(acts_ND)).sum())} non-finite values (NaN or inf); only finite activations can be thresholded")


@torch.no_grad()
def collect_codes(cb: CodebookModel, tokens: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
    """Codes chosen at every site for every token: site -> [B, T, (G,) K]."""
    if not isinstance(cb, CodebookModel):
        raise TypeError(f"collect_codes takes a CodebookModel, got {type(cb).__name__}")
    check_int("batch_size", batch_size, 1)
    out: dict[str, list[Tensor]] = {s: [] for s in cb.sites}
    for batch in token_batches(tokens, batch_size):
        run = cb.run(batch["input_ids"])
        for s in cb.sites:
            out[s].append(run.outputs[s].codes.cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def codes_frame(codes: Mapping[str, Any], tokens: Sequence[Sequence[str]] | None = None) -> pd.DataFrame:
    """Which code fired where, one row per (sequence, position, site, group, slot), best slot first.

    `codes`: site -> codes [B, T, (G,) K] (as `collect_codes` returns) or -> a CodebookOutput (as in
    `CodebookModel.run(...).outputs`, which adds each code's cosine `sim`). `tokens[b][t]`: token strings.
    """
    frames = []
    for site, c in codes.items():
        sims = getattr(c, "sims", None)
        ids = getattr(c, "codes", c)
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dim() not in (3, 4):
            raise ValueError(f"codes[{site!r}] must be integer codes [B, T, K] or [B, T, G, K] (or a CodebookOutput), "
                             f"got {getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")
        grid = ids if ids.dim() == 4 else ids[:, :, None]  # [B, T, G, K]
        B, T, G, K = grid.shape
        idx = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (B, T, G, K)), indexing="ij"), -1).reshape(-1, 4)
        df = pd.DataFrame({"seq": idx[:, 0].numpy(), "pos": idx[:, 1].numpy(), "site": site, "group": idx[:, 2].numpy(),
                           "slot": idx[:, 3].numpy(), "code": grid.reshape(-1).cpu().numpy()})
        if sims is not None:
            df["sim"] = (sims if sims.dim() == 4 else sims[:, :, None]).reshape(-1).detach().float().cpu().numpy()
        frames.append(df)
    if not frames:
        raise ValueError("codes is empty: pass at least one site")
    out = pd.concat(frames, ignore_index=True)
    if tokens is not None:
        B, T = int(out.seq.max()) + 1, int(out.pos.max()) + 1
        if len(tokens) < B or any(len(tokens[b]) < T for b in range(B)):
            raise ValueError(f"tokens must give {T} token strings for each of {B} sequences")
        out.insert(2, "token", [tokens[b][t] for b, t in zip(out.seq, out.pos)])
    return out


def regex_targets(texts: Sequence[Sequence[str]], pattern: str) -> Tensor:
    """Bool [B, T]: the token holding the start of each match's first capture group (or of the match).

    `texts[b]` is sequence b's tokens as strings; they are joined without separators, so write the
    pattern against the concatenated text (e.g. TokFSM states as digit pairs: r"(?:\\d\\d)*?(4)0").
    """
    if isinstance(texts, str) or not len(texts) or not all(isinstance(t, (list, tuple)) and all(isinstance(x, str) for x in t) for t in texts):
        raise ValueError("texts must be a non-empty list of sequences, each a list of token strings")
    try:
        rx = re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {err}") from err
    T = max(len(t) for t in texts)
    out = torch.zeros(len(texts), T, dtype=torch.bool)
    for b, toks in enumerate(texts):
        starts, pos = [], 0
        for tok in toks:
            starts.append(pos)
            pos += len(tok)
        text = "".join(toks)
        owner = torch.bucketize(torch.arange(len(text)), torch.tensor(starts), right=True) - 1
        for m in rx.finditer(text):
            at = m.start(1) if rx.groups else m.start()
            if at < len(text):
                out[b, owner[at]] = True
    return out


def rank_codes(codes: Tensor, target: Tensor, n_codes: int, min_count: int = 1) -> pd.DataFrame:
    """Codes ranked by precision then recall as detectors of `target` [B, T] (codes [B, T, (G,) K])."""
    if not isinstance(target, Tensor) or target.dim() != 2:
        raise ValueError(f"target must be a bool tensor [B, T], got {getattr(target, 'dtype', type(target).__name__)} {list(getattr(target, 'shape', []))}")
    _check_codes(codes, n_codes, tuple(target.shape))
    check_int("min_count", min_count, 0)
    B, T = target.shape
    grouped = codes.dim() == 4
    c = codes.reshape(B * T, -1 if not grouped else codes.shape[2], codes.shape[-1]) if grouped else codes.reshape(B * T, 1, -1)
    G = c.shape[1]
    t = target.reshape(-1).float()
    fires = torch.zeros(B * T, G * n_codes).scatter_(1, (c + torch.arange(G)[None, :, None] * n_codes).reshape(B * T, -1), 1.0)
    count = fires.sum(0)
    hits = fires.t() @ t
    keep = (count >= min_count).nonzero().flatten()
    df = pd.DataFrame({
        "group": (keep // n_codes).numpy(), "code": (keep % n_codes).numpy(),
        "precision": (hits[keep] / count[keep]).numpy(), "recall": (hits[keep] / t.sum().clamp_min(1)).numpy(),
        "count": count[keep].long().numpy(),
    })
    if not grouped:
        df = df.drop(columns="group")
    return df.sort_values(["precision", "recall"], ascending=False).reset_index(drop=True)


def best_code_per_label(codes: Tensor, labels: Tensor, n_codes: int, n_labels: int | None = None) -> pd.DataFrame:
    """For every label value (e.g. each of 100 FSM states), the code that best detects it, by F1.

    `codes` [B, T, (G,) K], `labels` long [B, T] with -1 where no label holds. One pass for all labels:
    hits[label, code] by bincount; precision = hits / fires(code), recall = hits / count(label).
    """
    _check_codes(codes, n_codes)
    if not isinstance(labels, Tensor) or labels.shape != codes.shape[:2] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape {list(codes.shape[:2])} (-1: no label), "
                         f"got {labels.dtype} {list(labels.shape)}")
    L = int(labels.max()) + 1 if n_labels is None else check_int("n_labels", n_labels, 1)
    if L <= 0:
        raise ValueError("labels holds no label (all -1)")
    if int(labels.min()) < -1 or int(labels.max()) >= L:
        raise ValueError(f"labels must lie in [0, n_labels={L}) or be -1 (no label), got {int(labels.min())}..{int(labels.max())}")
    N = labels.numel()
    c = codes.reshape(N, -1, codes.shape[-1]) if codes.dim() == 4 else codes.reshape(N, 1, -1)
    G = c.shape[1]
    ids_NGK = (c + torch.arange(G)[None, :, None] * n_codes).sort(-1).values  # one id space over all groups
    once = torch.ones_like(ids_NGK, dtype=torch.bool)
    once[..., 1:] = ids_NGK[..., 1:] != ids_NGK[..., :-1]  # a code in two of a token's k slots fires once there
    fires = torch.bincount(ids_NGK[once], minlength=G * n_codes).float()
    lab = labels.reshape(N, 1, 1).expand_as(ids_NGK)
    on = (lab >= 0) & once
    hits = torch.bincount((lab[on] * G * n_codes + ids_NGK[on]), minlength=L * G * n_codes).reshape(L, G * n_codes).float()
    support = torch.bincount(labels.reshape(-1)[labels.reshape(-1) >= 0], minlength=L).float()
    precision, recall = hits / fires.clamp_min(1), hits / support.clamp_min(1)[:, None]
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = f1.argmax(1)
    rows = torch.arange(L)
    df = pd.DataFrame({"label": rows.numpy(), "group": (best // n_codes).numpy(), "code": (best % n_codes).numpy(),
                       "precision": precision[rows, best].numpy(), "recall": recall[rows, best].numpy(),
                       "support": support.long().numpy(), "fires": fires[best].long().numpy()})
    return df if codes.dim() == 4 else df.drop(columns="group")


class NeuronBaseline:
    """The best-neuron baseline for many targets over the same activations [N, D]: columns are sorted once,
    so each target costs a quantile over its positives and a binary search per neuron, not a pass over N x D."""

    def __init__(self, acts_ND: Tensor):
        _check_acts(acts_ND)
        self.acts = acts_ND.float().reshape(len(acts_ND), -1)
        self.sorted_DN = self.acts.t().sort(dim=1).values.contiguous()

    def __call__(self, target_N: Tensor, recall: float) -> pd.DataFrame:
        """Each neuron (and its negation) thresholded to fire on `recall` of the targets: precision, best first."""
        t = torch.as_tensor(target_N).bool().reshape(-1)
        if len(t) != len(self.acts):
            raise ValueError(f"target has {len(t)} entries for {len(self.acts)} rows of activations")
        if isinstance(recall, bool) or not isinstance(recall, numbers.Real) or not 0 < recall <= 1:
            raise ValueError(f"recall must lie in (0, 1], got {recall!r}")
        if not t.any():
            raise ValueError("no target positions: the concept never occurs in these tokens")
        N, rows = len(t), []
        for sign in (1.0, -1.0):
            pos_PD = sign * self.acts[t]
            thresh = torch.quantile(pos_PD, 1 - recall, dim=0)  # fires on `recall` of the positives
            if sign > 0:  # count of a >= thresh
                fires = N - torch.searchsorted(self.sorted_DN, thresh[:, None], right=False)[:, 0]
            else:  # count of -a >= thresh, i.e. a <= -thresh
                fires = torch.searchsorted(self.sorted_DN, -thresh[:, None], right=True)[:, 0]
            precision = (pos_PD >= thresh).sum(0) / fires.clamp_min(1)
            rows.append(pd.DataFrame({"neuron": range(self.acts.shape[1]), "sign": int(sign), "threshold": thresh.numpy(),
                                      "precision": precision.numpy()}))
        return pd.concat(rows).sort_values("precision", ascending=False).reset_index(drop=True)


def neuron_precision_at_recall(acts_ND: Tensor, target_N: Tensor, recall: float) -> pd.DataFrame:
    """Each neuron (and its negation) thresholded to fire on `recall` of the targets: precision, best first.

    One pass over the activations; for many targets over the same activations use NeuronBaseline."""
    _check_acts(acts_ND)
    t = torch.as_tensor(target_N).bool().reshape(-1)
    if len(t) != len(acts_ND):
        raise ValueError(f"target has {len(t)} entries for {len(acts_ND)} rows of activations")
    if isinstance(recall, bool) or not isinstance(recall, numbers.Real) or not 0 < recall <= 1:
        raise ValueError(f"recall must lie in (0, 1], got {recall!r}")
    if not t.any():
        raise ValueError("no target positions: the concept never occurs in these tokens")
    rows = []
    for sign in (1.0, -1.0):
        a = sign * acts_ND.float().reshape(len(t), -1)
        thresh = torch.quantile(a[t], 1 - recall, dim=0)  # fires on `recall` of the positives
        fires = a >= thresh
        precision = (fires & t[:, None]).sum(0) / fires.sum(0).clamp_min(1)
        rows.append(pd.DataFrame({"neuron": range(a.shape[1]), "sign": int(sign), "threshold": thresh.numpy(), "precision": precision.numpy()}))
    return pd.concat(rows).sort_values("precision", ascending=False).reset_index(drop=True)


def decode_tokens(tokens: Tensor, decode: Callable[[int], str]) -> list[list[str]]:
    return [[decode(int(i)) for i in row] for row in tokens]
