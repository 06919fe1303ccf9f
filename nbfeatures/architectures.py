"""Where each TransformerLens site lives in each Hugging Face architecture: one row per `config.model_type`.

TransformerLens semantics, which the site layer reproduces exactly (tests/test_architectures.py checks every site of
every row against raw torch hooks):
    hook_embed              the token embedding's output
    hook_resid_pre / post   the block's input / output
    ln1 / ln2.hook_normalized   the output of the norm in front of attention / the MLP
    hook_attn_out           what attention adds to the residual stream (after any post-attention norm or multiplier)
    hook_resid_mid          resid_pre + attn_out, what the MLP half of a sequential block starts from
    hook_mlp_out            what the MLP adds to the residual stream
    attn.hook_z             the per-head input of attention's output projection [B, T, H, E]
    attn.hook_pattern       attention probabilities [B, H, T, S]
    mlp.hook_post           the input of the MLP's down projection (absent in a mixture of experts)
    ln_final.hook_normalized    the final norm's output

A raw module path (`transformer.h.3.mlp`) also works and means that module's output; a TransformerLens
HookedTransformer's own hook names resolve to its hook points. Sites are ordered by the model's true execution
order, measured once per model with forward hooks, so any set of sites can be visited in one pass.

Pure data and torch: no nnsight here (sites.py applies the table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import attention_patterns
from .attention_patterns import PATTERN_MODULE, patterns_on


@dataclass(frozen=True)
class Arch:
    """Module paths (block-relative below `layers`) and the quirks that change what a site means."""

    layers: str  # the ModuleList of blocks
    embed: str  # token embedding
    ln_final: str
    ln1: str | None  # norm in front of attention (None: there is none)
    attn: str
    o_proj: str  # attention's output projection: its input is hook_z
    ln2: str | None  # norm in front of the MLP (None: none, or a parallel block sharing ln1)
    mlp: str
    down_proj: str | None  # the MLP's down projection: its input is hook_post (None: mixture of experts)
    attn_out: str | None = None  # the module whose output attention adds (default: attn)
    mlp_out: str | None = None  # the module whose output the MLP adds (default: mlp)
    parallel: bool = False  # attention and MLP both read resid_pre (no hook_resid_mid)
    resid_inside: bool = False  # attention and MLP add the residual themselves (Bloom): subtract it
    multiplier: str | None = None  # a config attribute scaling each sublayer's output before it is added (Granite)
    pattern: bool = True  # attention goes through transformers' attention interface (hook_pattern available)
    flat_mlp: bool = False  # the MLP half runs on tokens flattened to [B*T, D] (OPT)
    unsupported: str | None = None  # why this configuration has no TransformerLens names


_LLAMA = Arch("model.layers", "model.embed_tokens", "model.norm", "input_layernorm", "self_attn", "self_attn.o_proj",
              "post_attention_layernorm", "mlp", "mlp.down_proj")  # fmt: skip
_GPT2 = Arch("transformer.h", "transformer.wte", "transformer.ln_f", "ln_1", "attn", "attn.c_proj", "ln_2", "mlp", "mlp.c_proj")
_GEMMA2 = dataclasses.replace(_LLAMA, ln2="pre_feedforward_layernorm", attn_out="post_attention_layernorm",
                              mlp_out="post_feedforward_layernorm")  # fmt: skip
_BLOOM = Arch("transformer.h", "transformer.word_embeddings", "transformer.ln_f", "input_layernorm", "self_attention",
              "self_attention.dense", "post_attention_layernorm", "mlp", "mlp.dense_4h_to_h", resid_inside=True, pattern=False)  # fmt: skip


def _gpt_neox(cfg: Any) -> Arch:
    return Arch("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "input_layernorm", "attention",
                "attention.dense", "post_attention_layernorm", "mlp", "mlp.dense_4h_to_h", parallel=bool(cfg.use_parallel_residual))  # fmt: skip


def _opt(cfg: Any) -> Arch:
    arch = Arch("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm", "self_attn_layer_norm",
                "self_attn", "self_attn.out_proj", "final_layer_norm", "fc2", "fc2", flat_mlp=True)  # fmt: skip
    if not getattr(cfg, "do_layer_norm_before", True):
        return dataclasses.replace(arch, unsupported="OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m) adds "
                                                      "sublayer outputs before its norms")  # fmt: skip
    return arch


def _bloom(cfg: Any) -> Arch:
    if getattr(cfg, "apply_residual_connection_post_layernorm", False):
        return dataclasses.replace(_BLOOM, unsupported="Bloom with apply_residual_connection_post_layernorm=True")
    return _BLOOM


def _falcon(cfg: Any) -> Arch:
    base = Arch("transformer.h", "transformer.word_embeddings", "transformer.ln_f", "input_layernorm", "self_attention",
                "self_attention.dense", None, "mlp", "mlp.dense_4h_to_h", parallel=True, pattern=False)  # fmt: skip
    if cfg.new_decoder_architecture and (cfg.num_ln_in_parallel_attn or 2) == 2:
        return dataclasses.replace(base, ln1="ln_attn", ln2="ln_mlp")
    if cfg.new_decoder_architecture or cfg.parallel_attn:
        return base
    return dataclasses.replace(base, ln2="post_attention_layernorm", parallel=False)


def _stablelm(cfg: Any) -> Arch:
    return dataclasses.replace(_LLAMA, ln2=None, parallel=True) if cfg.use_parallel_residual else _LLAMA


ARCHITECTURES: dict[str, Any] = {
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "gpt_neox": _gpt_neox,
    "gptj": Arch("transformer.h", "transformer.wte", "transformer.ln_f", "ln_1", "attn", "attn.out_proj", None, "mlp", "mlp.fc_out",
                 parallel=True),  # fmt: skip
    "opt": _opt,
    "bloom": _bloom,
    "falcon": _falcon,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "olmo": _LLAMA, "smollm3": _LLAMA,
    "phi3": _LLAMA,
    "mixtral": dataclasses.replace(_LLAMA, down_proj=None),
    "qwen2_moe": _LLAMA,  # dense layers keep mlp.down_proj; sparse ones lack it (checked per layer)
    "granite": dataclasses.replace(_LLAMA, multiplier="residual_multiplier"),
    "starcoder2": dataclasses.replace(_LLAMA, down_proj="mlp.c_proj"),
    "stablelm": _stablelm,
    "cohere": dataclasses.replace(_LLAMA, ln2=None, parallel=True),
    "phi": Arch("model.layers", "model.embed_tokens", "model.final_layernorm", "input_layernorm", "self_attn", "self_attn.dense",
                None, "mlp", "mlp.fc2", parallel=True),  # fmt: skip
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo2": dataclasses.replace(_LLAMA, ln1=None, ln2=None, attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm"),
}  # fmt: skip


def arch_of(module: nn.Module) -> Arch | None:
    """The row for this model: by config.model_type, else by structure (the first row whose modules all exist)."""
    cfg = getattr(module, "config", None)
    row = ARCHITECTURES.get(getattr(cfg, "model_type", None))
    if row is not None:
        return row(cfg) if callable(row) else row
    for row in ARCHITECTURES.values():  # an architecture outside the table: recognise the module tree
        try:
            arch = row(cfg) if callable(row) else row
        except AttributeError:  # a config-dependent row whose config fields this model lacks
            continue
        if arch.unsupported:
            continue
        if _has(module, arch.layers) and _has(module, arch.embed) and _has(module, arch.ln_final):
            block = f"{arch.layers}.0"
            needed = [arch.attn, arch.o_proj, arch.mlp, *(p for p in (arch.ln1, arch.ln2, arch.down_proj) if p)]
            if all(_has(module, f"{block}.{p}") for p in needed):
                return arch
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# ----------------------------------------------------------------------------- sites


_HOOKS = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
          "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")  # forward order within a block
_BLOCK_SITE = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(h) for h in _HOOKS) + ")")


@dataclass(frozen=True)
class Site:
    """Where a named activation lives: a module's input or output, and how to read it from there."""

    name: str
    module: str
    io: str  # "input" | "output"
    order: float  # position in the model's execution order
    heads: int | None = None  # split the last dim into [heads, -1] (hook_z)
    minus: tuple[str, str] | None = None  # (module, io) whose value (as it flows on) is subtracted on read (Bloom)
    scale: float = 1.0  # the site is the raw value times this (Granite's residual multiplier)
    carry: str | None = None  # a block whose output must carry an edit's change (hook_resid_mid)
    flat: bool = False  # the module sees tokens flattened to [B*T, ...]: viewed as [B, T, ...] here


