"""Pretrained dictionaries by name: SAELens's registry, resolved to files in the local Hugging Face cache.

    locate("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
        -> Located(path=<cache>/models--google--gemma-scope-2b-pt-res/snapshots/<rev>/layer_20/width_16k/average_l0_71,
                   conversion="gemma_2", hook_name="blocks.20.hook_resid_post", model_name="gemma-2-2b", ...)

The registry is `sae_lens/pretrained_saes.yaml` when sae_lens is installed (read as data, sae_lens is not imported),
else the small table VENDORED below. Files are looked up in the hub cache first
(`<cache>/models--<org>--<name>/snapshots/<rev>/<path>`, `refs/main` naming <rev>); with HF_HUB_OFFLINE=1 nothing
touches the network and a missing file is an immediate ValueError; online, a missing file is downloaded.
`io.load_sae(release, sae_id)` reads what `locate` finds (exported as `nbfeatures.sae.locate_pretrained`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import pathlib
import re
from typing import NamedTuple

from .._hub import cache_only

# files of one SAE, per SAELens conversion_func, relative to the SAE's folder in the repo
FILES = {
    "sae_lens": ("cfg.json", "sae_weights.safetensors"),
    "gemma_2": ("params.npz",),
    "llama_scope": ("hyperparams.json", "checkpoints/final.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning_1": ("config.json", "ae.pt"),
}

# A few common releases, copied from sae_lens 6.54's pretrained_saes.yaml, for machines without sae_lens.
VENDORED: dict[str, dict] = {
    "gemma-scope-2b-pt-res-canonical": {
        "repo_id": "google/gemma-scope-2b-pt-res", "model": "gemma-2-2b", "conversion_func": "gemma_2",
        "saes": [{"id": f"layer_{layer}/width_16k/canonical", "path": f"layer_{layer}/width_16k/average_l0_{l0}"}
                 for layer, l0 in ((0, 105), (1, 102), (2, 141), (12, 82), (20, 71), (25, 116))],
    },
    "gpt2-small-res-jb": {
        "repo_id": "jbloom/GPT2-Small-SAEs-Reformatted", "model": "gpt2-small", "conversion_func": None,
        "config_overrides": {"model_from_pretrained_kwargs": {"center_writing_weights": True}},
        "saes": [{"id": f"blocks.{i}.hook_resid_pre", "path": f"blocks.{i}.hook_resid_pre"} for i in range(12)]
                + [{"id": "blocks.11.hook_resid_post", "path": "blocks.11.hook_resid_post"}],
    },
    "llama_scope_lxr_8x": {
        "repo_id": "fnlp/Llama3_1-8B-Base-LXR-8x", "model": "meta-llama/Llama-3.1-8B", "conversion_func": "llama_scope",
        "saes": [{"id": f"l{i}r_8x", "path": f"Llama3_1-8B-Base-L{i}R-8x", "norm_scaling_factor": f}
                 for i, f in ((0, 58.935251798561154), (1, 39.76699029126213), (2, 27.30666666666667), (15, 5.91907514450867))],
    },
}  # fmt: skip


class Located(NamedTuple):
    path: pathlib.Path  # local folder holding the SAE's files (a snapshot folder in the hub cache)
    files: tuple[pathlib.Path, ...]
    release: str
    sae_id: str
    repo_id: str
    repo_path: str  # the SAE's folder inside the repo
    conversion: str  # SAELens conversion_func; "sae_lens" for SAELens's own folder layout
    config_overrides: dict
    hook_name: str | None
    model_name: str
    norm_scaling_factor: float | None  # Llama Scope's dataset-norm factor, when the registry gives one


@functools.cache
def registry() -> dict[str, dict]:
    """SAELens's release table: the installed sae_lens's pretrained_saes.yaml, else VENDORED."""
    spec = importlib.util.find_spec("sae_lens")  # finds the package without importing it (importing is slow)
    if spec is not None and spec.submodule_search_locations:
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
        if path.is_file():
            import yaml

            # the C safe loader when PyYAML has it: same safe semantics, about 5x faster on this 40k-line file
            return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return VENDORED


def locate(release: str, sae_id: str, *, cache_dir: str | os.PathLike | None = None) -> Located:
    """Find a registered SAE's files in the local hub cache (downloading them only when online)."""
    table = registry()
    if release not in table:
        raise ValueError(f"unknown release {release!r}; close matches: {_close(release, table)}")
    entry = table[release]
    saes = {str(s["id"]): s for s in entry["saes"]}
    if sae_id not in saes:
        raise ValueError(f"release {release!r} has no sae_id {sae_id!r}; close matches: {_close(sae_id, saes)} "
                         f"({len(saes)} ids in all)")  # fmt: skip
    sae, repo_id = saes[sae_id], entry["repo_id"]
    conversion = entry.get("conversion_func") or "sae_lens"
    if conversion not in FILES:
        raise ValueError(f"release {release!r} uses SAELens conversion {conversion!r}, which nbfeatures cannot read yet; "
                         f"readable: {sorted(FILES)}")  # fmt: skip
    repo_path = str(sae["path"]).strip("/")
    files = tuple(_cached_file(repo_id, f"{repo_path}/{name}", cache_dir) for name in FILES[conversion])
    folder = files[0].parent
    overrides = dict(entry.get("config_overrides") or {})
    hook_name = overrides.get("hook_name") or _hook_name(conversion, repo_id, repo_path, folder)
    return Located(folder, files, release, sae_id, repo_id, repo_path, conversion, overrides, hook_name,
                   entry["model"], sae.get("norm_scaling_factor"))  # fmt: skip


