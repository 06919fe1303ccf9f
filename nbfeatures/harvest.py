"""Activation harvesting and the batch sources the training loop reads.

`harvest` runs token batches through a model once, reading every requested site in one forward
pass that stops after the deepest, and keeps the activations of real tokens (padding and,
by default, the first position, whose norm dwarfs the rest, are dropped). It fills memory, or
writes memory-mapped .npy shards to a folder so that no more than one shard is ever held. A folder is
written under a temporary sibling (`.partial_<name>`) and renamed into place when complete, so an
interrupted re-harvest leaves the old harvest whole; `resume=True` continues an interrupted harvest
from its last shard, to the same result as an uninterrupted one. Opening checks every shard's header
(shape, dtype, length) against the manifest, so a truncated or foreign shard is refused by name.

Batch sources are deterministic functions of the step number, which is what lets an
interrupted training run resume to exactly the same weights:
    TensorSource(acts, batch_size, seed)            a fresh permutation each epoch
    ModelSource(model, site, tokens, ...)           harvests a buffer of tokens at a time, shuffled

Dimension key: N tokens, D width at the site, B sequences, T positions.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import pathlib
import shutil
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import sites as _sites
from ._checks import bool_arg, int_arg
from ._io import load_json, replace_folder, save_json, write_atomic


# ----------------------------------------------------------------------------- token sources


def token_batches(tokens: Any, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Yield {input_ids, attention_mask} batches from a [N, T] tensor, a datasets.Dataset with
    `input_ids`, or an iterable of token-id sequences (ragged ones are right-padded and masked)."""
    int_arg("token_batches", "batch_size", batch_size)
    int_arg("token_batches", "start", start, minimum=0)
    if stop is not None:
        int_arg("token_batches", "stop", stop, minimum=0)
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"token tensor must be integer [N, T]; got {tokens.dtype} {list(tokens.shape)}")
        if tokens.numel() and int(tokens.min()) < 0:
            raise ValueError(f"token ids must be >= 0; the token tensor holds {int(tokens.min())}")
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
    if isinstance(tokens, Iterable) and not isinstance(tokens, (str, bytes, np.ndarray)):
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
    out = []
    for s in seqs:
        if isinstance(s, (Tensor, np.ndarray)):
            t = torch.as_tensor(s)
        elif isinstance(s, Sequence) and not isinstance(s, (str, bytes)) and all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in s):  # fmt: skip
            t = torch.as_tensor(list(s), dtype=torch.long)
        else:
            t = None
        if t is None or t.dim() != 1 or len(t) == 0 or t.is_floating_point() or t.dtype == torch.bool or int(t.min()) < 0:
            raise ValueError(f"each token sequence must be a non-empty 1-D list of int ids >= 0; got {str(s)[:80]}")
        out.append(t.long())
    seqs = out
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
        """Open a harvest folder; every shard's .npy header is checked against the manifest before it is mapped."""
        folder = pathlib.Path(folder)
        where = folder / "manifest.json"
        manifest = load_json(where)
        name = str(manifest.get("dtype", "float32"))
        if name not in _STORED:
            raise ValueError(f"{where}: dtype {name!r} is not one of {', '.join(_STORED)}")
        dtype, stored = getattr(torch, name), np.dtype(_STORED[name])
        files, n_tokens = manifest.get("files"), manifest.get("n_tokens")
        if not isinstance(files, dict) or not files or not all(isinstance(f, list) and f for f in files.values()):
            raise ValueError(f"{where}: 'files' must map each site to a non-empty list of shard names; got {files!r}")
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"{where}: n_tokens must be an int >= 1, got {n_tokens!r}")
        tables = {}
        for site, names in files.items():
            arrays = [_open_shard(folder, f, stored) for f in names]
            widths = {a.shape[1] for a in arrays}
            rows = sum(len(a) for a in arrays)
            if len(widths) != 1 or rows != n_tokens:
                raise ValueError(f"{where}: the shards of {site!r} hold {rows} rows of widths {sorted(widths)}; "
                                 f"the manifest says {n_tokens} rows of one width")  # fmt: skip
            tables[site] = _ShardedTable(arrays, dtype)
        return cls(tables, folder)


