"""Dictionary files: the SAELens v6 folder layout, plus readers for sparsify and dictionary_learning.

    <folder>/cfg.json                 d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
                                      reshape_activations, architecture (+ its fields, e.g. k), metadata {...}
    <folder>/sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    <folder>/sparsity.safetensors     optional: {"sparsity": log10 feature density [d_sae]}

`metadata.sae_lens_version` must parse as >= 6.0.0 or SAELens discards the metadata, so it is
always written ("6.0.0": the v6 layout); our own version goes in `metadata.nbfeatures_version`.
Files are written atomically; nothing is unpickled (dictionary_learning's `ae.pt` is read with
`torch.load(weights_only=True)`, which only admits tensors and plain containers).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import torch
from torch import nn

from .._io import load_json, load_tensors, save_json, save_tensors
from .._versions import __version__

SAE_LENS_FORMAT_VERSION = "6.0.0"
_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
# architecture name in cfg.json -> (module class, config class); each dictionary's file registers itself
ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {}


def register_architecture(name: str, module_cls: type[nn.Module], config_cls: type) -> None:
    """Let load_sae build a dictionary from a cfg.json whose `architecture` is `name`; `config_cls` is a dataclass
    whose fields are read from cfg.json (those with defaults may be absent)."""
    if not dataclasses.is_dataclass(config_cls) or not {"d_in", "d_sae"} <= {f.name for f in dataclasses.fields(config_cls)}:
        raise ValueError(f"register_architecture({name!r}): the config must be a dataclass with d_in and d_sae fields")
    ARCHITECTURES[name] = (module_cls, config_cls)


def save_sae(sae: nn.Module, folder: str | os.PathLike, *, hook_name: str | None = None, hf_hook_name: str | None = None,
             model_name: str | None = None, sparsity: torch.Tensor | None = None, **metadata: Any) -> pathlib.Path:
    """Write `sae` as a SAELens v6 folder; `sparsity` is log10 feature density [d_sae]."""
    folder = pathlib.Path(folder)
    arch = getattr(sae, "architecture", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"cannot save {type(sae).__name__}: architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
    tensors = {name: p for name, p in sae.state_dict().items()}
    dtype = str(sae.W_dec.dtype).removeprefix("torch.")
    cfg = {
        **sae.config_dict(),
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": getattr(sae, "apply_b_dec_to_input", True),
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        cfg["rescale_acts_by_decoder_norm"] = False  # our decoder rows are unit-norm already
    cfg["architecture"] = arch
    cfg["metadata"] = {
        "sae_lens_version": SAE_LENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": hook_name,
        "hf_hook_name": hf_hook_name,
        "hook_head_index": None,
        "prepend_bos": metadata.pop("prepend_bos", None),
        "model_from_pretrained_kwargs": {},
        "nbfeatures_version": __version__,
        **metadata,
    }
    save_tensors(folder / "sae_weights.safetensors", tensors)
    if sparsity is not None:
        save_tensors(folder / "sparsity.safetensors", {"sparsity": sparsity.float()})
    save_json(folder / "cfg.json", cfg)  # last: a folder with cfg.json is complete
    return folder


def load_sae(folder: str | os.PathLike) -> nn.Module:
    """Load a dictionary from a SAELens, sparsify or dictionary_learning folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if (folder / "sae_weights.safetensors").exists():
        return _load_saelens(folder)
    if (folder / "sae.safetensors").exists():
        return _load_sparsify(folder)
    if (folder / "ae.pt").exists():
        return _load_dictionary_learning(folder)
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"{folder}: not a dictionary folder. Expected cfg.json + sae_weights.safetensors (SAELens), "
        f"cfg.json + sae.safetensors (sparsify) or config.json + ae.pt (dictionary_learning); found {found}"
    )


def load_sparsity(folder: str | os.PathLike) -> torch.Tensor | None:
    path = pathlib.Path(folder) / "sparsity.safetensors"
    return load_tensors(path)["sparsity"] if path.exists() else None


