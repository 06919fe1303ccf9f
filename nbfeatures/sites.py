"""The site layer: the one module that imports nnsight.

A *site* is a named activation inside a model. Sites use TransformerLens hook names, which
SAELens stores as `hook_name`, resolved per architecture to a module and to whether the
activation is that module's input or its output:

    blocks.{i}.hook_resid_pre     input of block i            blocks.{i}.hook_resid_post   output of block i
    blocks.{i}.hook_attn_out      output of the attention     blocks.{i}.hook_mlp_out      output of the MLP
    blocks.{i}.attn.hook_z        input of the attention's output projection, split per head [B, T, H, E]
    blocks.{i}.mlp.hook_post      input of the MLP's down projection (the MLP hidden)
    ln_final.hook_normalized      output of the final norm

A raw module path (`transformer.h.3.mlp`) also works and means that module's output.
Every operation touches its sites in forward order inside ONE nnsight trace (nnsight raises
on out-of-order access), and during generation re-enters `tracer.all()` so an edit applies
to every generated token, not only the first forward pass.

Dimension key: B batch, T position, D width at the site, H heads, E head dim, V vocab.
"""

from __future__ import annotations

import re
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import nnsight
import torch
from nnsight import NNsight
from torch import Tensor, nn

from .edits import Edit, check_positions, position_mask

Model = nnsight.Envoy  # nnsight's common base: NNsight(module) and TransformersModel(hf_model) both are one


# ----------------------------------------------------------------------------- wrapping


def wrap(model: nn.Module | Model, tokenizer: Any = None) -> Model:
    """Make any torch module or Hugging Face causal LM an nnsight model.

    A Hugging Face causal LM with a tokenizer becomes a `TransformersModel` (trace and
    generate); a module without one becomes a plain `NNsight` (trace only). Folders, hub ids and
    zoo names go through the zoo's checked loader (`nbf.wrap` and `nbf.load_model` take them).
    """
    if isinstance(model, nnsight.Envoy):
        return model
    if not isinstance(model, nn.Module):
        raise ValueError(f"sites.wrap() takes a torch module; got {type(model).__name__} "
                         "(for a folder, hub id or zoo name use nbf.wrap or nbf.load_model)")  # fmt: skip
    model.eval()
    if tokenizer is not None and hasattr(model, "generate") and hasattr(model, "config"):
        from nnsight.modeling.transformers import TransformersModel

        return TransformersModel(model, tokenizer=tokenizer)
    return NNsight(model)


def unwrap(model: Model | nn.Module) -> nn.Module:
    """The torch module behind a wrapped model."""
    return model._module if isinstance(model, nnsight.Envoy) else model


def tokenizer_of(model: Model) -> Any:
    return getattr(model, "tokenizer", None) if isinstance(model, nnsight.Envoy) else None


# ----------------------------------------------------------------------------- site names


@dataclass(frozen=True)
class _Layout:
    layers: str
    attn: str
    attn_proj: str  # its input is the per-head output (hook_z)
    mlp: str
    mlp_proj: str  # its input is the MLP hidden (hook_post)
    ln_final: str


_LLAMA = _Layout("model.layers", "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", "model.norm")
_LAYOUTS = {
    "gpt2": _Layout("transformer.h", "attn", "attn.c_proj", "mlp", "mlp.c_proj", "transformer.ln_f"),
    "gpt_neox": _Layout("gpt_neox.layers", "attention", "attention.dense", "mlp", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
}
_BLOCK_SITE = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z|mlp\.hook_post)")
_HOOKS = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


@dataclass(frozen=True)
class Site:
    """Where a named activation lives: a module path, its input or output, and a forward-order key."""

    name: str
    module: str
    io: str  # "input" | "output"
    order: float
    heads: int | None = None  # split the last dim into [heads, -1] (hook_z)


def _layout(module: nn.Module) -> _Layout | None:
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type in _LAYOUTS:
        return _LAYOUTS[model_type]
    for layout in _LAYOUTS.values():  # unknown config: recognise the module tree instead
        if _has(module, layout.layers):
            return layout
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