# how each harvest dtype is stored in .npy (numpy has no bfloat16: its raw 16 bits)
_STORED = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8"}


def _open_shard(folder: pathlib.Path, name: Any, stored: np.dtype) -> np.ndarray:
    """Memory-map one shard after checking its header: 2-D, the manifest's dtype, and as long as the header says."""
    if not isinstance(name, str) or pathlib.Path(name).name != name or not name.endswith(".npy"):
        raise ValueError(f"{folder}/manifest.json: shard name {name!r} is not a plain .npy file name in the folder")
    path = folder / name
    if not path.is_file():
        raise ValueError(f"{path}: shard not found (the harvest is incomplete or was moved)")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable .npy shard (corrupt, truncated or another format): {e}") from None
    if len(shape) != 2 or fortran or dtype != stored:
        raise ValueError(f"{path}: shard holds a {'Fortran-order ' if fortran else ''}{dtype} array of shape {list(shape)}; "
                         f"the manifest needs a 2-D {stored} array [N, D]")  # fmt: skip
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: shard is {path.stat().st_size} bytes, its header says {expected} (truncated or appended to)")
    return np.load(path, mmap_mode="r", allow_pickle=False)


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
            edits: Sequence[Any] = (), resume: bool = False) -> ActivationCache:
    """Activations at `sites` for up to `n_tokens` tokens, in memory or as shards under `folder`.

    With `edits` (a Splice, a Transcode standing in for an MLP, a Steer ...) the activations are those of the edited
    model, read in the same forward pass. A folder is written under `.partial_<name>` beside it and renamed into place
    when complete; `resume=True` continues an interrupted harvest with the same arguments from its last shard (or,
    when none is pending, opens a complete harvest with the same arguments instead of redoing it)."""
    sites, params = _harvest_params(tokens, sites, n_tokens, batch_size, shard_tokens, drop_first, dtype, progress, edits, resume,
                                    to_disk=folder is not None)  # fmt: skip
    if resume and folder is None:
        raise ValueError("harvest: resume=True needs a folder (an in-memory harvest has nothing to resume)")
    for s in sites:
        _sites.resolve(model, s)  # fail on a bad site before any work
    edits = list(edits)
    n_seq = total = n_pending = 0
    kept: dict[str, list[Any]] = {s: [] for s in sites}
    partial = None
    if folder is not None:
        folder = pathlib.Path(folder)
        partial = folder.with_name(f".partial_{folder.name}")
        if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / "manifest.json").is_file())):
            raise ValueError(f"harvest: folder {folder} exists and holds no harvest (no manifest.json); a harvest replaces "
                             f"the whole folder, so pick a new or empty one")  # fmt: skip
        state = _pending_harvest(partial, params) if resume else None
        if resume and state is None and (folder / "manifest.json").is_file() and load_json(folder / "manifest.json").get("params") == params:
            return ActivationCache.open(folder)
        if state is None:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        else:
            n_seq, total, kept = state["n_sequences"], state["n_tokens"], state["files"]
    pending: dict[str, list[Tensor]] = {s: [] for s in sites}
    bar = tqdm(total=n_tokens, initial=total, disable=not progress, desc="harvest", unit="tok")

    def flush() -> None:
        nonlocal n_pending
        if not n_pending:
            return
        for s in sites:
            block = torch.cat(pending[s]).to(dtype)
            pending[s] = []
            if partial is None:
                kept[s].append(block)
            else:
                name = f"{_safe(s)}.{len(kept[s]):05d}.npy"
                raw = block.view(torch.uint16) if block.dtype == torch.bfloat16 else block  # numpy has no bfloat16
                write_atomic(partial / name, _npy_bytes(raw.numpy()))
                kept[s].append(name)
        n_pending = 0
        if partial is not None:  # the shards are on disk: a resume starts after the sequences they hold
            save_json(partial / "progress.json", {"params": params, "n_sequences": n_seq, "n_tokens": total, "files": kept})

    done = n_tokens is not None and total >= n_tokens
    for batch in () if done else token_batches(tokens, batch_size, start=n_seq):
        if edits:
            with torch.no_grad():
                acts = _sites.run(model, batch, edits, read=sites).acts
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
        n_seq += len(batch["input_ids"])
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
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise ValueError("harvest found no tokens in the source")
    if partial is None:
        return ActivationCache({s: torch.cat(kept[s]) for s in sites})
    save_json(partial / "manifest.json", {"sites": sites, "n_tokens": total, "files": kept, "dtype": params["dtype"], "params": params})
    (partial / "progress.json").unlink()
    replace_folder(partial, folder)
    return ActivationCache.open(folder)


