"""Tiny trained models shipped with the package and the ONE checked loader for zoo names, folders and hub ids.

Everything tied to a base model lives under its folder, and every folder has a `card.json` (how it was made,
what it measures):

    zoo/<model>/                       a plain transformers folder (config.json, model.safetensors, tokenizer)
    zoo/<model>/codebooks/<name>/      a codebook model: the finetuned transformer + codebooks.{json,safetensors}
    zoo/<model>/saes/<run>/            a dictionary in the SAELens v6 layout
    zoo/<model>/inversion/             an InversionView decoder

`AutoModelForCausalLM.from_pretrained(zoo.path(name))` works without nbfeatures. `load_pretrained` adds zoo
names, refuses folders whose weights do not match their config (transformers would fill them at random), and
places the model; `load_model` / `wrap` return it wrapped for the site layer. The scripts that rebuild every
folder are in `nbfeatures.recipes`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import sites

ZOO_DIR = Path(__file__).parent
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

__all__ = ["available", "base_models", "codebook_models", "path", "saes", "card", "load_pretrained", "load_model", "wrap"]


def base_models() -> list[str]:
    """Names of the shipped base models."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def codebook_models() -> list[str]:
    """Names of the shipped codebook models."""
    return sorted(p.name for p in ZOO_DIR.glob("*/codebooks/*") if (p / "codebooks.json").is_file())


def available() -> list[str]:
    """Names of every shipped model: base models and codebook models (each a transformers folder)."""
    return sorted(base_models() + codebook_models())


def path(name: str) -> Path:
    """The folder of shipped model `name`."""
    if name in base_models():
        return ZOO_DIR / name
    found = [p for p in ZOO_DIR.glob(f"*/codebooks/{name}") if name in codebook_models()]
    if not found:
        raise ValueError(f"unknown zoo model {name!r}; available: {available()}")
    return found[0]


def saes(model: str) -> dict[str, Path]:
    """The dictionaries shipped for base model `model`: run name -> folder (SAELens v6 layout + card.json)."""
    folder = path(model) / "saes"
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "card.json").is_file()} if folder.is_dir() else {}


def card(name_or_folder: str | os.PathLike) -> dict:
    """The card of a zoo model by name, or of any zoo folder: how it was made (config, data seen, time, hardware,
    command, weights' sha256) and what it measured."""
    folder = path(name_or_folder) if isinstance(name_or_folder, str) and name_or_folder in available() else Path(name_or_folder)
    if not (folder / "card.json").is_file():
        raise ValueError(f"{folder} has no card.json (zoo models: {available()})")
    return json.loads((folder / "card.json").read_text())


def load_pretrained(name_or_path: str | Path, device=None):
    """(model, tokenizer) from a zoo name, a local folder or a hub id; the model is in eval mode.

    The tokenizer is None when a local folder has no tokenizer files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name in available():
        folder = path(name)
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser()
    elif isinstance(name_or_path, Path) or name.startswith((".", "/", "~")):
        raise ValueError(f"no folder at {name!r} (and it is not a zoo model; available: {available()})")
    else:  # a hub id: transformers resolves it (and explains a failure in its own words)
        try:
            model = AutoModelForCausalLM.from_pretrained(name)
        except OSError as err:
            raise ValueError(f"{name!r} is not a zoo model (available: {available()}), a local folder, "
                             f"or a loadable hub id: {err}") from err  # fmt: skip
        return _place(model, device), AutoTokenizer.from_pretrained(name)
    model = _load_checked(folder)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    return _place(model, device), AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def _load_checked(folder: Path):
    """Load a local folder, raising ValueError naming it when the config, weights or their shapes are wrong."""
    from transformers import AutoModelForCausalLM

    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    if files is None:
        raise ValueError(f"{folder} is not a folder")
    if "config.json" not in files:
        raise ValueError(f"{folder} has no config.json; files there: {files}")
    if not any(f in files for f in WEIGHT_FILES):
        raise ValueError(f"{folder} has no weights (expected one of {list(WEIGHT_FILES)}); files there: {files}")
    # Load leniently, then refuse anything transformers would have filled with random values.
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
    mismatched = sorted(info["mismatched_keys"], key=lambda m: m[0])  # by name: the same message on every run
    problems = [f"{k}: saved {tuple(saved)}, config expects {tuple(want)}" for k, saved, want in mismatched]
    problems += [f"{k}: the config's model needs it but the weights lack it" for k in sorted(info["missing_keys"])]
    problems += [f"{k}: in the weights but not in the model the config builds" for k in sorted(info["unexpected_keys"])]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"weights in {folder} do not match its config.json ({len(problems)} problems): {shown}")
    return model


def _place(model, device):
    model.eval()
    return model.to(device) if device is not None else model


def load_model(name_or_path: str | os.PathLike, device: Any = None) -> sites.Model:
    """A zoo name (`nbf.zoo.available()`), a local model folder or a hub id -> the wrapped model with its tokenizer."""
    hf, tokenizer = load_pretrained(name_or_path, device=device)
    return sites.wrap(hf, tokenizer)


def wrap(model: Any, tokenizer: Any = None) -> sites.Model:
    """`sites.wrap` for modules; a folder, hub id or zoo name goes through `load_model`'s checked loader."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("wrap(folder or name) reads the tokenizer from the folder; pass tokenizer= only with a module")
        return load_model(model)
    return sites.wrap(model, tokenizer)