def _block_sites(arch: Arch, module: nn.Module, i: int) -> dict[str, dict]:
    """hook -> Site fields for block i (only the hooks this architecture has)."""
    blk = f"{arch.layers}.{i}"
    scale = float(getattr(module.config, arch.multiplier)) if arch.multiplier else 1.0
    out = {"hook_resid_pre": dict(module=blk, io="input")}
    if arch.ln1:
        out["ln1.hook_normalized"] = dict(module=f"{blk}.{arch.ln1}", io="output")
    if arch.pattern:
        out["attn.hook_pattern"] = dict(module=f"{blk}.{arch.attn}.{PATTERN_MODULE}", io="output")
    out["attn.hook_z"] = dict(module=f"{blk}.{arch.o_proj}", io="input", heads=_n_heads(module))
    out["hook_attn_out"] = dict(module=f"{blk}.{arch.attn_out or arch.attn}", io="output", scale=scale,
                                minus=(blk, "input") if arch.resid_inside else None)  # fmt: skip
    flat = arch.flat_mlp
    if not arch.parallel:
        out["hook_resid_mid"] = dict(module=f"{blk}.{arch.ln2 or arch.mlp}", io="input", carry=blk, flat=flat)
    if arch.ln2:
        out["ln2.hook_normalized"] = dict(module=f"{blk}.{arch.ln2}", io="output", flat=flat)
    if arch.down_proj and _has(module, f"{blk}.{arch.down_proj}"):
        out["mlp.hook_post"] = dict(module=f"{blk}.{arch.down_proj}", io="input", flat=flat)
    out["hook_mlp_out"] = dict(module=f"{blk}.{arch.mlp_out or arch.mlp}", io="output", scale=scale, flat=flat,
                               minus=(f"{blk}.{arch.attn}", "output") if arch.resid_inside else None)  # fmt: skip
    out["hook_resid_post"] = dict(module=blk, io="output")
    return out


