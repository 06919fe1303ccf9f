"""Other producers' dictionary files, converted to a SAELens v6 (cfg, tensors) pair.

`read_foreign(folder)` recognises a folder by its files and returns `(cfg, tensors)` in SAELens v6's naming
(W_enc [D, F], b_enc [F], W_dec [F, D_out], b_dec [D_out], threshold [F], W_skip [D_out, D]), or None when the
folder is not a foreign one (a SAELens folder, say). `cfg["metadata"]["source_format"]` names the producer.

    producer             files                                  architecture (cfg)
    sparsify             cfg.json + sae.safetensors             topk | nbfeatures.groupmax | nbfeatures.topk_transcoder
    dictionary_learning  config.json + ae.pt                    standard | gated | jumprelu | topk
    gemma_scope          params.npz                             jumprelu, apply_b_dec_to_input False (att: hook_z)
    llama_scope          hyperparams.json + checkpoints/final.safetensors   jumprelu, dataset norm folded in

Two architectures SAELens 6 lacks, built by sparsify_format.py (both with fields k, d_out, apply_b_dec_to_input and
skip_connection, which adds W_skip):

    pre = relu((x - b_dec if apply_b_dec_to_input else x) W_enc + b_enc)
    nbfeatures.topk_transcoder:  latents = pre on its k largest entries per row, 0 elsewhere
    nbfeatures.groupmax:         latents = pre at the max of each of k contiguous groups of d_sae/k, 0 elsewhere
    x_hat = latents W_dec + b_dec (+ x W_skip^T, on the raw input x)

Dimension key: D input dim, D_out output dim, F latents.
Nothing is unpickled: ae.pt is read with torch.load(weights_only=True), params.npz with allow_pickle=False.
"""

from __future__ import annotations

import math
import os
import pathlib
import re

import numpy as np
import torch

from .._io import load_json, load_tensors


def read_foreign(path: str | os.PathLike, *, topk_threshold: bool = False) -> tuple[dict, dict] | None:
    """Convert a sparsify, dictionary_learning, Gemma Scope or Llama Scope folder (or its weights file) to a SAELens
    (cfg, tensors) pair; None if it is none of these. `topk_threshold` encodes a dictionary_learning AutoEncoderTopK
    with its learned threshold (its `encode(use_threshold=True)`) instead of per-token top-k."""
    folder = pathlib.Path(path)
    if folder.is_file():
        folder = folder.parent
    if folder.name == "checkpoints" and (folder / "final.safetensors").is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: not a folder or file")
    if (folder / "sae_weights.safetensors").exists():
        return None  # SAELens's own layout: not foreign
    if (folder / "sae.safetensors").exists():
        return _sparsify(folder)
    if (folder / "ae.pt").exists():
        return _dictionary_learning(folder, topk_threshold)
    if (folder / "params.npz").exists():
        return _gemma_scope(folder)
    if (folder / "hyperparams.json").exists():
        return _llama_scope(folder)
    return None


