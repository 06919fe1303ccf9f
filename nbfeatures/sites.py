"""The site layer: the one module that imports nnsight.

A *site* is a named activation inside a model. Sites use TransformerLens hook names, which SAELens stores as
`hook_name`, with TransformerLens semantics on every architecture of the table in `architectures.py` (which says
where each site lives and what quirks change it: post-sublayer norms, a residual added inside a sublayer, branch
multipliers, parallel blocks, mixtures of experts). A raw module path (`transformer.h.3.mlp`) also works and means
that module's output; a TransformerLens HookedTransformer answers to its own hook names.

Every operation touches its sites in the model's execution order (measured once per model) inside ONE nnsight
trace, so any list order works, and during generation re-enters `tracer.all()` so an edit applies to every
generated token, not only the first forward pass. A two-site edit (`Transcode`) names an `in_site` upstream of its
site: that value is kept as the pass goes by and handed to `apply(act, mask, source=x_in)`. Reading
`attn.hook_pattern` runs that call's attention on the eager path through a pattern module (`architectures.py`).

Dimension key: B batch, T position, D width at the site, H heads, E head dim, V vocab.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import nnsight
import torch
from nnsight import NNsight
from nnsight.modeling.transformers import TransformersModel
from torch import Tensor, nn

from . import architectures
from ._checks import as_int
from .architectures import Site, attach_pattern_modules, patterns_on
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
    attach_pattern_modules(model)
    architectures.execution_order(model)  # measured now (one 2-token forward), so later calls run only what they ask
    if tokenizer is not None and hasattr(model, "generate") and hasattr(model, "config"):
        return TransformersModel(model, tokenizer=tokenizer)
    if tokenizer is not None:  # e.g. a TransformerLens model: its tokenizer lives on the module, as TransformerLens keeps it
        model.tokenizer = tokenizer
    return NNsight(model)


def unwrap(model: Model | nn.Module) -> nn.Module:
    """The torch module behind a wrapped model."""
    return model._module if isinstance(model, nnsight.Envoy) else model


def tokenizer_of(model: Model) -> Any:
    if isinstance(model, TransformersModel):
        return model.tokenizer
    return getattr(unwrap(model), "tokenizer", None) if isinstance(model, nnsight.Envoy) else None


def decode_each(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token id decoded alone, keeping a word's leading space: SentencePiece tokenizers (Llama, Gemma, ...) strip
    it from a decoded string ("▁the" alone decodes to "the", so a sentence's pieces would read "the" "cat" and a
    subword "play" "ing" could not be told from two words); the raw piece's "▁" says the space was there. An id past
    the tokenizer's vocabulary (an output embedding padded wider than it, as Pythia's) reads "<id>"."""
    ids, n = [int(i) for i in ids], len(tokenizer)
    known = [i for i in ids if i < n]
    pieces = dict(zip(known, tokenizer.convert_ids_to_tokens(known))) if hasattr(tokenizer, "convert_ids_to_tokens") else {}
    out = []
    for i in ids:
        text = tokenizer.decode([i]) if i < n else f"<{i}>"
        piece = pieces.get(i)
        if isinstance(piece, str) and piece.startswith("▁") and not text[:1].isspace():
            text = " " + text
        out.append(text)
    return out


# ----------------------------------------------------------------------------- site names


def site_names(model: Model | nn.Module) -> list[str]:
    """The TransformerLens-style site names this model supports, in forward order."""
    return architectures.site_names(unwrap(model))


def resolve(model: Model | nn.Module, name: str) -> Site:
    """Resolve a site name (TransformerLens hook name or module path) for this model."""
    if not isinstance(name, str):
        raise ValueError(f"a site is a name (str), got {type(name).__name__}: {name!r}")
    return architectures.resolve(unwrap(model), name)


# ----------------------------------------------------------------------------- inside a trace