def _harvest_params(tokens: Any, sites: Any, n_tokens: Any, batch_size: Any, shard_tokens: Any, drop_first: Any, dtype: Any,
                    progress: Any, edits: Any, resume: Any, to_disk: bool) -> tuple[list[str], dict]:  # fmt: skip
    """Check harvest's arguments; return the site list and what a resume must agree on (JSON round-tripped)."""
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, Sequence) or not sites or not all(isinstance(s, str) for s in sites) or len(set(sites)) != len(sites):
        raise ValueError(f"harvest: sites must be a site name or a non-empty list of distinct site names, got {sites!r}")
    if n_tokens is not None:
        int_arg("harvest", "n_tokens", n_tokens)
    for name, value in (("batch_size", batch_size), ("shard_tokens", shard_tokens)):
        int_arg("harvest", name, value)
    for name, value in (("drop_first", drop_first), ("progress", progress), ("resume", resume)):
        bool_arg("harvest", name, value)
    name = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, torch.dtype) or name not in _STORED:
        raise ValueError(f"harvest: dtype must be one of {', '.join('torch.' + n for n in _STORED)}; got {dtype!r}")
    if isinstance(edits, (str, Tensor)) or not isinstance(edits, Iterable):
        raise ValueError(f"harvest: edits must be a list of edits (Splice, Steer, ...), got {type(edits).__name__}")
    params = {"sites": list(sites), "n_tokens": n_tokens, "batch_size": batch_size, "shard_tokens": shard_tokens,
              "drop_first": drop_first, "dtype": name, "edits": [type(e).__name__ for e in edits],
              "tokens": _tokens_fingerprint(tokens, batch_size) if to_disk else None}  # fmt: skip
    return list(sites), json.loads(json.dumps(params))


def _tokens_fingerprint(tokens: Any, batch_size: int) -> str | None:
    """A hash of the first batch of token ids, so a resume from another token source is refused (None for a one-shot
    iterator, which cannot be read twice)."""
    if isinstance(tokens, Iterator):
        return None
    first = next(token_batches(tokens, batch_size), None)
    return None if first is None else hashlib.sha256(first["input_ids"].numpy().tobytes()).hexdigest()[:16]


def _pending_harvest(partial: pathlib.Path, params: dict) -> dict | None:
    """The progress of an interrupted harvest with these arguments, its shards checked; None when there is none."""
    if not (partial / "progress.json").is_file():
        return None
    state = load_json(partial / "progress.json")
    if state.get("params") != params:
        have = state.get("params") if isinstance(state.get("params"), dict) else {}
        differ = ", ".join(f"{k}: {have.get(k)!r} there, {params[k]!r} now" for k in params if have.get(k) != params[k])
        raise ValueError(f"harvest: {partial} holds an interrupted harvest with other arguments ({differ}); "
                         f"pass the same arguments to resume it, or resume=False to start afresh")  # fmt: skip
    stored = np.dtype(_STORED[params["dtype"]])
    for names in state["files"].values():
        for f in names:
            _open_shard(partial, f, stored)
    return state


