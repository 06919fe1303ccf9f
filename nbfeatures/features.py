"""Feature gallery data: statistics for every feature over a token set, and a card per feature on demand.

    density_f = #{n : a_nf != 0} / N          max_f = max_n a_nf          mean_f = sum_n a_nf / #{n : a_nf != 0}
    output tokens of f = top / bottom of W_dec[f] @ W_U        best label = argmax_c F1(fires_f, label_c)

Works from any activation matrix [N, F] (dense, or a torch sparse tensor; `sparse_from_topk` builds
one from a TopK SAE's (acts, indices)), so SAEs, binary autoencoders and codebooks share it. The
summary streams over the tokens in row chunks and never loops over features in Python; cards
(contexts, quantile samples, histogram, output tokens) are computed when asked for, and cached.
Cards follow sae_vis / SAEDashboard (McDougall; Bloom et al.) and Neuronpedia feature pages.

Dimension key: N tokens (flattened), F features, D model dim, V vocab, C labels, K top entries.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .edits import decoder_rows


class Context(NamedTuple):
    tokens: list[str]  # a window of tokens around the sampled one
    acts: np.ndarray  # [len(tokens)] this feature's activation on each
    center: int  # index in `tokens` of the sampled token
    act: float  # its activation
    seq: int  # sequence id and position of the sampled token
    pos: int


class FeatureCard(NamedTuple):
    feature: int
    density: float
    max_act: float
    mean_act: float  # mean over the tokens it fires on
    top: list[Context]  # highest activations first
    quantiles: list[tuple[str, list[Context]]]  # (label, samples) per quantile of the nonzero activations, top first
    hist_counts: np.ndarray  # [bins] histogram of the nonzero activations
    hist_edges: np.ndarray  # [bins + 1]
    pos_tokens: list[str]  # top output tokens of W_dec[f] @ W_U (empty without W_dec and W_U)
    pos_values: np.ndarray
    neg_tokens: list[str]
    neg_values: np.ndarray
    best_label: str | None  # the ground-truth label it detects best (by F1), None without labels
    precision: float
    recall: float


def sparse_from_topk(acts_NK: Tensor, indices_NK: Tensor, d_sae: int) -> Tensor:
    """A sparse COO [N, F] activation matrix from a TopK SAE's (acts, indices) (distinct indices per row)."""
    d_sae = _int("d_sae", d_sae, 1)
    if not isinstance(acts_NK, Tensor) or not isinstance(indices_NK, Tensor):
        raise TypeError(f"acts_NK and indices_NK must be torch tensors, got {type(acts_NK).__name__} and {type(indices_NK).__name__}")
    if acts_NK.dim() != 2 or acts_NK.shape != indices_NK.shape:
        raise ValueError(f"acts_NK and indices_NK must both be [N, K], got {list(acts_NK.shape)} and {list(indices_NK.shape)}")
    if indices_NK.is_floating_point() or indices_NK.dtype == torch.bool:
        raise TypeError(f"indices_NK must be integer latent ids, got dtype {indices_NK.dtype}")
    if indices_NK.numel() and (int(indices_NK.min()) < 0 or int(indices_NK.max()) >= d_sae):
        raise ValueError(f"indices_NK must be latent ids in [0, d_sae={d_sae}), got min {int(indices_NK.min())}, max {int(indices_NK.max())}")
    N, K = acts_NK.shape
    indices_NK, order = indices_NK.sort(dim=1)  # row-major sorted entries: already coalesced, no sort later
    rows = torch.arange(N, device=acts_NK.device).repeat_interleave(K)
    return torch.sparse_coo_tensor(torch.stack([rows, indices_NK.reshape(-1)]), acts_NK.gather(1, order).reshape(-1).detach(),
                                   (N, d_sae), is_coalesced=True, check_invariants=False)


def _group_topk(f: Tensor, v: Tensor, n: Tensor, k: int, F: int) -> tuple[Tensor, Tensor]:
    """Per feature, the k largest values among (f, v, n) triplets: values [F, k] (0-padded), token ids [F, k] (-1).

    k passes of a per-feature max over all triplets at once (cheaper than sorting millions of them
    when k is small); ties go to the lower token index, so the result does not depend on the order.
    """
    top_v, top_n = torch.zeros(F, k), torch.full((F, k), -1, dtype=torch.long)
    v = v.float().clone()
    none = int(n.max()) + 1 if len(n) else 0
    for j in range(k):
        best = torch.full((F,), -math.inf).scatter_reduce(0, f, v, "amax")
        hit = (v == best[f]) & (v > -math.inf)
        first = torch.full((F,), none, dtype=torch.long).scatter_reduce(0, f[hit], n[hit], "amin")
        found = first < none
        top_v[found, j], top_n[found, j] = best[found], first[found]
        v[hit & (n == first[f])] = -math.inf  # taken
    return top_v, top_n