def _envoy(model: Model, path: str) -> Any:
    envoy = model
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _check_finite(what: str, act: Tensor) -> None:
    if act.is_floating_point() and not bool(torch.isfinite(act).all()):
        bad = int((~torch.isfinite(act)).sum())
        raise ValueError(f"{what} contain {bad} non-finite values (NaN or inf), shape {list(act.shape)}")


@dataclass
class _Event:
    site: Site
    names: list[str]  # the user names read here (several names can resolve to one site)
    edits: list[Edit]
    keep: bool = False  # another site subtracts this value (Bloom's residual inside the sublayer)
    carries: list[str] = field(default_factory=list)  # resid_mid edits whose change this block output must carry
    sources: list[str] = field(default_factory=list)  # in-sites of two-site edits (Transcode) read here, kept for them


def _plan(model: Model, read: Sequence[str], edits: Sequence[Edit]) -> list[_Event]:
    """Group reads and edits by site and sort them into the model's execution order."""
    events: dict[tuple[str, str], _Event] = {}

    def event(site: Site) -> _Event:
        return events.setdefault((site.module, site.io), _Event(site, [], []))

    for name in read:
        event(resolve(model, name)).names.append(name)
    for edit in edits:
        if not isinstance(edit, Edit) or not isinstance(edit.site, str):
            raise ValueError(f"edits must be Splice, Transcode, Steer, Ablate or another Edit (.site, .positions, .apply(act, mask)); got {type(edit).__name__}")
        out = resolve(model, edit.site)
        in_site = getattr(edit, "in_site", None)
        if in_site is not None:  # a two-site edit: read in_site earlier in the same pass, hand its value to apply
            src = resolve(model, in_site)
            if src.order >= out.order:
                raise ValueError(f"{type(edit).__name__}: its in-site {in_site} must run before its out-site {edit.site} "
                                 "in the model's forward pass, and it does not; allowed are in-sites upstream of the out-site")  # fmt: skip
            if in_site not in event(src).sources:
                event(src).sources.append(in_site)
        event(out).edits.append(edit)
    module = unwrap(model)
    for ev in list(events.values()):
        if ev.site.minus is not None:
            base = architectures.Site(f"{ev.site.minus[0]}:{ev.site.minus[1]}", *ev.site.minus, architectures._order_of(module, *ev.site.minus))
            event(base).keep = True
        if ev.site.carry is not None and ev.edits:
            blk = architectures.Site(f"{ev.site.carry}:output", ev.site.carry, "output", architectures._order_of(module, ev.site.carry, "output"))
            event(blk).carries.append(ev.site.module)
    return sorted(events.values(), key=lambda e: e.site.order)


def _visit(model: Model, events: list[_Event], length: int, prompt_len: int, acts: dict, outs: dict, batch: int) -> None:
    """Run inside a trace: at each site in execution order, apply its edits and record what was asked.

    `length` is the sequence length this forward pass ends at; a pass over T positions covers
    length - T .. length - 1 (the whole prompt, or the newest token under a KV cache).
    """
    bases: dict[tuple[str, str], Tensor] = {}  # values other sites subtract, as they flow on
    sources: dict[str, Tensor] = {}  # in-sites of two-site edits, as the model saw them
    deltas: dict[str, Tensor] = {}  # resid_mid edits: the change the block output must carry
    for event in events:
        site = event.site
        envoy = _envoy(model, site.module)
        raw = envoy.input if site.io == "input" else envoy.output
        value = raw[0] if isinstance(raw, tuple) else raw
        act = value.view(batch, -1, value.shape[-1]) if site.flat else value
        if site.minus is not None:
            act = act - bases[site.minus]
        if site.scale != 1.0:
            act = act * site.scale
        if site.heads:
            act = act.unflatten(-1, (site.heads, -1))
        changed = bool(event.carries)
        for carried in event.carries:
            if carried in deltas:
                act = act + deltas.pop(carried)
        if not site.name.endswith("hook_attn_scores"):  # masked attention scores are -inf by design
            _check_finite(f"site {site.name}: activations", act)
        offset = length - act.shape[1]
        for edit in event.edits:
            mask = position_mask(getattr(edit, "positions", None), offset, act.shape[1], prompt_len, act.device)
            in_site = getattr(edit, "in_site", None)
            new, out = edit.apply(act, mask) if in_site is None else edit.apply(act, mask, source=sources[in_site])
            _check_finite(f"site {site.name}: the output of {_describe(edit)}", new)
            if site.carry is not None:
                deltas[site.module] = deltas.get(site.module, 0) + (new - act)
            act, changed = new, True
            if out is not None:
                outs[edit.site] = out
        if changed:
            value = act.flatten(-2) if site.heads else act
            value = value / site.scale if site.scale != 1.0 else value
            value = value + bases[site.minus] if site.minus is not None else value
            value = value.reshape(-1, value.shape[-1]) if site.flat else value
            if site.io == "input":
                envoy.input = value
            else:
                envoy.output = (value, *raw[1:]) if isinstance(raw, tuple) else value
        if event.keep:
            bases[(site.module, site.io)] = value
        for name in event.names:
            acts[name] = act if changed else act.clone()  # a clone: some models change sublayer outputs in place
        for name in event.sources:
            sources[name] = act if changed else act.clone()


