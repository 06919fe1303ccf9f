"""Encoders with bounded memory: each token's chosen latents found without the [N, F] pre-activation matrix.

pre = x W_enc + b_enc is computed one [rows, block] tile at a time into one reused buffer (2^24 values, 64 MiB in
float32); the cost stays O(N F D), the memory O(rows x block). What each dictionary keeps from a tile:
    blocked_topk(x, W_enc, b_enc, k, block)    each token's top k, with a running top-k (TopK; in the same pass a
                                                top-k over candidate latents for AuxK)
    dead_topk(...)                              AuxK's top k_aux among the dead latents from those candidates
    blocked_batch_topk(x, W_enc, b_enc, k, block)  the batch's top k*N values (BatchTopK, Matryoshka)
    blocked_above(x, W_enc, b_enc, floor_F, block)  every entry above a per-latent floor (JumpReLU's training entries)
The values found are exact pre-activations: chosen_pre (base.py) gives them gradients with a sparse backward.

Dimension key: N tokens, D input dim, F latents, R rows of a tile, C latents of a tile, M entries kept per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TILE = 1 << 24  # pre-activations held at once: 64 MiB in float32
BLOCK_SIZE = 32768  # the objectives' latents per tile (d_sae 32768, 4096 tokens: 8 tiles of 512 tokens x all latents)


def _topk_cost(n: int, k: int) -> float:
    """torch.topk's relative CPU cost on rows of n: a heap scan when n >= 64 k, else an introselect ~3x slower."""
    return n if n >= 64 * k else 3 * n