def _int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {lo}, got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value}")
    return int(value)


def _as_tensor(name: str, value: Any, what: str) -> Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be {what} (a tensor or array), got {type(value).__name__}") from None
    if t.is_complex():
        raise TypeError(f"{name} must be {what}, got dtype {t.dtype}")
    return t


def _ids(name: str, value: Any, N: int | None = None) -> Tensor:
    t = _as_tensor(name, value, "integer ids")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integer ids, got dtype {t.dtype}")
    if N is not None and t.numel() != N:
        raise ValueError(f"{name} must have N={N} entries like `tokens`; got {t.numel()}")
    return t.long()


def _check_values(v: Tensor) -> None:
    """The nonzero activations of a block: finite and >= 0 (max, mean and quantiles assume a feature is 0 when off)."""
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise ValueError(f"acts holds {int(bad.sum())} NaN or inf value(s); activations must be finite numbers >= 0")
    if bool((v < 0).any()):
        raise ValueError(f"acts must be >= 0 (latents, codes, bits: 0 when off), got min {v.min().item():.4g}; "
                         "for signed activations pass acts.clamp_min(0) or acts.abs()")


def _labels_NC(labels: Tensor | np.ndarray, N: int, names: Sequence[str] | None) -> tuple[Tensor, list[str]]:
    lab = _as_tensor("labels", labels, "[N] class ids or [N, C] indicators")
    if lab.dim() == 1:  # one class id per token; negative: no label
        if lab.is_floating_point():
            raise ValueError(f"labels [N] must be integer class ids; got dtype {lab.dtype}")
        C = len(names) if names is not None else int(lab.max()) + 1
        if C < 1:
            raise ValueError("labels [N] hold no class id >= 0 (-1 means no label) and no label_names were given")
        if int(lab.max()) >= C:
            raise ValueError(f"labels hold class id {int(lab.max())} but {C} label names were given (ids must be < {C})")
        onehot = torch.zeros(len(lab), C)
        ok = lab >= 0
        onehot[ok.nonzero()[:, 0], lab[ok]] = 1.0
        lab = onehot
    if lab.dim() != 2 or lab.shape[0] != N:
        raise ValueError(f"labels must be [N] class ids or [N, C] indicators with N={N}; got shape {list(lab.shape)}")
    if lab.is_floating_point() and bool(torch.isnan(lab).any()):
        raise ValueError("labels [N, C] hold NaN; indicators must be 0 / 1 (or bool)")
    names = list(names) if names is not None else [f"label {c}" for c in range(lab.shape[1])]
    if len(names) != lab.shape[1]:
        raise ValueError(f"got {len(names)} label names for {lab.shape[1]} labels")
    return (lab != 0).float(), names


