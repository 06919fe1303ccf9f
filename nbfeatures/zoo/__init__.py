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
from .._hub import hub_offline, hub_reachable

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def load_pretrained(name_or_path: str | os.PathLike, device=None):
    """(model, tokenizer) from a zoo name, a local folder or a hub id; the model is in eval mode.

    The tokenizer is None when a local folder has no tokenizer files (`load_model` refuses such a folder). A hub
    id is read from the local cache first; offline (HF_HUB_OFFLINE=1, or no network) an id not in the cache fails
    at once instead of after the hub client's retries.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"name_or_path must be a zoo name ({available()}), a model folder or a hub id (a non-empty "
                         f"string or path); got {name_or_path!r}")  # fmt: skip
    device = _check_device(device)
    name = str(name_or_path)
    if name in available():
        folder = path(name)
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser()
    elif isinstance(name_or_path, os.PathLike) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"no folder at {name!r} (and it is not a zoo model; available: {available()})")
    else:  # a hub id: the local cache first; the hub only when it can answer
        local_only = _hub_local_only(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only)
        except (OSError, ValueError) as err:
            raise ValueError(f"{name!r} is not a zoo model (available: {available()}), a local folder, "
                             f"or a loadable hub id: {err}") from err  # fmt: skip
        return _place(model, device), _tokenizer(name, local_files_only=local_only)
    model = _load_checked(folder)
    has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)
    return _place(model, device), _tokenizer(folder) if has_tokenizer else None


def _check_device(device):
    if device is None:
        return None
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be None, a torch.device or a device string such as 'cpu' or 'cuda:0'; got {device!r}") from err


def _tokenizer(source, local_files_only: bool = False):
    """The tokenizer at a folder or hub id, refused when it holds no vocabulary (it would turn every text into [])."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, TypeError) as err:
        if not isinstance(source, Path):  # a hub model without a tokenizer: the model alone is still useful
            return None
        raise ValueError(f"{source}: the tokenizer files there ({_present(source, TOKENIZER_FILES)}) do not load: {err}") from err
    if not set(tok.get_vocab()) - set(tok.all_special_tokens):  # only special tokens: every text encodes to []
        raise ValueError(f"{source}: the tokenizer there has an empty vocabulary (files: {_present(source, TOKENIZER_FILES)}); "
                         f"a tokenizer needs tokenizer.json, or vocab.json with merges.txt, or a sentencepiece model")  # fmt: skip
    return tok


def _present(folder, names) -> list[str]:
    return [f for f in names if isinstance(folder, Path) and (folder / f).is_file()]


def _hub_local_only(name: str) -> bool:
    """True when the hub id must be read from the local cache; raises at once when it is not there and the hub
    cannot be asked (HF_HUB_OFFLINE set, or no network), rather than after tens of seconds of retries."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError as err:  # HFValidationError: not even the shape of a hub id
        raise ValueError(f"{name!r} is not a zoo model (available: {available()}), a local folder, or a hub id "
                         f"('owner/name'): {err}") from err  # fmt: skip
    offline = hub_offline()
    if cached:
        return offline or not hub_reachable()
    if offline:
        raise ValueError(f"{name!r} is not a zoo model (available: {available()}), not a local folder, and not in the "
                         f"local hub cache; HF_HUB_OFFLINE is set, so the hub is not asked (unset HF_HUB_OFFLINE to "
                         f"download it, or pass a zoo name or a model folder)")  # fmt: skip
    if not hub_reachable():
        raise ValueError(f"{name!r} is not a zoo model (available: {available()}), not a local folder, and not in the "
                         f"local hub cache, and the hub cannot be reached (no network); set HF_HUB_OFFLINE=1 to work "
                         f"from the cache, or pass a zoo name or a model folder")  # fmt: skip
    return False


def _load_checked(folder: Path):
    """Load a local folder, raising ValueError naming it when the config, weights or their shapes are wrong."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    if files is None:
        raise ValueError(f"{folder} is not a folder")
    if "config.json" not in files:
        raise ValueError(f"{folder} has no config.json; files there: {files}")
    if not any(f in files for f in WEIGHT_FILES):
        raise ValueError(f"{folder} has no weights (expected one of {list(WEIGHT_FILES)}); files there: {files}")
    # Load leniently, then refuse anything transformers would have filled with random values.
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a notebook cell
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:  # corrupt JSON or weights, an unknown model_type
        raise ValueError(f"{folder} is not a loadable transformers model folder (config.json or weights corrupt, truncated "
                         f"or of an unknown model type): {type(err).__name__}: {err}") from err  # fmt: skip
    finally:
        if bars:
            hf_logging.enable_progress_bar()
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
    if tokenizer is None:  # without one every text prompt would fail later, far from the cause
        where = path(str(name_or_path)) if str(name_or_path) in available() else name_or_path
        raise ValueError(f"{where} has no tokenizer (looked for {list(TOKENIZER_FILES)}); save one there "
                         f"(tokenizer.save_pretrained(folder)), or load the module with zoo.load_pretrained and "
                         f"pass it to wrap(module, tokenizer)")  # fmt: skip
    return sites.wrap(hf, tokenizer)


def wrap(model: Any, tokenizer: Any = None) -> sites.Model:
    """`sites.wrap` for modules; a folder, hub id or zoo name goes through `load_model`'s checked loader."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("wrap(folder or name) reads the tokenizer from the folder; pass tokenizer= only with a module")
        return load_model(model)
    return sites.wrap(model, tokenizer)