def _build(folder: pathlib.Path, arch: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"{folder}: architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    module_cls, config_cls = ARCHITECTURES[arch]
    extra = [f for f in dataclasses.fields(config_cls) if f.name not in ("d_in", "d_sae")]
    try:
        config = config_cls(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                            **{f.name: cfg[f.name] for f in extra if f.name in cfg or f.default is dataclasses.MISSING})  # fmt: skip
    except KeyError as e:
        raise ValueError(f"{folder}: config lacks {e.args[0]!r}, needed for architecture {arch!r}") from None
    sae = module_cls(config, seed=None)
    expected = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{folder}: weights do not match architecture {arch!r}: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{folder}: {name} has shape {list(tensors[name].shape)}, expected {list(shape)} from the config")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{folder}: {name} contains non-finite values")
    dtype = getattr(torch, str(cfg.get("dtype", "float32")).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{folder}: unknown dtype {cfg.get('dtype')!r}")
    sae.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    return sae.to(dtype)


def _load_saelens(folder: pathlib.Path) -> nn.Module:
    cfg = load_json(folder / "cfg.json")
    tensors = load_tensors(folder / "sae_weights.safetensors")
    arch = cfg.get("architecture")
    if arch is None:
        raise ValueError(f"{folder}/cfg.json: no 'architecture' field (written by a SAELens older than v6?)")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold it into the weights")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=1)  # fold the decoder norms in, as SAELens does for inference
        tensors = {**tensors, "W_enc": tensors["W_enc"] * norms, "b_enc": tensors["b_enc"] * norms, "W_dec": tensors["W_dec"] / norms[:, None]}
    sae = _build(folder, arch, cfg, tensors)
    sae.metadata = cfg.get("metadata", {})
    return sae


def _load_sparsify(folder: pathlib.Path) -> nn.Module:
    cfg = load_json(folder / "cfg.json")
    t = load_tensors(folder / "sae.safetensors")
    if "encoder.weight" not in t:
        raise ValueError(f"{folder}/sae.safetensors: no 'encoder.weight'; keys are {sorted(t)}")
    d_sae, d_in = t["encoder.weight"].shape
    if cfg.get("activation", "topk") != "topk" or "W_skip" in t or cfg.get("transcode"):
        raise ValueError(f"{folder}: only plain TopK sparsify SAEs are supported (no groupmax, skip connection or transcoder)")
    tensors = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    sae = _build(folder, "topk", {"d_in": cfg.get("d_in", d_in), "d_sae": d_sae, "k": cfg["k"]}, tensors)
    sae.metadata = {"source_format": "sparsify"}
    return sae


def _load_dictionary_learning(folder: pathlib.Path) -> nn.Module:
    cfg = load_json(folder / "config.json")
    try:
        sd = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{folder}/ae.pt: not a plain tensor state dict (refused without unpickling code): {e}") from None
    trainer = cfg.get("trainer", {})
    dict_class = trainer.get("dict_class", "AutoEncoder")
    arch = {"AutoEncoderTopK": "topk", "AutoEncoder": "standard"}.get(dict_class)
    if arch is None:
        raise ValueError(f"{folder}: dictionary_learning class {dict_class!r} is not supported; supported: AutoEncoder, AutoEncoderTopK")
    d_sae, d_in = sd["encoder.weight"].shape
    tensors = {
        "W_enc": sd["encoder.weight"].t(), "b_enc": sd["encoder.bias"],
        "W_dec": sd["decoder.weight"].t(), "b_dec": sd["b_dec"] if "b_dec" in sd else sd["bias"],
    }
    k = int(sd["k"]) if "k" in sd else trainer.get("k")
    sae = _build(folder, arch, {"d_in": d_in, "d_sae": d_sae, "k": k}, tensors)
    sae.metadata = {"source_format": "dictionary_learning", "layer": trainer.get("layer"), "lm_name": trainer.get("lm_name")}
    return sae