def summarize_features(
    acts: Tensor | np.ndarray, tokens: Tensor | np.ndarray, decode: Callable[[int], str] | Sequence[str], *,
    seq: Tensor | np.ndarray | None = None, pos: Tensor | np.ndarray | None = None,
    W_dec: Tensor | Any = None, W_U: Tensor | None = None,
    labels: Tensor | np.ndarray | None = None, label_names: Sequence[str] | None = None,
    n_top: int = 20, context: tuple[int, int] = (10, 3), n_quantiles: int = 5, per_quantile: int = 3,
    bins: int = 40, n_output: int = 10, n_summary_tokens: int = 5, chunk_elements: int = 2**23, seed: int = 0,
) -> "FeatureSummary":
    """Per-feature statistics over N tokens, and cards on demand.

    acts: [N, F] or [B, T, F], dense or torch sparse (latents, codes, bits: anything >= 0 that is 0 when off).
    tokens: [N] or [B, T] token ids; with [N], `seq` and `pos` [N] say which sequence and position each
        token has (default: one sequence in order), so contexts stop at sequence boundaries.
    decode: token id -> str (e.g. `lambda i: tok.decode([i])`), or a list of strings.
    W_dec [F, D], W_U [D, V]: for each feature's top positive / negative output tokens (HF lm_head is [V, D]: pass .T).
        W_dec may also be [D, F] (found by matching F and D) or a dictionary with `.W_dec` (ours, SAELens, sparsify).
    labels: [N] class ids (-1: none) or [N, C] indicators, with `label_names`: best label with precision / recall.
    """
    tokens = _ids("tokens", tokens)
    if tokens.dim() not in (1, 2):
        raise ValueError(f"tokens must be [N] or [B, T] token ids, got shape {list(tokens.shape)}")
    if isinstance(decode, str) or not (callable(decode) or hasattr(decode, "__getitem__") and hasattr(decode, "__len__")):
        raise TypeError(f"decode must be a callable token id -> str or a list of token strings, got {type(decode).__name__}")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError(f"tokens must be ids >= 0, got min {int(tokens.min())}")
    if not callable(decode) and tokens.numel() and int(tokens.max()) >= len(decode):
        raise ValueError(f"tokens hold id {int(tokens.max())} but decode lists {len(decode)} strings (ids must be < {len(decode)})")
    n_top, n_quantiles, bins, chunk_elements = (_int("n_top", n_top, 1), _int("n_quantiles", n_quantiles, 1),
                                                _int("bins", bins, 1), _int("chunk_elements", chunk_elements, 1))
    per_quantile, n_output, n_summary_tokens = (_int("per_quantile", per_quantile, 0), _int("n_output", n_output, 0),
                                                _int("n_summary_tokens", n_summary_tokens, 0))
    seed = _int("seed", seed, 0)
    if not isinstance(context, (tuple, list)) or len(context) != 2:
        raise ValueError(f"context must be (tokens before, tokens after), two ints >= 0, got {context!r}")
    context = (_int("context[0]", context[0], 0), _int("context[1]", context[1], 0))
    if tokens.dim() == 2:
        B, T = tokens.shape
        if seq is None:
            seq = torch.arange(B).repeat_interleave(T)
            pos = torch.arange(T).repeat(B)
        tokens = tokens.reshape(-1)
    N = len(tokens)
    if N == 0:
        raise ValueError("summarize_features needs at least one token")
    sparse = isinstance(acts, Tensor) and acts.layout != torch.strided
    if not sparse:
        acts = _as_tensor("acts", acts, "activations [N, F] or [B, T, F]")
        if acts.dim() == 3:
            acts = acts.reshape(-1, acts.shape[-1])
    if acts.dim() != 2 or acts.shape[0] != N:
        raise ValueError(f"acts must be [N, F] (or [B, T, F]) over the same N={N} tokens as `tokens`; got {list(acts.shape)}")
    F = acts.shape[1]
    seq = torch.zeros(N, dtype=torch.long) if seq is None else _ids("seq", seq, N).reshape(-1)
    pos = torch.arange(N) if pos is None else _ids("pos", pos, N).reshape(-1)
    if len(seq) != N or len(pos) != N:
        raise ValueError(f"seq and pos must have N={N} entries like `tokens`; got {len(seq)} and {len(pos)}")
    if (W_dec is None) != (W_U is None):
        raise ValueError("output tokens need both W_dec [F, D] and W_U [D, V]; got only one")
    if W_dec is not None:
        if not isinstance(W_U, Tensor) or W_U.dim() != 2:
            raise ValueError(f"W_U must be a [D, V] tensor (HF lm_head is [V, D]: pass .T), got "
                             f"{list(W_U.shape) if isinstance(W_U, Tensor) else type(W_U).__name__}")
        if not callable(decode) and W_U.shape[1] > len(decode):
            raise ValueError(f"W_U [D, V] has V={W_U.shape[1]} columns but decode lists {len(decode)} strings; "
                             "decode needs a string for every output token")
        try:
            W_dec = decoder_rows(W_dec, d=W_U.shape[0], n_latents=F)
        except ValueError as e:
            raise ValueError(f"need W_dec [F={F}, D] (or [D, F]) and W_U [D, V] with the same D; got W_U {list(W_U.shape)}: {e}") from None
    lab, names = _labels_NC(labels, N, label_names) if labels is not None else (None, None)

    count = torch.zeros(F, dtype=torch.long)
    total = torch.zeros(F, dtype=torch.float64)
    amax = torch.zeros(F)
    both = torch.zeros(F, lab.shape[1]) if lab is not None else None
    k = max(n_summary_tokens, 1)
    cand_v, cand_n, cand_f = [], [], []
    triplets = None

    def consume(n: Tensor, f: Tensor, v: Tensor, rows: int, offset: int) -> None:
        # All statistics from the nonzero (token, feature, value) triplets of a block of rows.
        _check_values(v)
        count.add_(torch.bincount(f, minlength=F))
        total.index_add_(0, f, v.double())
        amax.copy_(amax.scatter_reduce(0, f, v, "amax"))
        if both is not None:
            fires_FN = torch.sparse_coo_tensor(torch.stack([f, n - offset]), torch.ones_like(v), (F, rows), check_invariants=False)
            both.add_(torch.sparse.mm(fires_FN, lab[offset:offset + rows]))

    if sparse:
        a = acts.to_sparse_coo()
        a = a if a.is_coalesced() else a.coalesce()  # duplicate entries are summed, as torch.sparse does
        n, f = a.indices()
        v = a.values().float()
        on = v != 0
        n, f, v = n[on], f[on], v[on]
        consume(n, f, v, N, 0)
        triplets = (n, f, v)  # a card's column is the entries with its feature: one O(nnz) mask, no sort
        top_v, top_n = _group_topk(f, v, n, k, F)
    else:
        rows = max(1, chunk_elements // max(F, 1))
        for s in range(0, N, rows):
            block = acts[s:s + rows].float()
            n, f = block.nonzero(as_tuple=True)
            v = block[n, f]
            consume(n + s, f, v, len(block), s)
            tv, tn = _group_topk(f, v, n + s, k, F)  # a block's candidates; the best k of all blocks win below
            keep = tn >= 0
            cand_v.append(tv[keep]), cand_n.append(tn[keep]), cand_f.append(keep.nonzero()[:, 0])
        top_v, top_n = _group_topk(torch.cat(cand_f), torch.cat(cand_v), torch.cat(cand_n), k, F)

    vocab = _Decoder(decode)
    tok = tokens.numpy()
    density = count.double() / N
    table = pd.DataFrame({
        "density": density.numpy(),
        "log10_density": torch.log10(density + 1e-10).numpy(),
        "n_fires": count.numpy(),
        "max_act": amax.double().numpy(),
        "mean_act": (total / count.clamp_min(1)).numpy(),
        "top_tokens": [" ".join(dict.fromkeys(vocab(int(tok[i])) for i in row if i >= 0)) for row in top_n[:, :n_summary_tokens].tolist()],
    }, index=pd.RangeIndex(F, name="feature"))
    if W_dec is not None:
        table["top_logits"] = _summary_logits(W_dec, W_U, n_summary_tokens, vocab)
    if lab is not None:
        precision = both / count.clamp_min(1)[:, None].float()
        recall = both / lab.sum(0).clamp_min(1)[None, :]
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        best = f1.argmax(1)
        some = f1.gather(1, best[:, None])[:, 0] > 0
        table["best_label"] = pd.Series([names[c] if ok else None for c, ok in zip(best.tolist(), some.tolist())],
                                        index=table.index, dtype=object)
        table["precision"] = precision.gather(1, best[:, None])[:, 0].double().numpy()
        table["recall"] = recall.gather(1, best[:, None])[:, 0].double().numpy()
        table["f1"] = f1.gather(1, best[:, None])[:, 0].double().numpy()
    return FeatureSummary(table, acts, triplets, tokens, seq, pos, vocab, W_dec, W_U, names, dict(
        n_top=n_top, context=context, n_quantiles=n_quantiles, per_quantile=per_quantile, bins=bins,
        n_output=n_output, seed=seed))


def _summary_logits(W_dec: Tensor, W_U: Tensor, k: int, vocab: "_Decoder", chunk: int = 256) -> list[str]:
    """The top-k output tokens of every feature, a few hundred features at a time ([chunk, V] at once)."""
    W_dec, W_U = W_dec.detach().float(), W_U.detach().float()
    out = []
    with torch.no_grad():
        for s in range(0, len(W_dec), chunk):
            ids = (W_dec[s:s + chunk] @ W_U).topk(min(k, W_U.shape[1]), dim=1).indices
            out += [" ".join(vocab(i) for i in row) for row in ids.tolist()]
    return out


class _Decoder:
    """Token id -> string, memoised (tokenizer decode calls are slow)."""

    def __init__(self, decode: Callable[[int], str] | Sequence[str]):
        self._decode = decode.__getitem__ if not callable(decode) else decode
        self._cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        s = self._cache.get(i)
        if s is None:
            s = self._cache[i] = str(self._decode(i))
        return s


class FeatureSummary:
    """`table`: one row per feature (pandas, index = feature id); `card(f)`: a FeatureCard, computed on first use."""

    def __init__(self, table, acts, triplets, tokens, seq, pos, vocab, W_dec, W_U, label_names, opts):
        self.table: pd.DataFrame = table
        self.label_names = label_names
        self._acts, self._triplets, self._tokens, self._vocab = acts, triplets, tokens.numpy(), vocab
        self._seq, self._pos = seq.numpy(), pos.numpy()
        self._W_dec, self._W_U, self._opts = W_dec, W_U, opts
        self._order = np.lexsort((self._pos, self._seq))  # tokens sorted by (sequence, position): contexts are runs
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(len(self._order))
        self.card = functools.lru_cache(maxsize=512)(self._card)

    def __len__(self) -> int:
        return len(self.table)

    def column(self, f: int) -> np.ndarray:
        """Feature f's activation on every token [N]."""
        f = self._feature(f)
        if self._triplets is None:
            return self._acts[:, f].float().numpy()
        n, feature, v = self._triplets
        mine = feature == f
        col = np.zeros(len(self._tokens), dtype=np.float32)
        col[n[mine].numpy()] = v[mine].numpy()
        return col

    def context(self, n: int, col: np.ndarray) -> Context:
        """The tokens around token n within its sequence, with this feature's activations on them."""
        before, after = self._opts["context"]
        r = self._rank[n]
        idx = self._order[max(0, r - before): r + after + 1]
        idx = idx[self._seq[idx] == self._seq[n]]
        return Context([self._vocab(int(t)) for t in self._tokens[idx]], col[idx], int(np.flatnonzero(idx == n)[0]),
                       float(col[n]), int(self._seq[n]), int(self._pos[n]))

    def _feature(self, f: Any) -> int:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
            raise TypeError(f"feature must be an int id in 0..{len(self.table) - 1}, got {type(f).__name__} {f!r}")
        if not 0 <= f < len(self.table):
            raise ValueError(f"feature {f} is out of range: there are {len(self.table)} features (0..{len(self.table) - 1})")
        return int(f)

    def _card(self, f: int) -> FeatureCard:
        f = self._feature(f)
        o, row = self._opts, self.table.iloc[f]
        col = self.column(f)
        nz = np.flatnonzero(col)
        vals = col[nz]
        top = nz[np.argsort(-vals, kind="stable")[:o["n_top"]]]
        quantiles = []
        if len(vals):
            edges = np.quantile(vals, np.linspace(0, 1, o["n_quantiles"] + 1))
            which = np.clip(np.searchsorted(edges[1:-1], vals, side="right"), 0, o["n_quantiles"] - 1)
            rng = np.random.default_rng([o["seed"], f])
            for q in reversed(range(o["n_quantiles"])):
                members = nz[which == q]
                pick = rng.choice(members, min(o["per_quantile"], len(members)), replace=False) if len(members) else members
                pick = pick[np.argsort(-col[pick], kind="stable")]
                label = (f"quantile {q / o['n_quantiles']:.0%}–{(q + 1) / o['n_quantiles']:.0%} "
                         f"· acts {edges[q]:.3g}–{edges[q + 1]:.3g} · {len(members)} tokens")
                quantiles.append((label, [self.context(int(n), col) for n in pick]))
            counts, hist_edges = np.histogram(vals, bins=o["bins"])
        else:
            counts, hist_edges = np.zeros(o["bins"], dtype=np.int64), np.linspace(0, 1, o["bins"] + 1)
        pos_t, pos_v, neg_t, neg_v = [], np.zeros(0), [], np.zeros(0)
        if self._W_dec is not None:
            with torch.no_grad():
                logits = self._W_dec[f].detach().float() @ self._W_U.detach().float()
            k = min(o["n_output"], len(logits))
            pv, pi = logits.topk(k)
            nv, ni = (-logits).topk(k)
            pos_t, pos_v = [self._vocab(i) for i in pi.tolist()], pv.double().numpy()
            neg_t, neg_v = [self._vocab(i) for i in ni.tolist()], (-nv).double().numpy()
        has_label = "best_label" in self.table and row["best_label"] is not None and row["best_label"] == row["best_label"]
        return FeatureCard(
            f, float(row["density"]), float(row["max_act"]), float(row["mean_act"]),
            [self.context(int(n), col) for n in top], quantiles, counts, hist_edges,
            pos_t, pos_v, neg_t, neg_v,
            str(row["best_label"]) if has_label else None,
            float(row["precision"]) if has_label else float("nan"), float(row["recall"]) if has_label else float("nan"))