_ORDER: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[int, int]]]" = weakref.WeakKeyDictionary()


def _module_order(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (pre-order index, index of its last descendant).

    A module's input arrives at its pre-order index and its output after all of its
    descendants have run, which orders sites as the forward pass meets them.
    """
    if module not in _ORDER:
        names = [n for n, _ in module.named_modules()]
        index = {n: i for i, n in enumerate(names)}
        last = {}
        for n in reversed(names):
            parts = n.split(".")
            for k in range(len(parts), -1, -1):
                ancestor = ".".join(parts[:k]) if k else ""
                last.setdefault(ancestor, index[n])
        _ORDER[module] = {n: (index[n], last[n]) for n in names}
    return _ORDER[module]


def site_names(model: Model | nn.Module) -> list[str]:
    """The TransformerLens-style site names this model supports, in forward order."""
    module = unwrap(model)
    layout = _layout(module)
    if layout is None:
        return []
    n_layers = len(module.get_submodule(layout.layers))
    return [f"blocks.{i}.{h}" for i in range(n_layers) for h in _HOOKS] + ["ln_final.hook_normalized"]


def _n_heads(module: nn.Module) -> int:
    cfg = module.config
    for attr in ("num_attention_heads", "n_head"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot find the number of attention heads in {type(cfg).__name__}")


def resolve(model: Model | nn.Module, name: str) -> Site:
    """Resolve a site name (TransformerLens hook name or module path) for this model."""
    module = unwrap(model)
    layout = _layout(module)
    path, io, heads = None, "output", None
    m = _BLOCK_SITE.fullmatch(name)
    if layout is not None and m:
        i, hook = int(m.group(1)), m.group(2)
        n_layers = len(module.get_submodule(layout.layers))
        if i < n_layers:
            block = f"{layout.layers}.{i}"
            path, io = {
                "hook_resid_pre": (block, "input"),
                "hook_resid_post": (block, "output"),
                "hook_attn_out": (f"{block}.{layout.attn}", "output"),
                "hook_mlp_out": (f"{block}.{layout.mlp}", "output"),
                "attn.hook_z": (f"{block}.{layout.attn_proj}", "input"),
                "mlp.hook_post": (f"{block}.{layout.mlp_proj}", "input"),
            }[hook]
            heads = _n_heads(module) if hook == "attn.hook_z" else None
    elif layout is not None and name == "ln_final.hook_normalized":
        path = layout.ln_final
    elif name and not m and _has(module, name):
        path = name
    if path is None:
        raise ValueError(_unknown_site_message(module, name))
    pre, last = _module_order(module)[path]
    return Site(name, path, io, pre if io == "input" else last + 0.5, heads)


def _unknown_site_message(module: nn.Module, name: str) -> str:
    names = site_names(module)
    kind = type(module).__name__
    if names:
        n_layers = (len(names) - 1) // len(_HOOKS)
        valid = ", ".join(f"blocks.{{0..{n_layers - 1}}}.{h}" for h in _HOOKS) + ", ln_final.hook_normalized"
        return f"unknown site {name!r} for {kind} ({n_layers} layers); valid sites: {valid}; or a module path such as {names and _example_path(module)}"
    return f"unknown site {name!r} for {kind}: this architecture has no TransformerLens names here; use a module path, e.g. {_example_path(module)}"


def _example_path(module: nn.Module) -> str:
    paths = [n for n, _ in module.named_modules() if n]
    return paths[len(paths) // 2] if paths else "<none>"


# ----------------------------------------------------------------------------- inside a trace


def _envoy(model: Model, path: str) -> Any:
    envoy = model
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _read(envoy: Any, site: Site) -> tuple[Tensor, Any]:
    """The activation at a site, and the raw value it came from (a tuple for transformers-4 blocks and attention)."""
    raw = envoy.input if site.io == "input" else envoy.output
    act = raw[0] if isinstance(raw, tuple) else raw
    if site.heads:
        act = act.unflatten(-1, (site.heads, -1))
    return act, raw


def _write(envoy: Any, site: Site, act: Tensor, raw: Any) -> None:
    if site.heads:
        act = act.flatten(-2)
    if site.io == "input":
        envoy.input = act
    elif isinstance(raw, tuple):
        envoy.output = (act, *raw[1:])
    else:
        envoy.output = act


def _check_finite(site: Site, act: Tensor) -> None:
    if act.is_floating_point() and not bool(torch.isfinite(act).all()):
        bad = int((~torch.isfinite(act)).sum())
        raise ValueError(f"site {site.name}: activations contain {bad} non-finite values (NaN or inf), shape {list(act.shape)}")


@dataclass
class _Event:
    site: Site
    names: list[str]  # the user names read here (several names can resolve to one site)
    edits: list[Edit]


def _plan(model: Model, read: Sequence[str], edits: Sequence[Edit]) -> list[_Event]:
    """Group reads and edits by site and sort them into forward order."""
    events: dict[tuple[str, str], _Event] = {}
    for name in read:
        site = resolve(model, name)
        events.setdefault((site.module, site.io), _Event(site, [], [])).names.append(name)
    for edit in edits:
        if not (isinstance(getattr(edit, "site", None), str) and callable(getattr(edit, "apply", None))):
            raise ValueError(f"edits must be Splice, Steer, Ablate or another object with .site and .apply(act, mask); got {type(edit).__name__}")
        site = resolve(model, edit.site)
        events.setdefault((site.module, site.io), _Event(site, [], [])).edits.append(edit)
    return sorted(events.values(), key=lambda e: e.site.order)


def _visit(model: Model, events: list[_Event], length: int, prompt_len: int, acts: dict, outs: dict) -> None:
    """Run inside a trace: at each site in forward order, apply its edits and record what was asked.

    `length` is the sequence length this forward pass ends at; a pass over T positions covers
    length - T .. length - 1 (the whole prompt, or the newest token under a KV cache).
    """
    for event in events:
        envoy = _envoy(model, event.site.module)
        act, raw = _read(envoy, event.site)
        _check_finite(event.site, act)
        if event.edits:
            offset = length - act.shape[1]
            for edit in event.edits:
                mask = position_mask(getattr(edit, "positions", None), offset, act.shape[1], prompt_len, act.device)
                act, out = edit.apply(act, mask)
                if out is not None:
                    outs[edit.site] = out
            _write(envoy, event.site, act, raw)
        for name in event.names:
            acts[name] = act


# ----------------------------------------------------------------------------- inputs


def _encode(model: Model, inputs: Any) -> dict[str, Tensor]:
    """Token ids [B, T] (or a string / list of strings / tokenizer encoding) -> model kwargs."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, str) for s in inputs)):
        tok = tokenizer_of(model)
        if tok is None:
            raise ValueError("text inputs need a tokenizer: wrap(model, tokenizer=...) or pass token ids")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    elif isinstance(inputs, Tensor):
        if inputs.is_floating_point() or inputs.is_complex():
            raise ValueError(f"token ids must be an integer tensor [B, T]; got dtype {inputs.dtype}")
        enc = {"input_ids": inputs[None] if inputs.dim() == 1 else inputs}
    elif isinstance(inputs, Mapping) and "input_ids" in inputs:
        enc = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    else:
        raise ValueError(
            f"inputs must be token ids [B, T] (an integer tensor), a string, a list of strings "
            f"or a tokenizer encoding; got {type(inputs).__name__}"
        )
    if enc["input_ids"].dim() != 2:
        raise ValueError(f"token ids must have shape [B, T]; got {list(enc['input_ids'].shape)}")
    device = _device(model)
    return {k: v.to(device) for k, v in enc.items()}


def _device(model: Model) -> torch.device:
    p = next(unwrap(model).parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _trace(model: Model, enc: dict[str, Tensor]):
    if isinstance(model, NNsight):  # a plain module takes the ids positionally
        return model.trace(enc["input_ids"], **{k: v for k, v in enc.items() if k != "input_ids"})
    return model.trace(**enc)


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


# ----------------------------------------------------------------------------- operations


class RunOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    acts: dict[str, Tensor]  # site name -> activation as the model saw it (after edits)
    outputs: dict[str, Any]  # site name -> what a spliced module returned (latents etc.)


class GenerateOutput(NamedTuple):
    tokens: Tensor  # [B, T + new]: prompt and completion
    acts: dict[str, Tensor]  # site name -> [B, T + new - 1, ...]: every position the model ran on
    prompt_len: int
    outputs: list[dict[str, Any]] = []  # per forward pass: site -> what an edit returned (a dictionary's output)


def read_acts(model: Model, inputs: Any, sites: str | Sequence[str]) -> dict[str, Tensor]:
    """Activations at several sites from one forward pass that stops after the deepest site."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    if not sites:
        raise ValueError("read_acts needs at least one site")
    events = _plan(model, sites, [])
    enc = _encode(model, inputs)
    with torch.no_grad(), _trace(model, enc) as tracer:
        acts = nnsight.save({})
        _visit(model, events, enc["input_ids"].shape[1], enc["input_ids"].shape[1], acts, {})
        tracer.stop()
    return {name: acts[name] for name in sites}


def run(model: Model, inputs: Any, edits: Sequence[Edit] = (), read: Sequence[str] = ()) -> RunOutput:
    """One forward pass with edits applied in forward order; gradients flow as torch's grad mode says."""
    events = _plan(model, list(read), list(edits))
    enc = _encode(model, inputs)
    prompt_len = enc["input_ids"].shape[1]
    for edit in edits:
        check_positions(getattr(edit, "positions", None), prompt_len, prompt_len)
    with _trace(model, enc):
        acts, outs = nnsight.save({}), nnsight.save({})
        _visit(model, events, prompt_len, prompt_len, acts, outs)
        logits = nnsight.save(_logits(model.output))
    return RunOutput(logits, dict(acts), dict(outs))


def generate(
    model: Model, inputs: Any, edits: Sequence[Edit] = (), *, max_new_tokens: int = 20,
    read: Sequence[str] = (), **generate_kwargs: Any,
) -> GenerateOutput:
    """Generate with edits applied at every forward pass: the prompt's and each new token's.

    Greedy unless `do_sample=True` is passed; other kwargs go to Hugging Face `generate`.
    """
    if not hasattr(model, "generate") or tokenizer_of(model) is None:
        raise ValueError("generation needs a Hugging Face causal LM wrapped with its tokenizer: wrap(model, tokenizer=...)")
    events = _plan(model, list(read), list(edits))
    enc = _encode(model, inputs)
    prompt_len = enc["input_ids"].shape[1]
    for edit in edits:
        check_positions(getattr(edit, "positions", None), prompt_len, prompt_len + max_new_tokens)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tokenizer_of(model).pad_token_id)
    if not events:  # nothing to touch: a tracer.all() loop that reaches no module would never end
        with torch.no_grad():
            tokens = unwrap(model).generate(**enc, max_new_tokens=max_new_tokens, **generate_kwargs)
        return GenerateOutput(tokens, {}, prompt_len, [])
    with warnings.catch_warnings():
        # tracer.all() always asks for one step more than the run makes; nnsight warns about it.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with model.generate(max_new_tokens=max_new_tokens, **generate_kwargs) as tracer:
            with tracer.invoke(**enc):
                steps, outs = nnsight.save([]), nnsight.save([])
                step = 0
                for _ in tracer.all():
                    acts, out = {}, {}
                    # Step 0 runs on the prompt; step s on the sequence up to prompt_len + s
                    # (only its newest token under a KV cache).
                    _visit(model, events, prompt_len + step, prompt_len, acts, out)
                    steps.append({k: (v if step == 0 else v[:, -1:]) for k, v in acts.items()})
                    outs.append(out)
                    step += 1
            with tracer.invoke():
                tokens = nnsight.save(tracer.result)
    acts = {name: torch.cat([s[name] for s in steps], dim=1) for name in read} if steps else {}
    return GenerateOutput(tokens, acts, prompt_len, list(outs))