def hub_cache(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The hub cache folder, from the environment at call time (huggingface_hub reads it once, at import)."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return pathlib.Path(constants.HF_HUB_CACHE)


def _cached_file(repo_id: str, filename: str, cache_dir) -> pathlib.Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache = hub_cache(cache_dir)
    hit = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache))  # reads refs/main, then snapshots/<rev>/
    if isinstance(hit, str):
        return pathlib.Path(hit)
    if cache_only():  # HF_HUB_OFFLINE, or no network: fail now rather than after the download's retries
        raise ValueError(f"{repo_id}: {filename} is not in the Hugging Face cache at {cache}, and the hub cannot be asked "
                         f"(HF_HUB_OFFLINE=1 is set, or no network). Download it where there is network "
                         f"(hf download {repo_id} {filename}) or point HF_HUB_CACHE at a cache that has it.")  # fmt: skip
    try:
        return pathlib.Path(hf_hub_download(repo_id, filename, cache_dir=str(cache)))
    except Exception as e:  # network, auth, missing entry: all mean "not available", said once with the cause
        raise ValueError(f"{repo_id}: could not download {filename} into {cache}: {type(e).__name__}: {e}") from None


def _hook_name(conversion: str, repo_id: str, repo_path: str, folder: pathlib.Path) -> str | None:
    """The TransformerLens hook name, as SAELens's loader for `conversion` derives it."""
    layer = re.search(r"layer_(\d+)", repo_path)
    if conversion == "gemma_2":
        if "res" in repo_id:
            return "hook_embed" if "embedding" in repo_path else f"blocks.{layer.group(1)}.hook_resid_post" if layer else None
        site = "hook_mlp_out" if "mlp" in repo_id else "attn.hook_z" if "att" in repo_id else None
        return f"blocks.{layer.group(1)}.{site}" if layer and site else None
    if conversion == "sparsify":
        from .producers import _sparsify_hook_name

        cfg = _read_json(folder / "cfg.json")
        return _sparsify_hook_name(folder.name, bool(cfg.get("transcode", False)))
    if conversion == "llama_scope":
        return _read_json(folder / "hyperparams.json").get("hook_point_in")
    if conversion == "dictionary_learning_1":
        layer = _read_json(folder / "config.json").get("trainer", {}).get("layer")
        return None if layer is None else f"blocks.{layer}.hook_resid_post"
    cfg = _read_json(folder / "cfg.json")  # SAELens v6 keeps it in metadata; older files at top level
    return (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")


def _read_json(path: pathlib.Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON: {e}") from None
    return obj if isinstance(obj, dict) else {}


def _close(name: str, names) -> list[str]:
    names = list(names)
    return difflib.get_close_matches(name, names, n=5, cutoff=0.5) or sorted(names)[:5]