def _describe(edit: Any) -> str:
    module = getattr(edit, "module", getattr(edit, "transcoder", None))
    inner = f" of {type(module).__name__}" if module is not None else ""
    return f"edit {type(edit).__name__}{inner} at {getattr(edit, 'site', '?')}"


def _patterns(model: Model, events: list[_Event]):
    """Attention patterns need the eager path through the pattern modules while the trace runs."""
    wanted = any(e.site.module.endswith(architectures.PATTERN_MODULE) for e in events)
    return patterns_on(unwrap(model)) if wanted else contextlib.nullcontext()


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
    ids = enc["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"token ids must have shape [B, T]; got {list(ids.shape)}")
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"the input is empty (token ids of shape {list(ids.shape)}); give at least one token")
    vocab, context = limits(model)
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"token id {bad} is outside the vocabulary: allowed are 0..{vocab - 1}")
    if context is not None and ids.shape[1] > context:
        raise ValueError(f"the input has {ids.shape[1]} tokens, more than the model's context of {context}")
    device = _device(model)
    return {k: v.to(device) for k, v in enc.items()}


def limits(model: Model | nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary size, context length) as the model's embedding and config state them; None where unknown."""
    module = unwrap(model)
    cfg = getattr(module, "config", None) or getattr(module, "cfg", None)
    emb = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(cfg, "vocab_size", None) or getattr(cfg, "d_vocab", None)
    context = next((int(getattr(cfg, a)) for a in ("n_positions", "max_position_embeddings", "n_ctx") if getattr(cfg, a, None)), None)
    return vocab, context


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
    with torch.no_grad(), _patterns(model, events), _trace(model, enc) as tracer:
        acts = nnsight.save({})
        _visit(model, events, enc["input_ids"].shape[1], enc["input_ids"].shape[1], acts, {}, len(enc["input_ids"]))
        tracer.stop()
    return {name: acts[name] for name in sites}


def run(model: Model, inputs: Any, edits: Sequence[Edit] = (), read: Sequence[str] = ()) -> RunOutput:
    """One forward pass with edits applied in execution order; gradients flow as torch's grad mode says."""
    events = _plan(model, list(read), list(edits))
    enc = _encode(model, inputs)
    prompt_len = enc["input_ids"].shape[1]
    for edit in edits:
        check_positions(getattr(edit, "positions", None), prompt_len, prompt_len)
    return _run(model, enc, events, prompt_len)


