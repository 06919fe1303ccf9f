"""Activation harvesting and the batch sources the training loop reads.

`harvest` runs token batches through a model once, reading every requested site in one forward
pass that stops after the deepest, and keeps the activations of real tokens (padding and,
by default, the first position, whose norm dwarfs the rest, are dropped). It fills memory, or
writes memory-mapped .npy shards to a folder so that no more than one shard is ever held.

Batch sources are deterministic functions of the step number, which is what lets an
interrupted training run resume to exactly the same weights:
    TensorSource(acts, batch_size, seed)            a fresh permutation each epoch
    ModelSource(model, site, tokens, ...)           harvests a buffer of tokens at a time, shuffled

Dimension key: N tokens, D width at the site, B sequences, T positions.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import sites as _sites
from ._io import load_json, save_json, write_atomic


# ----------------------------------------------------------------------------- token sources


def token_batches(tokens: Any, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Yield {input_ids, attention_mask} batches from a [N, T] tensor, a datasets.Dataset with
    `input_ids`, or an iterable of token-id sequences (ragged ones are right-padded and masked)."""
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"token tensor must be integer [N, T]; got {tokens.dtype} {list(tokens.shape)}")
        stop = len(tokens) if stop is None else min(stop, len(tokens))
        for i in range(start, stop, batch_size):
            ids = tokens[i:min(i + batch_size, stop)]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return
    if hasattr(tokens, "column_names"):  # a datasets.Dataset
        if "input_ids" not in tokens.column_names:
            raise ValueError(f"dataset needs an 'input_ids' column; it has {tokens.column_names}")
        stop = len(tokens) if stop is None else min(stop, len(tokens))
        for i in range(start, stop, batch_size):
            yield _pad(tokens[i:min(i + batch_size, stop)]["input_ids"])
        return
    if isinstance(tokens, Iterable):
        it = iter(tokens)
        for _ in range(start):
            next(it, None)
        batch, n = [], start
        for seq in it:
            if stop is not None and n >= stop:
                break
            batch.append(seq)
            n += 1
            if len(batch) == batch_size:
                yield _pad(batch)
                batch = []
        if batch:
            yield _pad(batch)
        return
    raise ValueError(f"tokens must be an integer tensor [N, T], a datasets.Dataset or an iterable of sequences; got {type(tokens).__name__}")


def _pad(seqs: Sequence[Any], pad_id: int = 0) -> dict[str, Tensor]:
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _n_sequences(tokens: Any) -> int | None:
    return len(tokens) if hasattr(tokens, "__len__") else None


# ----------------------------------------------------------------------------- harvesting


class ActivationCache:
    """Activations per site: in memory, or .npy shards opened memory-mapped. `cache[site]` is [N, D]."""

    def __init__(self, tables: dict[str, Any], folder: pathlib.Path | None = None):
        self.tables, self.folder = tables, folder

    @property
    def sites(self) -> list[str]:
        return list(self.tables)

    def __getitem__(self, site: str) -> "Tensor | _ShardedTable":
        if site not in self.tables:
            raise KeyError(f"site {site!r} was not harvested; harvested: {self.sites}")
        return self.tables[site]

    def __len__(self) -> int:
        return len(next(iter(self.tables.values())))

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "ActivationCache":
        folder = pathlib.Path(folder)
        manifest = load_json(folder / "manifest.json")
        tables = {}
        dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{folder}/manifest.json: unknown dtype {manifest.get('dtype')!r}")
        for site, files in manifest["files"].items():
            arrays = [np.load(folder / f, mmap_mode="r", allow_pickle=False) for f in files]
            tables[site] = _ShardedTable(arrays, dtype)
        return cls(tables, folder)