def _tl_hooks(module: nn.Module) -> list[str]:
    """A TransformerLens HookedTransformer's hook points that its forward pass uses, in execution order."""
    order = execution_order(module)
    names = [n for n, m in module.named_modules() if type(m).__name__ == "HookPoint" and (n, "output") in order]
    return sorted(names, key=lambda n: order[(n, "output")])


def site_names(module: nn.Module) -> list[str]:
    """The TransformerLens site names this model supports, in forward order."""
    if type(module).__name__ == "HookedTransformer":
        return _tl_hooks(module)
    arch = arch_of(module)
    if arch is None or arch.unsupported:
        return []
    n_layers = len(module.get_submodule(arch.layers))
    return (["hook_embed"] + [f"blocks.{i}.{h}" for i in range(n_layers) for h in _block_sites(arch, module, i)]
            + ["ln_final.hook_normalized"])  # fmt: skip


def resolve(module: nn.Module, name: str) -> Site:
    """Resolve a site name (TransformerLens hook name or module path) for this model."""
    arch = arch_of(module)
    fields = None
    m = _BLOCK_SITE.fullmatch(name)
    if type(module).__name__ == "HookedTransformer" or arch is None or arch.unsupported:
        if name and _has(module, name):  # a TransformerLens hook point, or a module path
            fields = dict(module=name, io="output")
        elif m or name in ("hook_embed", "ln_final.hook_normalized"):
            layouts = sorted({r.layers for r in ARCHITECTURES.values() if isinstance(r, Arch)} | {"gpt_neox.layers", "model.decoder.layers"})
            why = (arch.unsupported if arch is not None and arch.unsupported else
                   f"{type(module).__name__} is not in the site table and no known layout was found in it (a block list at "
                   f"one of {layouts} with its attention, MLP and norms)")  # fmt: skip
            raise ValueError(f"site {name!r}: {why}, so TransformerLens names cannot be resolved exactly; "
                             f"use a module path such as {_example_path(module)!r}")  # fmt: skip
    elif m and int(m.group(1)) < len(module.get_submodule(arch.layers)):
        fields = _block_sites(arch, module, int(m.group(1))).get(m.group(2))
        if fields is None:
            raise ValueError(_absent_message(module, arch, m.group(2)))
    elif name == "hook_embed":
        fields = dict(module=arch.embed, io="output")
    elif name == "ln_final.hook_normalized":
        fields = dict(module=arch.ln_final, io="output")
    elif name and not m and _has(module, name):
        fields = dict(module=name, io="output")
    if fields is None:
        raise ValueError(_unknown_site_message(module, name))
    return Site(name, order=_order_of(module, fields["module"], fields["io"]), **fields)


def _absent_message(module: nn.Module, arch: Arch, hook: str) -> str:
    kind = getattr(module.config, "model_type", type(module).__name__)
    instead = {
        "hook_resid_mid": "attention and the MLP both read hook_resid_pre in this parallel block; use hook_resid_pre",
        "mlp.hook_post": "its MLP is a mixture of experts with no single down projection; use hook_mlp_out or an expert's module path",
        "ln1.hook_normalized": "it has no norm in front of attention; use hook_resid_pre",
        "ln2.hook_normalized": "it has no separate norm in front of the MLP; use ln1.hook_normalized or hook_resid_mid",
        "attn.hook_pattern": "its attention does not go through transformers' attention interface; use attn.hook_z",
    }.get(hook, "")
    return f"site blocks.N.{hook} does not exist in {kind}: {instead}"