def _cfg(arch: str, tensors: dict, *, apply_b_dec_to_input: bool, metadata: dict, **fields) -> dict:
    d_in, d_sae = tensors["W_enc"].shape
    return {
        "architecture": arch, "d_in": d_in, "d_sae": d_sae, **fields,
        "dtype": str(tensors["W_dec"].dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": None, "model_name": None, **metadata},
    }  # fmt: skip


def _checked(where: pathlib.Path, tensors: dict[str, torch.Tensor], d_out: int | None = None) -> dict[str, torch.Tensor]:
    """Check every shape against W_enc [D, F] (and D_out), and that nothing is NaN or infinite."""
    d_in, d_sae = tensors["W_enc"].shape
    d_out = d_in if d_out is None else d_out
    shapes = {"b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "threshold": (d_sae,), "W_skip": (d_out, d_in),
              "b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,)}  # fmt: skip
    for name, t in tensors.items():
        if name != "W_enc" and tuple(t.shape) != shapes[name]:
            raise ValueError(f"{where}: {name} has shape {list(t.shape)}, expected {list(shapes[name])} "
                             f"(from W_enc [{d_in}, {d_sae}])")  # fmt: skip
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {name} contains NaN or infinite values")
    return {name: t.contiguous() for name, t in tensors.items()}


def _require(where: pathlib.Path, found, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{where}: missing {missing}; found {sorted(found)}")


# ---- EleutherAI sparsify: sparsify/sparse_coder.py SparseCoder, sparsify/fused_encoder.py


def _sparsify(folder: pathlib.Path) -> tuple[dict, dict]:
    where = folder / "sae.safetensors"
    raw, t = load_json(folder / "cfg.json"), load_tensors(where)
    _require(where, t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    d_sae, d_in = t["encoder.weight"].shape
    if raw.get("d_in", d_in) != d_in:
        raise ValueError(f"{folder}/cfg.json: d_in={raw['d_in']} but encoder.weight is [{d_sae}, {d_in}]")
    activation, k = raw.get("activation", "topk"), int(raw.get("k", 32))
    transcode, skip = bool(raw.get("transcode", False)), "W_skip" in t
    if activation not in ("topk", "groupmax"):
        raise ValueError(f"{folder}/cfg.json: activation {activation!r} is not one of 'topk', 'groupmax'")
    if bool(raw.get("skip_connection", skip)) != skip:
        raise ValueError(f"{folder}: cfg.json says skip_connection={raw['skip_connection']} but W_skip is {'present' if skip else 'absent'}")
    if not 0 < k <= d_sae or (activation == "groupmax" and d_sae % k):
        raise ValueError(f"{folder}/cfg.json: k={k} does not fit {d_sae} latents with activation {activation!r}")
    # encoder is an nn.Linear [F, D]; W_dec [F, D] is already SAELens's orientation; `x @ W_skip.mT` is SAELens's too
    tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if skip:
        tensors["W_skip"] = t["W_skip"]
    tensors = _checked(where, tensors)
    hookpoint = folder.name
    metadata = {"source_format": "sparsify", "hook_name": _sparsify_hook_name(hookpoint, transcode), "hf_hook_name": hookpoint,
                "transcode": transcode, "multi_topk": bool(raw.get("multi_topk", False))}  # fmt: skip
    if (folder.parent / "config.json").is_file():  # the training run's config, one level up
        metadata["model_name"] = load_json(folder.parent / "config.json").get("model")
    # sparsify always subtracts b_dec unless transcoding (SparseCoder.encode); multi_topk only changes the training loss
    if activation == "topk" and not transcode and not skip:
        return _cfg("topk", tensors, apply_b_dec_to_input=True, metadata=metadata, k=k, rescale_acts_by_decoder_norm=False), tensors
    arch = "nbfeatures.groupmax" if activation == "groupmax" else "nbfeatures.topk_transcoder"
    return _cfg(arch, tensors, apply_b_dec_to_input=not transcode, metadata=metadata, k=k, d_out=d_in, skip_connection=skip), tensors


def _sparsify_hook_name(hookpoint: str, transcode: bool) -> str | None:
    if hookpoint == "embed_tokens":
        return "hook_embed"
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)(\.mlp)?", hookpoint)
    if m is None or (m.group(2) and transcode):
        return None  # a transcoder reads the MLP's input and writes its output; hf_hook_name keeps the module path
    return f"blocks.{m.group(1)}.hook_mlp_out" if m.group(2) else f"blocks.{m.group(1)}.hook_resid_post"


# ---- saprmarks/dictionary_learning: dictionary.py, trainers/{top_k,batch_top_k,matryoshka_batch_top_k}.py


def _dictionary_learning(folder: pathlib.Path, topk_threshold: bool) -> tuple[dict, dict]:
    where = folder / "ae.pt"
    try:
        sd = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{where}: not a plain tensor state dict (refused without unpickling code): {e}") from None
    if isinstance(sd, dict) and "ae" in sd and "config" in sd:
        raise ValueError(f"{where}: a training checkpoint (ae/config/norm_factor, biases not rescaled); use the final ae.pt")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{where}: expected a dict of tensors (a state dict)")
    trainer = load_json(folder / "config.json").get("trainer", {}) if (folder / "config.json").exists() else {}
    dict_class = trainer.get("dict_class") or _guess_dict_class(where, sd)
    metadata = {"source_format": "dictionary_learning", "dict_class": dict_class, "lm_name": trainer.get("lm_name"),
                "model_name": trainer.get("lm_name"), "layer": trainer.get("layer"), "submodule_name": trainer.get("submodule_name"),
                "hook_name": _dl_hook_name(trainer)}  # fmt: skip
    if dict_class in ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        _require(where, sd, ("encoder.weight", "decoder.weight"))
    if dict_class == "AutoEncoder":
        _require(where, sd, ("encoder.bias", "bias"))
        W_enc, b_enc, W_dec = sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T
        norms = W_dec.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms)):  # AutoEncoder.from_pretrained(normalize_decoder=True)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
            metadata["decoder_normalized"] = True
        tensors = _checked(where, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": sd["bias"]})
        return _cfg("standard", tensors, apply_b_dec_to_input=True, metadata=metadata), tensors
    if dict_class == "AutoEncoderNew":  # encode = relu(encoder(x)), decoder has its own bias
        _require(where, sd, ("encoder.bias", "decoder.bias"))
        tensors = _checked(where, {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"],
                                   "W_dec": sd["decoder.weight"].T, "b_dec": sd["decoder.bias"]})  # fmt: skip
        return _cfg("standard", tensors, apply_b_dec_to_input=False, metadata=metadata), tensors
    if dict_class == "GatedAutoEncoder":  # SAELens's gated SAE is the same equation with these names
        _require(where, sd, ("gate_bias", "mag_bias", "r_mag", "decoder_bias"))
        tensors = _checked(where, {"W_enc": sd["encoder.weight"].T, "b_gate": sd["gate_bias"], "r_mag": sd["r_mag"],
                                   "b_mag": sd["mag_bias"], "W_dec": sd["decoder.weight"].T, "b_dec": sd["decoder_bias"]})  # fmt: skip
        return _cfg("gated", tensors, apply_b_dec_to_input=True, metadata=metadata), tensors
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input is an attribute, False, not saved
        _require(where, sd, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"))
        tensors = _checked(where, {k: sd[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")})
        return _cfg("jumprelu", tensors, apply_b_dec_to_input=False, metadata=metadata), tensors
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        if dict_class == "MatryoshkaBatchTopKSAE":  # nn.Parameters W_enc [D, F], W_dec [F, D]
            _require(where, sd, ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"))
            W_enc, b_enc, W_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"]
            metadata["group_sizes"] = [int(g) for g in sd["group_sizes"].tolist()]
        else:
            _require(where, sd, ("encoder.bias", "b_dec", "k", "threshold"))
            W_enc, b_enc, W_dec = sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T
        k, threshold = int(sd["k"]), float(sd["threshold"])
        metadata.update(k=k, threshold=threshold)
        base = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": sd["b_dec"]}
        if dict_class == "AutoEncoderTopK" and not topk_threshold:  # its encode() default: per-token top-k
            tensors = _checked(where, base)
            return _cfg("topk", tensors, apply_b_dec_to_input=True, metadata=metadata, k=k, rescale_acts_by_decoder_norm=False), tensors
        if threshold < 0 and dict_class == "AutoEncoderTopK":
            raise ValueError(f"{where}: threshold is {threshold} (never learned); read it without topk_threshold=True")
        # encode(use_threshold=True): relu(pre) * (relu(pre) > threshold), which is SAELens's jumprelu for any threshold
        tensors = _checked(where, {**base, "threshold": torch.full_like(b_enc, threshold)})
        return _cfg("jumprelu", tensors, apply_b_dec_to_input=True, metadata=metadata), tensors
    raise ValueError(f"{folder}/config.json: dict_class {dict_class!r} is not supported; supported: AutoEncoder, AutoEncoderNew, "
                     "GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE")  # fmt: skip


def _guess_dict_class(where: pathlib.Path, sd: dict) -> str:
    """Without config.json, the state dict's keys name the class, except top-k versus batch top-k."""
    keys = set(sd)
    if {"W_enc", "group_sizes"} <= keys:
        return "MatryoshkaBatchTopKSAE"
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if "gate_bias" in keys:
        return "GatedAutoEncoder"
    if {"encoder.weight", "bias"} <= keys:
        return "AutoEncoder"
    if {"encoder.weight", "decoder.bias"} <= keys:
        return "AutoEncoderNew"
    raise ValueError(f"{where}: cannot tell the dictionary class from the keys {sorted(keys)} and there is no config.json "
                     "(AutoEncoderTopK and BatchTopKSAE save the same keys)")  # fmt: skip


def _dl_hook_name(trainer: dict) -> str | None:
    layer, sub = trainer.get("layer"), str(trainer.get("submodule_name") or "resid_post")
    if layer is None:
        return None
    for word, hook in (("mlp", "hook_mlp_out"), ("attn", "hook_attn_out"), ("resid", "hook_resid_post")):
        if word in sub:
            return f"blocks.{layer}.{hook}"
    return None


# ---- Gemma Scope (google/gemma-scope-*): one params.npz per SAE; SAELens loader gemma_2


def _gemma_scope(folder: pathlib.Path) -> tuple[dict, dict]:
    where = folder / "params.npz"
    try:
        with np.load(where, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # a pickled object array, a truncated zip, not a zip at all
        raise ValueError(f"{where}: not a readable .npz of plain arrays: {e}") from None
    arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
    _require(where, arrays, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"))
    scale = arrays.pop("scaling_factor", None)
    if scale is not None and not np.allclose(scale, 1.0):
        raise ValueError(f"{where}: scaling_factor is not all ones (finetuning scaling is not supported)")
    extra = sorted(set(arrays) - {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"})
    if extra:
        raise ValueError(f"{where}: unexpected arrays {extra}")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in arrays.items()}
    if tensors["W_enc"].ndim != 2:
        raise ValueError(f"{where}: W_enc has shape {list(tensors['W_enc'].shape)}, expected [d_in, d_sae]")
    parts = folder.resolve().parts
    if any("embedding" in p for p in parts[-3:]):  # as SAELens's gemma_2 loader: trained on embeddings scaled by sqrt(d_model)
        d = tensors["W_enc"].shape[0]
        tensors["W_enc"], tensors["W_dec"] = tensors["W_enc"] / math.sqrt(d), tensors["W_dec"] * math.sqrt(d)
    tensors = _checked(where, tensors)
    metadata = {"source_format": "gemma_scope", **_gemma_hook(parts)}
    cfg = _cfg("jumprelu", tensors, apply_b_dec_to_input=False, metadata=metadata)
    if str(metadata.get("hook_name")).endswith("hook_z"):  # SAELens reads an attention SAE's [.., H, E] input as [.., H*E]
        cfg["reshape_activations"] = "hook_z"
    return cfg, tensors


def _gemma_hook(parts: tuple[str, ...]) -> dict:
    """Hook and model from a hub-cache path (models--google--gemma-scope-2b-pt-res/.../layer_20/...), as SAELens names them."""
    repo = next((p for p in parts if p.startswith("models--google--gemma-scope-")), None)
    layer = next((int(m.group(1)) for p in parts if (m := re.fullmatch(r"layer_(\d+)", p))), None)
    if repo is None:
        return {}
    m = re.fullmatch(r"models--google--gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)(?:-.*)?", repo)
    if m is None:
        return {}
    size, kind, site = m.groups()
    model = f"gemma-2-{size}" + ("-it" if kind == "it" else "")
    if "embedding" in parts:
        return {"hook_name": "hook_embed", "model_name": model}
    hook = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}.get(site)
    return {"hook_name": f"blocks.{layer}.{hook}" if hook and layer is not None else None, "model_name": model}


# ---- Llama Scope (fnlp/Llama3_1-8B-Base-LX*): hyperparams.json + checkpoints/final.safetensors; SAELens loader llama_scope


def _llama_scope(folder: pathlib.Path) -> tuple[dict, dict]:
    hp_path, where = folder / "hyperparams.json", folder / "checkpoints" / "final.safetensors"
    hp, t = load_json(hp_path), load_tensors(where)
    _require(hp_path, hp, ("d_model", "d_sae", "jump_relu_threshold", "hook_point_in", "dataset_average_activation_norm"))
    _require(where, t, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"))
    d_in, norm_in = int(hp["d_model"]), hp["dataset_average_activation_norm"].get("in")
    if not isinstance(norm_in, (int, float)) or norm_in <= 0:
        raise ValueError(f"{hp_path}: dataset_average_activation_norm.in must be a positive number, got {norm_in!r}")
    # The SAE saw x * sqrt(d_model) / average norm. SAELens folds that factor into W_enc and the decoder
    # (fold_activation_norm_scaling_factor) and scales the scalar threshold by it too; we return the folded result.
    nsf = d_in**0.5 / norm_in
    W_enc = t["encoder.weight"].T * nsf
    tensors = {"W_enc": W_enc, "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T / nsf, "b_dec": t["decoder.bias"] / nsf,
               "threshold": torch.full_like(t["encoder.bias"], hp["jump_relu_threshold"] * nsf)}  # fmt: skip
    if tuple(W_enc.shape) != (d_in, hp["d_sae"]):
        raise ValueError(f"{where}: encoder.weight is {list(t['encoder.weight'].shape)}, "
                         f"expected [{hp['d_sae']}, {d_in}] from hyperparams.json")  # fmt: skip
    tensors = _checked(where, tensors)
    metadata = {"source_format": "llama_scope", "hook_name": hp["hook_point_in"], "hook_name_out": hp.get("hook_point_out"),
                "model_name": "meta-llama/Llama-3.1-8B", "norm_scaling_factor": nsf,
                "jump_relu_threshold": hp["jump_relu_threshold"]}  # fmt: skip
    return _cfg("jumprelu", tensors, apply_b_dec_to_input=False, metadata=metadata), tensors