class _ShardedTable:
    """Rows spread over memory-mapped shards; indexing reads only the rows asked for."""

    def __init__(self, arrays: list[np.ndarray], dtype: torch.dtype = torch.float32):
        self.arrays, self.dtype = arrays, dtype  # bfloat16 is stored as its raw 16 bits (numpy has no bfloat16)
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.offsets[-1]), arrays[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> Tensor:
        idx = np.arange(self.shape[0])[idx] if isinstance(idx, slice) else np.asarray(idx)
        out = np.empty((len(idx), self.shape[1]), dtype=self.arrays[0].dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[s][idx[sel] - self.offsets[s]]
        return torch.from_numpy(out).view(torch.bfloat16) if self.dtype == torch.bfloat16 else torch.from_numpy(out)


def harvest(model: _sites.Model, tokens: Any, sites: str | Sequence[str], *, n_tokens: int | None = None,
            batch_size: int = 32, folder: str | os.PathLike | None = None, shard_tokens: int = 2**18,
            drop_first: bool = True, dtype: torch.dtype = torch.float32, progress: bool = True,
            edits: Sequence[Any] = ()) -> ActivationCache:
    """Activations at `sites` for up to `n_tokens` tokens, in memory or as shards under `folder`.

    With `edits` (a Splice, a Transcode standing in for an MLP, a Steer ...) the activations are those of the edited
    model, read in the same forward pass."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        _sites.resolve(model, s)  # fail on a bad site before any work
    folder = pathlib.Path(folder) if folder is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    pending: dict[str, list[Tensor]] = {s: [] for s in sites}
    kept: dict[str, list[Any]] = {s: [] for s in sites}
    n_pending = total = 0
    bar = tqdm(total=n_tokens, disable=not progress, desc="harvest", unit="tok")

    def flush() -> None:
        nonlocal n_pending
        if not n_pending:
            return
        for s in sites:
            block = torch.cat(pending[s]).to(dtype)
            pending[s] = []
            if folder is None:
                kept[s].append(block)
            else:
                name = f"{_safe(s)}.{len(kept[s]):05d}.npy"
                raw = block.view(torch.uint16) if block.dtype == torch.bfloat16 else block  # numpy has no bfloat16
                write_atomic(folder / name, _npy_bytes(raw.numpy()))
                kept[s].append(name)
        n_pending = 0

    for batch in token_batches(tokens, batch_size):
        if edits:
            with torch.no_grad():
                acts = _sites.run(model, batch, list(edits), read=sites).acts
        else:
            acts = _sites.read_acts(model, batch, sites)
        keep = batch["attention_mask"].bool()
        if drop_first:
            keep[:, 0] = False
        n = int(keep.sum())
        if n_tokens is not None:
            n = min(n, n_tokens - total)
        for s in sites:
            pending[s].append(acts[s][keep.to(acts[s].device)].flatten(1)[:n].detach().cpu())
        n_pending += n
        total += n
        bar.update(n)
        if n_pending >= shard_tokens:
            flush()
        if n_tokens is not None and total >= n_tokens:
            break
    flush()
    bar.close()
    if total == 0:
        raise ValueError("harvest found no tokens in the source")
    if folder is None:
        return ActivationCache({s: torch.cat(kept[s]) for s in sites})
    save_json(folder / "manifest.json", {"sites": sites, "n_tokens": total, "files": kept, "dtype": str(dtype).removeprefix("torch.")})
    return ActivationCache.open(folder)


def _safe(site: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in site)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- batch sources


class TensorSource:
    """Batches of rows from a [N, D] table (tensor or memory-mapped cache), a new permutation per epoch."""

    def __init__(self, acts: Any, batch_size: int, seed: int = 0):
        if len(acts) < batch_size:
            raise ValueError(f"need at least batch_size={batch_size} activations, got {len(acts)}")
        self.acts, self.batch_size, self.seed = acts, batch_size, seed
        self.per_epoch = len(acts) // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(len(self.acts), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        rows = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        out = torch.as_tensor(self.acts[rows.sort().values.numpy() if isinstance(self.acts, _ShardedTable) else rows])
        return out if not out.is_floating_point() else out.float()


class ModelSource:
    """Activations at one site harvested on the fly: a buffer of `buffer_tokens` at a time, shuffled.

    Buffer c is harvested from a fixed slice of the sequences, so batch(step) is the same in
    every run and training can resume exactly. `tokens` must support len() and slicing.
    """

    def __init__(self, model: _sites.Model, site: str, tokens: Any, batch_size: int, *, buffer_tokens: int = 2**16,
                 seq_batch: int = 32, drop_first: bool = True, seed: int = 0):
        n_seq = _n_sequences(tokens)
        if n_seq is None:
            raise ValueError("ModelSource needs an indexable token source (tensor or Dataset) so that runs can resume")
        _sites.resolve(model, site)
        self.model, self.site, self.tokens, self.batch_size = model, site, tokens, batch_size
        self.buffer_tokens, self.seq_batch, self.drop_first, self.seed = buffer_tokens, seq_batch, drop_first, seed
        first = next(token_batches(tokens, 1))["input_ids"]
        per_seq = max(1, first.shape[1] - int(drop_first))
        self.seqs_per_buffer = max(1, -(-buffer_tokens // per_seq))
        self.n_buffers = -(-n_seq // self.seqs_per_buffer)
        self._index, self._buffer = -1, None

    def batch(self, step: int) -> Tensor:
        per_buffer = max(1, self.buffer_tokens // self.batch_size)
        c, i = divmod(step, per_buffer)
        if c != self._index:
            self._index = c
            k = c % self.n_buffers
            start = k * self.seqs_per_buffer
            part = self.tokens[start:start + self.seqs_per_buffer]
            acts = harvest(self.model, part, self.site, batch_size=self.seq_batch, drop_first=self.drop_first, progress=False)[self.site]
            perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + c))
            self._buffer = acts[perm]
        rows = self._buffer[(i * self.batch_size) % len(self._buffer):][: self.batch_size]
        if len(rows) < self.batch_size:  # a short last buffer wraps around
            rows = torch.cat([rows, self._buffer[: self.batch_size - len(rows)]])
        return rows


class TokenSource:
    """Batches of token sequences [B, T] for objectives that run the model (end-to-end SAEs)."""

    def __init__(self, tokens: Tensor, batch_size: int, seed: int = 0):
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"TokenSource needs an integer tensor [N, T]; got {type(tokens).__name__}")
        self.rows = TensorSource(tokens, batch_size, seed)

    def batch(self, step: int) -> Tensor:
        return self.rows.batch(step).long()