def _safe(site: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in site)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- batch sources


class TensorSource:
    """Batches of rows from a [N, D] table (tensor or memory-mapped cache), a new permutation per epoch.

    With `world` > 1 (distributed training) this process's part of each batch: rows rank::world of it, the only rows
    read, so the ranks' parts make up the batch one process would draw."""

    def __init__(self, acts: Any, batch_size: int, seed: int = 0, *, rank: int = 0, world: int = 1):
        batch_size, seed = int_arg("TensorSource", "batch_size", batch_size), int_arg("TensorSource", "seed", seed, minimum=0)
        world = int_arg("TensorSource", "world", world)
        rank = int_arg("TensorSource", "rank", rank, minimum=0, maximum=world - 1)
        if batch_size % world:
            raise ValueError(f"TensorSource: batch_size={batch_size} does not split evenly over {world} processes; "
                             f"use a multiple of {world}")  # fmt: skip
        if isinstance(acts, np.ndarray):
            acts = torch.from_numpy(acts)
        if not isinstance(acts, (Tensor, _ShardedTable)) or len(acts.shape) != 2:
            raise ValueError(f"TensorSource: acts must be a 2-D table [N, D] (a tensor, a numpy array or a harvested "
                             f"cache[site]); got {type(acts).__name__} of shape {list(getattr(acts, 'shape', []))}")  # fmt: skip
        if len(acts) < batch_size:
            raise ValueError(f"need at least batch_size={batch_size} activations, got {len(acts)}")
        self.acts, self.batch_size, self.seed, self.rank, self.world = acts, batch_size, seed, rank, world
        self.per_epoch = len(acts) // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(len(self.acts), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        rows = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        if isinstance(self.acts, _ShardedTable):
            rows = rows.sort().values  # read in file order
        rows = rows[self.rank::self.world]
        out = torch.as_tensor(self.acts[rows.numpy() if isinstance(self.acts, _ShardedTable) else rows])
        return out if not out.is_floating_point() else out.float()


class ModelSource:
    """Activations at one site harvested on the fly: a buffer of `buffer_tokens` at a time, shuffled.

    Buffer c is harvested from a fixed slice of the sequences, so batch(step) is the same in
    every run and training can resume exactly. `tokens` must support len() and slicing.
    """

    def __init__(self, model: _sites.Model, site: str, tokens: Any, batch_size: int, *, buffer_tokens: int = 2**16,
                 seq_batch: int = 32, drop_first: bool = True, seed: int = 0):
        for name, value in (("batch_size", batch_size), ("buffer_tokens", buffer_tokens), ("seq_batch", seq_batch)):
            int_arg("ModelSource", name, value)
        int_arg("ModelSource", "seed", seed, minimum=0)
        bool_arg("ModelSource", "drop_first", drop_first)
        if not isinstance(site, str):
            raise ValueError(f"ModelSource: site must be one site name, got {site!r}")
        n_seq = _n_sequences(tokens)
        if n_seq is None:
            raise ValueError("ModelSource needs an indexable token source (tensor or Dataset) so that runs can resume")
        if n_seq == 0:
            raise ValueError("ModelSource: tokens is empty; it needs at least one sequence")
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
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(f"TokenSource needs an integer tensor [N, T]; got {type(tokens).__name__} "
                             f"{getattr(tokens, 'dtype', '')} {list(getattr(tokens, 'shape', []))}")  # fmt: skip
        if tokens.numel() and int(tokens.min()) < 0:
            raise ValueError(f"TokenSource: token ids must be >= 0; the tensor holds {int(tokens.min())}")
        self.rows = TensorSource(tokens, batch_size, seed)

    def batch(self, step: int) -> Tensor:
        return self.rows.batch(step).long()
