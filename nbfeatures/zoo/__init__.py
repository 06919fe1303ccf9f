"""Tiny trained transformers shipped with the package, as plain transformers folders.

Each `nbfeatures/zoo/<name>/` holds config.json, model.safetensors, tokenizer files and model_card.json, so
`AutoModelForCausalLM.from_pretrained(zoo.path(name))` works without nbfeatures. `load_pretrained` adds
zoo names, clear errors for broken folders, and device placement.

Codebook models (`tokfsm-codebook`, `stories-codebook`, ...) are such folders too (the finetuned transformer)
plus codebooks.safetensors and codebooks.json naming their base zoo model; `load_codebook(name)` returns the
model with its codebooks inserted, `load_pretrained(name)` the finetuned transformer alone.
"""

from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).parent
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

__all__ = ["available", "codebook_models", "path", "card", "load_pretrained", "load_codebook"]


def available() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def codebook_models() -> list[str]:
    """Names of the shipped codebook models (a subset of `available()`)."""
    return [n for n in available() if (ZOO_DIR / n / "codebooks.json").is_file()]


def load_codebook(name_or_path: str | Path):
    """A CodebookModel from a zoo codebook model's name or a folder written by CodebookModel.save."""
    from ..codebook_model import load_codebook_model

    name = str(name_or_path)
    if name in codebook_models():
        return load_codebook_model(ZOO_DIR / name)
    if Path(name).expanduser().is_dir():
        return load_codebook_model(Path(name).expanduser())
    raise ValueError(f"{name!r} is neither a zoo codebook model (available: {codebook_models()}) nor a folder")


def path(name: str) -> Path:
    """The folder of shipped model `name`."""
    if name not in available():
        raise ValueError(f"unknown zoo model {name!r}; available: {available()}")
    return ZOO_DIR / name


def card(name: str) -> dict:
    """The model card: training config, tokens seen, wall time, hardware, final metrics, weights' sha256."""
    return json.loads((path(name) / "model_card.json").read_text())


def load_pretrained(name_or_path: str | Path, device=None):
    """(model, tokenizer) from a zoo name, a local folder or a hub id; the model is in eval mode.

    The tokenizer is None when a local folder has no tokenizer files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name in available():
        folder = ZOO_DIR / name
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