def _tile_topk(tile_RC: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's top k of a tile (values, columns), unsorted, in two levels. Split the columns into G groups of g
    (group q = columns q, q + G, q + 2G, ...): the top k groups by their max hold the top k values, since each of
    those lies in a group whose max is at least it. The max over groups is g contiguous slabs combined elementwise
    (vectorised), and what is left is two small top-k's: torch.topk costs ~10x an elementwise max per value. g is
    the power of 2 that makes those two cheapest."""
    R, C = tile_RC.shape
    cost = {g: _topk_cost(C // g, k) + _topk_cost(k * g, k) for g in (2, 4, 8, 16, 32, 64) if C >= 4 * k * g}
    g = min(cost, key=cost.get, default=None)
    if g is None or cost[g] >= _topk_cost(C, k):
        return tile_RC.topk(k, dim=1, sorted=False)
    G = C // g
    slabs = tile_RC.as_strided((R, g, G), (tile_RC.stride(0), G, 1))
    group_max = slabs.amax(1)
    cols = group_max.topk(k, dim=1, sorted=False).indices.unsqueeze(2) + torch.arange(0, g * G, G, device=tile_RC.device)
    cols = cols.view(R, k * g)
    if C > g * G:  # the last columns, fewer than a group: always candidates
        cols = torch.cat([cols, torch.arange(g * G, C, device=tile_RC.device).expand(R, -1)], 1)
    vals, j = tile_RC.gather(1, cols).topk(k, dim=1, sorted=False)
    return vals, cols.gather(1, j)


def _running_topk(top: tuple[Tensor, Tensor] | None, vals_NC: Tensor, ids_C: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top k of `top` and one more block of values (latent ids_C), unsorted; a block of <= k values is kept whole."""
    if vals_NC.shape[1] > k:
        vals_NC, j = _tile_topk(vals_NC, k)
        ids_NC = ids_C[j]
    else:
        vals_NC, ids_NC = vals_NC.clone(), ids_C.expand(len(vals_NC), -1)
    if top is None:
        return vals_NC, ids_NC
    vals, ids = torch.cat([top[0], vals_NC], 1), torch.cat([top[1], ids_NC], 1)
    if vals.shape[1] <= k:
        return vals, ids
    vals, j = vals.topk(k, dim=1, sorted=False)
    return vals, ids.gather(1, j)


def _tiling(x_ND: Tensor, n_latents: int, block_size: int) -> tuple[int, int, Tensor]:
    """(C latents, R rows, buffer) of the tiles: R = _TILE / C rows of the batch at a time, one buffer for them all."""
    C = min(block_size, n_latents)
    R = max(1, min(x_ND.shape[0], _TILE // C))
    return C, R, x_ND.new_empty(R * C)


def _row_tiles(x_RD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, C: int, buf: Tensor, ids_F: Tensor | None = None):
    """(j, ids [c], tile [R, c]) for each block of C latents: pre = x W_enc + b_enc of these rows at latents ids (the
    j-th latent on, or ids_F[j:]), written into buf (valid until the next tile)."""
    n = W_enc_DF.shape[1] if ids_F is None else len(ids_F)
    for j in range(0, n, C):
        c = min(C, n - j)
        tile = buf[: len(x_RD) * c].view(len(x_RD), c)
        if ids_F is None:
            ids = torch.arange(j, j + c, device=x_RD.device)
            torch.addmm(b_enc_F[j : j + c], x_RD, W_enc_DF[:, j : j + c], out=tile)
        else:
            ids = ids_F[j : j + c]
            torch.addmm(b_enc_F[ids], x_RD, W_enc_DF[:, ids], out=tile)
        yield j, ids, tile


@torch.no_grad()
def blocked_topk(x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int, block_size: int, aux_F: Tensor | None = None,
                 k_aux: int = 0, cols_G: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Each token's top k of pre = x W_enc + b_enc, without the [N, F] matrix: (vals [N, k] sorted descending, idx).

    pre is computed a tile of [rows, block_size latents] at a time into one reused buffer (rows = _TILE / block_size:
    2^24 values, 64 MiB in float32), each tile's top k merged into its rows' running top k. With aux_F (bool [F]) the
    same pass keeps each token's top k_aux among those latents too: (aux_vals, aux_idx) [N, min(k_aux, aux_F.sum())],
    unsorted, else None. cols_G (latent ids) searches those latents only. x is x - b_dec (its caller's business).
    """
    N = x_ND.shape[0]
    ids_F = None if cols_G is None else cols_G.to(x_ND.device)
    F_ = W_enc_DF.shape[1] if ids_F is None else len(ids_F)
    k = min(k, F_)
    C, R, buf = _tiling(x_ND, F_, block_size)
    vals, idx = x_ND.new_empty(N, k), torch.empty(N, k, dtype=torch.long, device=x_ND.device)
    aux_vals = aux_idx = None
    if aux_F is not None:
        aux_ids = aux_F.to(x_ND.device).nonzero().squeeze(1)
        k_aux = min(k_aux, len(aux_ids))
        bounds = torch.searchsorted(aux_ids, torch.arange(0, F_ + C, C, device=x_ND.device)).tolist()  # per block
        aux_vals, aux_idx = x_ND.new_empty(N, k_aux), torch.empty(N, k_aux, dtype=torch.long, device=x_ND.device)
    for r in range(0, N, R):
        top = aux = None
        for b, (j, ids, tile) in enumerate(_row_tiles(x_ND[r : r + R], W_enc_DF, b_enc_F, C, buf, ids_F)):
            top = _running_topk(top, tile, ids, k)
            if aux_F is not None and bounds[b + 1] > bounds[b] and k_aux > 0:
                here = aux_ids[bounds[b] : bounds[b + 1]]
                aux = _running_topk(aux, tile.index_select(1, here - j), here, k_aux)
        top_vals, order = top[0].sort(dim=1, descending=True)
        vals[r : r + R], idx[r : r + R] = top_vals, top[1].gather(1, order)
        if aux is not None:
            aux_vals[r : r + R], aux_idx[r : r + R] = aux
    return vals, idx, aux_vals, aux_idx


@torch.no_grad()
def dead_topk(x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, cand_vals: Tensor, cand_idx: Tensor, dead_F: Tensor,
              k_aux: int, block_size: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """AuxK's choice without [N, F]: each token's top k_aux (<= dead count) among the dead latents, (vals, idx) sorted.

    cand_* are blocked_topk's aux output over a superset of the dead latents (those that die unless they fire in
    this batch). A token whose candidates hold >= k_aux dead latents has its answer among them (every dead latent
    left out is below them all); any other token is searched again over the dead latents alone.
    """
    dead_F = dead_F.to(cand_idx.device)
    is_dead = dead_F[cand_idx]
    vals, j = cand_vals.masked_fill(~is_dead, float("-inf")).topk(k_aux, dim=1)
    idx = cand_idx.gather(1, j)
    redo = (is_dead.sum(1) < k_aux).nonzero().squeeze(1)
    if len(redo):
        dead_G = dead_F.nonzero().squeeze(1)
        vals[redo], idx[redo], _, _ = blocked_topk(x_ND[redo], W_enc_DF, b_enc_F, k_aux, block_size, cols_G=dead_G)
    return vals, idx


@torch.no_grad()
def auxk_choice(dead_F: Tensor, k_aux: int, pre_NF: Tensor | None, x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor,
                cand_vals: Tensor | None, cand_idx: Tensor | None, block_size: int | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """AuxK's top k_aux dead latents per token (vals, idx): from the dense pre_NF when there is one (the reference
    paths), else dead_topk from a blocked pass's candidates."""
    if pre_NF is not None:
        return pre_NF.masked_fill(~dead_F.to(pre_NF.device), float("-inf")).topk(k_aux, dim=1)
    return dead_topk(x_ND, W_enc_DF, b_enc_F, cand_vals, cand_idx, dead_F, k_aux, block_size)


@torch.no_grad()
def batch_select(vals_NM: Tensor, idx_NM: Tensor, n_latents: int, n_keep: int, widen) -> tuple[Tensor, Tensor, Tensor]:
    """The n_keep largest values of relu(pre) over a whole batch, from each token's top m candidates (vals, idx; m <
    n_latents, or every latent): (vals, idx, keep) [N, M], each token's kept entries first, M the most any token keeps.

    The n_keep-th candidate value is a lower bound on the true n_keep-th value; every value a token left out is <= its
    smallest candidate, so only a token whose candidates all reach the bound (and are > 0) may hold more of the top
    values: widen(rows, bound) gives those rows' values >= bound (> 0 when bound <= 0), padded with lower ones. Exact up to
    ties; kept zeros, when fewer values are positive, are harmless. A column not kept may repeat a kept one's index."""
    N, m = vals_NM.shape
    top = vals_NM.flatten().topk(n_keep, sorted=False)
    bound = top.values.min()
    short = ((vals_NM.min(dim=1).values >= bound) & (vals_NM.min(dim=1).values > 0)).nonzero().squeeze(1)
    vals, idx, chosen = vals_NM, idx_NM, top.indices
    if m < n_latents and len(short):
        more_vals, more_idx = widen(short, bound)
        W = max(m, more_vals.shape[1])
        vals, idx = _pad(vals, W, float("-inf")), _pad(idx, W, 0)
        vals[short], idx[short] = _pad(more_vals, W, float("-inf")), _pad(more_idx, W, 0)
        chosen = vals.flatten().topk(n_keep, sorted=False).indices
    keep = torch.zeros(vals.numel(), dtype=torch.bool, device=vals.device).index_fill_(0, chosen, True).view(N, -1)
    order = keep.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, : max(1, int(keep.sum(1).max()))]
    keep = keep.gather(1, order)
    return vals.gather(1, order).masked_fill(~keep, 0.0), idx.gather(1, order), keep


def _pad(t: Tensor, width: int, fill: float) -> Tensor:
    return t if t.shape[1] == width else torch.cat([t, t.new_full((len(t), width - t.shape[1]), fill)], 1)


def top_at_least(pre_SF: Tensor, bound: Tensor) -> tuple[Tensor, Tensor]:
    """(vals, idx) [S, W]: the rows' values >= bound (> 0 when bound <= 0), W the most any row has, padded with the
    next values. The bound is lowered by a few ulps: a row re-computed with another GEMM shape may round its copy of
    the bound value just below it, which would drop it (extra candidates only widen the final choice)."""
    low = bound - 4 * torch.finfo(pre_SF.dtype).eps * bound.abs()
    wide = int((pre_SF >= low if bound > 0 else pre_SF > 0).sum(1).max()) if len(pre_SF) else 1
    return pre_SF.topk(max(wide, 1), dim=1, sorted=False)


@torch.no_grad()
def rows_at_least(x_SD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, bound: Tensor) -> tuple[Tensor, Tensor]:
    """top_at_least of the rows' pre-activations, computed _TILE values at a time; padded with -inf to one width."""
    R = max(1, _TILE // W_enc_DF.shape[1])
    parts = [top_at_least(torch.addmm(b_enc_F, x_SD[r : r + R], W_enc_DF), bound) for r in range(0, len(x_SD), R)]
    W = max(v.shape[1] for v, _ in parts)
    return torch.cat([_pad(v, W, float("-inf")) for v, _ in parts]), torch.cat([_pad(i, W, 0) for _, i in parts])


@torch.no_grad()
def blocked_batch_topk(x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int, block_size: int, aux_F: Tensor | None = None,
                       k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """BatchTopK's choice without [N, F]: (vals, idx, keep) [N, M] as batch_select, of the batch's top k*N values,
    from each token's top 2k candidates (one blocked_topk pass, which also gives AuxK's candidates: aux_vals, aux_idx)."""
    N, F_ = x_ND.shape[0], W_enc_DF.shape[1]
    vals, idx, aux_vals, aux_idx = blocked_topk(x_ND, W_enc_DF, b_enc_F, min(F_, 2 * k), block_size, aux_F, k_aux)
    vals, idx, keep = batch_select(vals, idx, F_, k * N, lambda rows, bound: rows_at_least(x_ND[rows], W_enc_DF, b_enc_F, bound))
    return vals, idx, keep, aux_vals, aux_idx


def pack_rows(rows_E: Tensor, cols_E: Tensor, vals_E: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries (row, col, value) sorted by row -> (vals, idx, valid) [N, M]: each row's entries in order, padded with
    column 0, value 0, valid False; M the most any row has (at least 1)."""
    counts = torch.bincount(rows_E, minlength=n_rows)
    M = max(int(counts.max()), 1) if n_rows else 1
    pos = torch.arange(len(rows_E), device=rows_E.device) - (counts.cumsum(0) - counts)[rows_E]
    idx = torch.zeros(n_rows, M, dtype=torch.long, device=rows_E.device)
    vals = torch.zeros(n_rows, M, dtype=vals_E.dtype, device=rows_E.device)
    valid = torch.zeros(n_rows, M, dtype=torch.bool, device=rows_E.device)
    idx[rows_E, pos], vals[rows_E, pos], valid[rows_E, pos] = cols_E, vals_E, True
    return vals, idx, valid


@torch.no_grad()
def blocked_above(x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, floor_F: Tensor, block_size: int,
                  max_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor] | None:  # fmt: skip
    """Every entry of pre = x W_enc + b_enc above floor_F, without [N, F]: (vals, idx, valid) [N, M] as pack_rows,
    each token's latents in ascending order. None as soon as more than max_fraction of the entries read so far
    qualify (then the dense matrix is the cheaper way: the caller's business)."""
    N, F_ = x_ND.shape[0], W_enc_DF.shape[1]
    if N == 0:
        none = torch.zeros(0, dtype=torch.long, device=x_ND.device)
        return pack_rows(none, none, x_ND.new_zeros(0), 0)
    C, R, buf = _tiling(x_ND, F_, block_size)
    rows, cols, vals, found, read = [], [], [], 0, 0
    for r in range(0, N, R):
        for j, _, tile in _row_tiles(x_ND[r : r + R], W_enc_DF, b_enc_F, C, buf):
            rr, cc = (tile > floor_F[j : j + tile.shape[1]]).nonzero(as_tuple=True)
            found, read = found + len(rr), read + tile.numel()
            if found > max_fraction * read:
                return None
            rows.append(rr + r), cols.append(cc + j), vals.append(tile[rr, cc])
    rows_E = torch.cat(rows)
    order = rows_E.argsort(stable=True)  # by token; within one, tiles in order and columns ascending in each
    return pack_rows(rows_E[order], torch.cat(cols)[order], torch.cat(vals)[order], N)