def _run(model: Model, enc: dict[str, Tensor], events: list[_Event], prompt_len: int) -> RunOutput:
    with _patterns(model, events), _trace(model, enc):
        acts, outs = nnsight.save({}), nnsight.save({})
        _visit(model, events, enc["input_ids"].shape[1], prompt_len, acts, outs, len(enc["input_ids"]))
        logits = nnsight.save(_logits(model.output))
    return RunOutput(logits, dict(acts), dict(outs))


def generate(
    model: Model, inputs: Any, edits: Sequence[Edit] = (), *, max_new_tokens: int = 20,
    read: Sequence[str] = (), **generate_kwargs: Any,
) -> GenerateOutput:
    """Generate with edits applied at every forward pass: the prompt's and each new token's.

    Greedy unless `do_sample=True` is passed; other kwargs go to Hugging Face `generate`.
    """
    if tokenizer_of(model) is None:
        raise ValueError("generation needs a causal LM wrapped with its tokenizer: wrap(model, tokenizer=...)")
    as_int("max_new_tokens", max_new_tokens, 1)
    events = _plan(model, list(read), list(edits))
    enc = _encode(model, inputs)
    prompt_len = enc["input_ids"].shape[1]
    context = limits(model)[1]
    if context is not None and prompt_len + max_new_tokens > context:
        raise ValueError(f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} runs past the model's context "
                         f"of {context}; allowed are at most {context - prompt_len} new tokens")  # fmt: skip
    for edit in edits:
        check_positions(getattr(edit, "positions", None), prompt_len, prompt_len + max_new_tokens)
    if not isinstance(model, TransformersModel):  # e.g. a TransformerLens model: greedy, one full forward per token
        return _generate_by_forward(model, enc, events, prompt_len, max_new_tokens, generate_kwargs)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", tokenizer_of(model).pad_token_id)
    if not events:  # nothing to touch: a tracer.all() loop that reaches no module would never end
        with torch.no_grad():
            tokens = unwrap(model).generate(**enc, max_new_tokens=max_new_tokens, **generate_kwargs)
        return GenerateOutput(tokens, {}, prompt_len, [])
    with warnings.catch_warnings():
        # tracer.all() always asks for one step more than the run makes; nnsight warns about it.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with _patterns(model, events), model.generate(max_new_tokens=max_new_tokens, **generate_kwargs) as tracer:
            with tracer.invoke(**enc):
                steps, outs = nnsight.save([]), nnsight.save([])
                step = 0
                for _ in tracer.all():
                    acts, out = {}, {}
                    # Step 0 runs on the prompt; step s on the sequence up to prompt_len + s
                    # (only its newest token under a KV cache).
                    _visit(model, events, prompt_len + step, prompt_len, acts, out, len(enc["input_ids"]))
                    steps.append({k: (v if step == 0 else v[:, -1:]) for k, v in acts.items()})
                    outs.append(out)
                    step += 1
            with tracer.invoke():
                tokens = nnsight.save(tracer.result)
    acts = {name: torch.cat([s[name] for s in steps], dim=1) for name in read} if steps else {}
    return GenerateOutput(tokens, acts, prompt_len, list(outs))


def _generate_by_forward(model: Model, enc: dict[str, Tensor], events: list[_Event], prompt_len: int, max_new_tokens: int,
                         kwargs: dict) -> GenerateOutput:  # fmt: skip
    """Greedy generation for models without Hugging Face `generate`: the whole sequence is run again for each token."""
    if kwargs.get("do_sample"):
        raise ValueError(f"{type(unwrap(model)).__name__} has no Hugging Face generate: only greedy decoding (do_sample=False)")
    if "attention_mask" in enc and not bool(enc["attention_mask"].all()):
        raise ValueError("prompts of different lengths need padding, which this model's generation cannot take; generate them one at a time")
    ids, outs, out = enc["input_ids"], [], None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = _run(model, {"input_ids": ids}, events, prompt_len)
            outs.append(out.outputs)
            ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True).to(ids.device)], dim=1)
    names = [n for e in events for n in e.names]
    return GenerateOutput(ids, {n: out.acts[n] for n in names}, prompt_len, outs)

