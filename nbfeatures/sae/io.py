"""Dictionary files: the SAELens v6 folder layout (every SAELens architecture), plus other producers' folders.

    <folder>/cfg.json                 d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
                                      reshape_activations, architecture (+ its fields: k, d_out, ...), metadata {...}
    <folder>/sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out] (+ threshold,
                                      b_gate, r_mag, b_mag, W_skip by architecture; see saelens_format.py)
    <folder>/sparsity.safetensors     optional: {"sparsity": log10 feature density [d_sae]}

Reading checks cfg.json against the safetensors header (8-byte little-endian length, then JSON) before anything is
allocated, so a small file claiming d_sae = 10^9 fails at once. sparsify, dictionary_learning, Gemma Scope and Llama
Scope folders are converted by producers.py to the same (cfg, tensors) pair. `load_sae(release, sae_id)` loads a
pretrained dictionary of SAELens's registry from the local Hugging Face cache (pretrained.py finds the files), as
`SAE.from_pretrained` would: the registry's config_overrides applied, its norm_scaling_factor folded in, and
hook_name, model_name, release and sae_id recorded in `sae.metadata`. `metadata.sae_lens_version` must parse as
>= 6.0.0 or SAELens discards the metadata, so it is always written ("6.0.0": the v6 layout); our own version goes in
`metadata.nbfeatures_version`. BatchTopK and Matryoshka SAEs are written for inference as SAELens writes them, as
`jumprelu` (our JumpReLU SAE too), with `metadata.training_architecture` and `training_architecture_details`, from
which they load back as themselves. A folder is written under a temporary sibling name and renamed into place;
nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
from typing import Any

import torch
from torch import nn

from .._io import atomic_folder, load_json, load_tensors, save_json, save_tensors
from .._versions import __version__
from .pretrained import locate, registry
from .producers import read_foreign
from .saelens_format import ARCHITECTURES, LLM_METADATA_KEYS, file_shapes, from_saelens, saelens_cfg, to_saelens

SAE_LENS_FORMAT_VERSION = "6.0.0"
CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# safetensors dtype -> bytes per element; only the float ones are dictionary weights
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
_FLOATS = ("F16", "BF16", "F32", "F64")
_MAX_HEADER = 100_000_000  # what safetensors itself accepts


def register_architecture(name: str, module_cls: type[nn.Module], config_cls: type) -> None:
    """Let load_sae build a dictionary from a cfg.json whose `architecture` is `name`; `config_cls` is a dataclass
    whose fields are read from cfg.json (those with defaults may be absent)."""
    if not dataclasses.is_dataclass(config_cls) or not {"d_in", "d_sae"} <= {f.name for f in dataclasses.fields(config_cls)}:
        raise ValueError(f"register_architecture({name!r}): the config must be a dataclass with d_in and d_sae fields")
    ARCHITECTURES[name] = (module_cls, config_cls)


def save_sae(sae: nn.Module, folder: str | os.PathLike, *, hook_name: str | None = None, hf_hook_name: str | None = None,
             model_name: str | None = None, sparsity: torch.Tensor | None = None, **metadata: Any) -> pathlib.Path:
    """Write `sae` as a SAELens v6 folder; `sparsity` is log10 feature density [d_sae]. Metadata the dictionary was
    loaded with is kept unless overridden here. Other files already in `folder` stay."""
    folder = pathlib.Path(folder)
    cfg, tensors = to_saelens(sae)
    trained = cfg.pop("metadata", {})  # what a dictionary written as a SAELens architecture really is (JumpReLU, BatchTopK, ...)
    old = dict(getattr(sae, "metadata", None) or {})
    given = {"model_name": model_name, "hook_name": hook_name, "hf_hook_name": hf_hook_name,
             "prepend_bos": metadata.pop("prepend_bos", None)}  # fmt: skip
    meta = {"sae_lens_training_version": None, "model_name": None, "hook_name": None, "hf_hook_name": None, "hook_head_index": None,
            "prepend_bos": None, "model_from_pretrained_kwargs": {}, **old, **{k: v for k, v in given.items() if v is not None},
            **metadata, **trained, "sae_lens_version": SAE_LENS_FORMAT_VERSION, "nbfeatures_version": __version__}  # fmt: skip
    if cfg["reshape_activations"] == "hook_z" and meta["hook_name"] is not None and not str(meta["hook_name"]).endswith("_z"):
        raise ValueError(f"hook_name={meta['hook_name']!r}: a reshape_activations='hook_z' dictionary reads a hook_z site "
                         "(SAELens refuses any other hook name)")  # fmt: skip
    if sparsity is not None and tuple(sparsity.shape) != (cfg["d_sae"],):
        raise ValueError(f"sparsity has shape {list(sparsity.shape)}, expected [d_sae] = [{cfg['d_sae']}]")
    others = sorted(p for p in folder.iterdir() if p.name not in (CFG, WEIGHTS, SPARSITY)) if folder.is_dir() else []
    with atomic_folder(folder, keep=tuple(p.name for p in others if p.is_dir())) as tmp:
        for p in others:  # files that are not ours move with the folder
            if p.is_file():
                try:
                    os.link(p, tmp / p.name)
                except OSError:
                    shutil.copy2(p, tmp / p.name)
        save_tensors(tmp / WEIGHTS, tensors)
        if sparsity is not None:
            save_tensors(tmp / SPARSITY, {"sparsity": sparsity.float()})
        save_json(tmp / CFG, {**cfg, "metadata": meta})
    return folder


def load_sae(folder: str | os.PathLike, sae_id: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """Load a dictionary from a SAELens (any version), sparsify, dictionary_learning, Gemma Scope or Llama Scope folder;
    or, given a SAELens release name and `sae_id`, the pretrained one from the Hugging Face cache in `cache_dir`
    (default: HF_HUB_CACHE), downloading it only when HF_HUB_OFFLINE is unset."""
    if sae_id is not None:
        return _load_pretrained(str(folder), str(sae_id), cache_dir)
    if isinstance(folder, str) and not os.path.exists(folder) and folder in registry():
        ids = [str(s["id"]) for s in registry()[folder]["saes"]]
        if len(ids) == 1:
            return _load_pretrained(folder, ids[0], cache_dir)
        raise ValueError(f"{folder!r} is a SAELens release with {len(ids)} dictionaries: pass one as sae_id, "
                         f"e.g. load_sae({folder!r}, {ids[0]!r})")  # fmt: skip
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (nor a SAELens release: load_sae(release, sae_id) loads those)")
    if (folder / WEIGHTS).exists():
        return _load_saelens(folder)
    foreign = read_foreign(folder)
    if foreign is not None:
        return from_saelens(*foreign, str(folder))
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"{folder}: not a dictionary folder. Expected cfg.json + sae_weights.safetensors (SAELens), "
        f"cfg.json + sae.safetensors (sparsify), config.json + ae.pt (dictionary_learning), params.npz (Gemma Scope) "
        f"or hyperparams.json + checkpoints/final.safetensors (Llama Scope); found {found}"
    )


def load_sparsity(folder: str | os.PathLike) -> torch.Tensor | None:
    path = pathlib.Path(folder) / SPARSITY
    return load_tensors(path)["sparsity"] if path.exists() else None


def read_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header, reading nothing else; ValueError if it is not one."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    size = path.stat().st_size

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a readable safetensors file (corrupt, truncated or another format): {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise bad(f"header length {n} in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data, out = size - 8 - n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in _ITEMSIZE and all(type(d) is int and d >= 0 for d in shape) and 0 <= begin <= end <= data
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"entry {name!r} = {entry!r} does not fit the file")
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"{name!r} has shape {list(shape)} of {dtype} but {end - begin} bytes")
        out[name] = (dtype, shape)
    return out


def _load_pretrained(release: str, sae_id: str, cache_dir) -> nn.Module:
    """SAE.from_pretrained(release, sae_id), reading the files `locate` finds."""
    loc = locate(release, sae_id, cache_dir=cache_dir)
    # SAELens updates the loader's cfg with the overrides; a v6 cfg keeps metadata apart, so metadata keys go there too
    overrides = dict(loc.config_overrides)
    meta = {k: v for k, v in overrides.items() if k in LLM_METADATA_KEYS}
    where = f"{release} / {sae_id} ({loc.path})"
    if loc.conversion == "sae_lens":
        sae = _load_saelens(loc.path, overrides, loc.norm_scaling_factor)
    else:
        foreign = read_foreign(loc.path)
        if foreign is None:
            raise ValueError(f"{where}: the files of conversion {loc.conversion!r} are not readable: "
                             f"{sorted(p.name for p in loc.path.iterdir())}")  # fmt: skip
        cfg, tensors = foreign
        cfg = {**cfg, **{k: v for k, v in overrides.items() if k not in meta}, "metadata": {**cfg["metadata"], **meta}}
        factor, folded = loc.norm_scaling_factor, cfg["metadata"].get("norm_scaling_factor")
        if factor is not None and folded is not None and factor != folded:
            # producers folded the factor computed from hyperparams.json; SAELens folds the registry's into the weights
            # (the threshold keeps the computed one, as SAELens's llama_scope loader scales it)
            r = factor / folded
            tensors = {**tensors, "W_enc": tensors["W_enc"] * r, "W_dec": tensors["W_dec"] / r, "b_dec": tensors["b_dec"] / r}
            cfg["metadata"]["norm_scaling_factor"] = factor
        elif factor is not None and folded is None:
            cfg["norm_scaling_factor"] = factor  # folded by from_saelens when normalize_activations asks for it
        sae = from_saelens(cfg, tensors, where)
    sae.metadata.update(meta)
    sae.metadata.update(hook_name=loc.hook_name or sae.metadata.get("hook_name"), model_name=meta.get("model_name", loc.model_name),
                        release=release, sae_id=sae_id)  # fmt: skip
    return sae


def _load_saelens(folder: pathlib.Path, overrides: dict | None = None, norm_scaling_factor: float | None = None) -> nn.Module:
    cfg_path, weights = folder / CFG, folder / WEIGHTS
    raw = {**load_json(cfg_path), **(overrides or {})}
    if norm_scaling_factor is not None:  # the registry's factor, as SAE.from_pretrained folds it
        raw["norm_scaling_factor"] = norm_scaling_factor
    cfg = saelens_cfg(raw, str(cfg_path))
    expected, header = file_shapes(cfg, str(cfg_path)), read_header(weights)
    arch, legacy_scale = cfg["architecture"], "scaling_factor"  # a pre-6.0 finetuning scale, dropped when all ones
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected) - {legacy_scale})
    if missing or extra:
        raise ValueError(f"{weights}: tensors do not match architecture {arch!r} of {cfg_path.name}: "
                         f"missing {missing}, unexpected {extra}")  # fmt: skip
    sizes = ", ".join(f"{k}={cfg[k]}" for k in ("d_in", "d_sae", "d_out") if k in cfg)
    for name in sorted(header, key=lambda n: (n not in expected, list(expected).index(n) if n in expected else 0)):
        dtype, shape = header[name]
        if dtype not in _FLOATS:
            raise ValueError(f"{weights}: {name} has dtype {dtype}, not a float ({', '.join(_FLOATS)})")
        want = expected.get(name, (cfg["d_sae"],))
        if shape != want:
            raise ValueError(f"{weights}: {name} has shape {list(shape)}, expected {list(want)} "
                             f"from the config ({cfg_path.name}: {sizes})")  # fmt: skip
    tensors = load_tensors(weights)
    if legacy_scale in tensors:
        if not torch.allclose(tensors[legacy_scale], torch.ones_like(tensors[legacy_scale])):
            raise ValueError(f"{weights}: {legacy_scale} is not all ones (a pre-6.0 finetuning scale, "
                             "which SAELens 6 cannot load either)")  # fmt: skip
        del tensors[legacy_scale]
    return from_saelens(cfg, tensors, str(folder))