def _unknown_site_message(module: nn.Module, name: str) -> str:
    names = site_names(module)
    kind = type(module).__name__
    if names:
        arch = arch_of(module)
        n_layers = len(module.get_submodule(arch.layers)) if arch else 0
        hooks = sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.")}, key=lambda h: _HOOKS.index(h) if h in _HOOKS else 99)
        valid = ", ".join(["hook_embed"] + [f"blocks.{{0..{n_layers - 1}}}.{h}" for h in hooks] + ["ln_final.hook_normalized"])
        return f"unknown site {name!r} for {kind} ({n_layers} layers); valid sites: {valid}; or a module path such as {_example_path(module)}"
    return f"unknown site {name!r} for {kind}: this architecture has no TransformerLens names here; use a module path, e.g. {_example_path(module)}"


def _example_path(module: nn.Module) -> str:
    paths = [n for n, _ in module.named_modules() if n]
    return paths[len(paths) // 2] if paths else "<none>"


def _n_heads(module: nn.Module) -> int:
    cfg = module.config
    for attr in ("num_attention_heads", "n_head"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot find the number of attention heads in {type(cfg).__name__}")


# ----------------------------------------------------------------------------- execution order


_ORDER: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], float]]" = weakref.WeakKeyDictionary()


def execution_order(module: nn.Module) -> dict[tuple[str, str], float]:
    """(module path, "input" | "output") -> its place in the model's execution order; measured once per model."""
    if module not in _ORDER:
        _ORDER[module] = _measured_order(module) or _registration_order(module)
    return _ORDER[module]


def _order_of(module: nn.Module, path: str, io: str) -> float:
    order = execution_order(module)
    if (path, io) in order:
        return order[(path, io)]
    raise ValueError(f"module {path!r} never ran in a forward pass of {type(module).__name__}, so its {io} cannot be read")


def _measured_order(module: nn.Module) -> dict[tuple[str, str], float] | None:
    """(module path, "input" | "output") -> when it happened in a 2-token forward pass (None if one cannot be run)."""
    arch = arch_of(module)
    with_patterns = arch is not None and not arch.unsupported and arch.pattern
    if with_patterns:
        attach_pattern_modules(module)
    seen: dict[tuple[str, str], float] = {}

    def note(key: tuple[str, str]) -> None:  # a hook that returns None leaves the module's inputs and outputs alone
        seen.setdefault(key, float(len(seen)))

    handles = []
    for name, mod in module.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda *_, n=name: note((n, "input"))))
        handles.append(mod.register_forward_hook(lambda *_, n=name: note((n, "output"))))
    try:
        with torch.no_grad(), (patterns_on(module) if with_patterns else contextlib.nullcontext()):
            ids = torch.zeros(1, 2, dtype=torch.long, device=next(module.parameters()).device)
            module(ids) if type(module).__name__ == "HookedTransformer" else module(input_ids=ids)
    except Exception:  # not a language model we can call with token ids: fall back to the module tree
        return None
    finally:
        for h in handles:
            h.remove()
    return seen


def _registration_order(module: nn.Module) -> dict[tuple[str, str], float]:
    """A module's input arrives at its pre-order index and its output after all of its descendants (plain torch
    modules, where no forward pass can be run to measure the true order)."""
    names = [n for n, _ in module.named_modules()]
    index = {n: i for i, n in enumerate(names)}
    last = {}
    for n in reversed(names):
        parts = n.split(".")
        for k in range(len(parts), -1, -1):
            last.setdefault(".".join(parts[:k]) if k else "", index[n])
    depth = {n: n.count(".") + bool(n) for n in names}  # a parent's output comes after its last child's
    return {**{(n, "input"): float(index[n]) for n in names}, **{(n, "output"): last[n] + 0.5 - 1e-3 * depth[n] for n in names}}


def attach_pattern_modules(module: nn.Module) -> None:
    """The pattern module on every attention of a table architecture whose attention exposes probabilities."""
    arch = arch_of(module)
    if arch is not None and not arch.unsupported and arch.pattern:
        attention_patterns.attach_pattern_modules(block.get_submodule(arch.attn) for block in module.get_submodule(arch.layers))
