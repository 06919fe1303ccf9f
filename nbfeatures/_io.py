"""Atomic writes and strict reads: safetensors and JSON only, nothing is ever unpickled.

A file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as save_bytes


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (contiguous, on CPU; tied weights stored as separate copies)."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v  # safetensors refuses tensors that share memory
        seen.add(ptr)
    tensors = out
    write_atomic(path, save_bytes(tensors, metadata=metadata))


def save_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or foreign file raises ValueError naming it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (corrupt, truncated or another format): {e}") from None


def load_json(path: str | os.PathLike) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON (corrupt or truncated): {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, keep: tuple[str, ...] = ()) -> Iterator[pathlib.Path]:
    """Write a folder under a temporary sibling name; it replaces `folder` only when the block ends without error,
    so a crash leaves the old folder (or none), never a mix of old and new files. Entries named in `keep`
    (e.g. a base model's codebooks/, a card.json) move from the old folder into the new one unless rewritten."""
    folder = pathlib.Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in keep:
        if (folder / name).exists() and not (tmp / name).exists():
            os.replace(folder / name, tmp / name)
    replace_folder(tmp, folder)


def replace_folder(new: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rename the finished folder `new` to `folder`; an old `folder` is moved aside first and deleted last."""
    new, folder = pathlib.Path(new), pathlib.Path(folder)
    old = folder.with_name(f".old_{folder.name}")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
