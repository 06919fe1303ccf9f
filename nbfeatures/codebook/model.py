"""A model with codebooks inserted at sites, through the site layer: run, generate, force codes, finetune, save.

The base model's code is never edited: each forward pass splices every enabled codebook at its
site (`Splice(site, layer)`), and interventions take a codebook's place at their site:
    ForceCodes(site, layer, codes, positions=..., mode="all" | "last")   the chosen codes are forced
    PatchCodes(site, layer, codes_B, positions=...)                       row b gets its own codes (patching)
    BlockCodes(site, layer, codes, positions=...)                         these codes cannot be chosen
Finetuning (`CodebookObjective`, its hyperparameters in `CodebookTrainConfig`):
L = CE(next token) + mse_coef * sum over sites of MSE(codes, stopgrad(normalised input)),
with the codebooks at lr and the model at lr * model_lr_factor.

Dimension key: B sequences, T positions, G groups (heads), K codes per token, C codes.
"""

from __future__ import annotations

import numbers
import os
import pathlib
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import sites, zoo
from .._io import atomic_folder, load_json, load_tensors, save_json, save_tensors
from ..edits import Positions, Splice
from .layer import CodebookLayer, codebook_mse
from .._checks import check_number
from .search import IVFConfig, check_int


def _check_target(kind: str, site: Any, layer: Any) -> None:
    if not isinstance(site, str):
        raise TypeError(f"{kind}: site must be a site name (str), got {type(site).__name__} {site!r}")
    if not isinstance(layer, CodebookLayer):
        raise TypeError(f"{kind} at {site}: layer must be the CodebookLayer at that site (cb.layer(site)), got {type(layer).__name__}")


def _code_tuple(kind: str, site: str, codes: Any, n_codes: int) -> tuple[int, ...]:
    """codes as a tuple of ints in [0, n_codes); a bare int, floats, bools and negative ids are refused."""
    if isinstance(codes, Tensor):
        codes = codes.tolist() if codes.dim() == 1 and not (codes.is_floating_point() or codes.dtype == torch.bool) else codes
    if not isinstance(codes, (tuple, list)) or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in codes):
        raise TypeError(f"{kind} at {site}: codes must be a tuple of ints in [0, n_codes={n_codes}), e.g. (7,); got {codes!r}")
    if not all(0 <= c < n_codes for c in codes):
        raise ValueError(f"{kind} at {site}: codes must lie in [0, {n_codes}) (n_codes={n_codes}; -1 does not mean the last code), got {list(codes)}")
    return tuple(int(c) for c in codes)


@dataclass(frozen=True)
class ForceCodes:
    """At `positions`, make `layer` output `codes`: all k slots ("all", len(codes) == k) or the lowest-ranked ones ("last")."""

    site: str
    layer: CodebookLayer
    codes: tuple[int, ...]
    positions: Positions = None
    mode: Literal["all", "last"] = "all"
    group: int | None = None  # grouped codebooks: force in this head only (None: every head)

    def __post_init__(self):
        _check_target("ForceCodes", self.site, self.layer)
        k, n = self.layer.cfg.k, self.layer.cfg.n_codes
        if not isinstance(self.mode, str) or self.mode not in ("all", "last"):
            raise ValueError(f"mode must be 'all' or 'last', got {self.mode!r}")
        object.__setattr__(self, "codes", _code_tuple("ForceCodes", self.site, self.codes, n))
        if (self.mode == "all" and len(self.codes) != k) or not 0 < len(self.codes) <= k:
            raise ValueError(f"mode {self.mode!r} with k={k} takes {'exactly k' if self.mode == 'all' else '1..k'} codes, got {len(self.codes)}")
        if self.group is not None:
            check_int("ForceCodes: group", self.group)
        if self.group is not None and not 0 <= self.group < self.layer.cfg.n_groups:
            raise ValueError(f"group must lie in [0, {self.layer.cfg.n_groups}), got {self.group}")

    def apply(self, act: Tensor, mask_T: Tensor) -> tuple[Tensor, Any]:
        ids = self.layer(act).codes.clone()  # [B, T, (G,) K]
        grouped = self.layer.cfg.n_groups > 1
        sel = ids[:, mask_T]
        if grouped and self.group is not None:
            sel[:, :, self.group, -len(self.codes):] = torch.tensor(self.codes, device=ids.device)
        else:
            sel[..., -len(self.codes):] = torch.tensor(self.codes, device=ids.device)
        ids[:, mask_T] = sel
        out = self.layer(act, ids=ids)
        return out.x_hat, out


@dataclass(frozen=True, eq=False)
class PatchCodes:
    """At `positions`, row b of the batch gets the codes `codes[b]` [B, (G,) K] (e.g. another input's codes)."""

    site: str
    layer: CodebookLayer
    codes: Tensor
    positions: Positions = None

    def __post_init__(self):
        _check_target("PatchCodes", self.site, self.layer)
        c = self.layer.cfg
        want = (c.n_groups, c.k) if c.n_groups > 1 else (c.k,)
        if (not isinstance(self.codes, Tensor) or self.codes.is_floating_point() or self.codes.is_complex()
                or self.codes.dtype == torch.bool or tuple(self.codes.shape[1:]) != want):  # fmt: skip
            raise ValueError(f"PatchCodes at {self.site}: codes must be an integer tensor [B, {', '.join(map(str, want))}], "
                             f"got {getattr(self.codes, 'dtype', type(self.codes).__name__)} {list(getattr(self.codes, 'shape', []))}")
        if self.codes.numel() and not (0 <= int(self.codes.min()) and int(self.codes.max()) < c.n_codes):
            raise ValueError(f"PatchCodes at {self.site}: codes must lie in [0, {c.n_codes})")

    def apply(self, act: Tensor, mask_T: Tensor) -> tuple[Tensor, Any]:
        ids = self.layer(act).codes.clone()  # [B, T, (G,) K]
        if len(self.codes) != len(ids):
            raise ValueError(f"PatchCodes at {self.site}: {len(self.codes)} rows of codes for a batch of {len(ids)}")
        ids[:, mask_T] = self.codes.to(ids.device)[:, None]
        out = self.layer(act, ids=ids)
        return out.x_hat, out


@dataclass(frozen=True)
class BlockCodes:
    """At `positions`, `layer` may not choose `codes` (the next most similar are used instead)."""

    site: str
    layer: CodebookLayer
    codes: tuple[int, ...]
    positions: Positions = None

    def __post_init__(self):
        _check_target("BlockCodes", self.site, self.layer)
        k, n = self.layer.cfg.k, self.layer.cfg.n_codes
        object.__setattr__(self, "codes", _code_tuple("BlockCodes", self.site, self.codes, n))
        if len(set(self.codes)) > n - k:  # top-k needs k codes left; with none, code 0 would come back silently
            raise ValueError(f"BlockCodes at {self.site}: blocking {len(set(self.codes))} of n_codes={n} codes leaves fewer "
                             f"than k={k} to choose from; block at most n_codes - k = {n - k}")  # fmt: skip

    def apply(self, act: Tensor, mask_T: Tensor) -> tuple[Tensor, Any]:
        exclude = torch.zeros(self.layer.cfg.n_groups, self.layer.cfg.n_codes, dtype=torch.bool)
        exclude[:, list(self.codes)] = True
        ids = self.layer(act).codes.clone()
        ids[:, mask_T] = self.layer(act, exclude=exclude).codes[:, mask_T]
        out = self.layer(act, ids=ids)
        return out.x_hat, out


def _key(site: str) -> str:
    return site.replace(".", "__")  # ModuleDict keys cannot contain dots


class CodebookModel(nn.Module):
    """A wrapped model plus codebook layers at sites; `enabled=False` runs the base model untouched."""

    def __init__(self, model: sites.Model, layers: dict[str, CodebookLayer]):
        super().__init__()
        if not isinstance(layers, dict) or not layers:
            raise TypeError(f"CodebookModel takes a non-empty dict site -> CodebookLayer, got {type(layers).__name__} {layers!r}"[:300])
        for site, layer in layers.items():
            _check_target("CodebookModel", site, layer)
            sites.resolve(model, site)
            layer.site = site  # named in the layer's errors
        object.__setattr__(self, "model", model)  # not a submodule: its parameters get their own lr group
        self.codebooks = nn.ModuleDict({_key(s): layer for s, layer in layers.items()})
        self.sites = list(layers)
        self.enabled = True

    def layer(self, site: str) -> CodebookLayer:
        if site not in self.sites:
            raise ValueError(f"no codebook at {site!r}; codebooks are at {self.sites}")
        return self.codebooks[_key(site)]

    def edits(self, interventions: Sequence[Any] = ()) -> list[Any]:
        if not isinstance(interventions, (list, tuple)):
            raise TypeError(f"interventions must be a list of ForceCodes / PatchCodes / BlockCodes (or other edits at "
                            f"codebook sites), got {type(interventions).__name__}; wrap one in a list")  # fmt: skip
        taken = {}
        for iv in interventions:
            if not isinstance(getattr(iv, "site", None), str):
                raise TypeError(f"each intervention needs a site name (ForceCodes, PatchCodes, BlockCodes, ...), got {iv!r}"[:300])
            if iv.site in taken:
                raise ValueError(f"two interventions at {iv.site}; combine them into one")
            here = self.layer(iv.site)
            if isinstance(iv, (ForceCodes, PatchCodes, BlockCodes)) and iv.layer is not here:
                other = next((s for s in self.sites if self.layer(s) is iv.layer), None)
                raise ValueError(f"{type(iv).__name__} at {iv.site} holds "
                                 f"{f'the codebook of {other}' if other else 'a codebook this model does not hold'}, "
                                 f"not the one at {iv.site}; pass cb.layer({iv.site!r})")  # fmt: skip
            taken[iv.site] = iv
        if not self.enabled:
            return list(interventions)
        return [taken.get(s, Splice(s, self.layer(s))) for s in self.sites]

    def run(self, inputs: Any, interventions: Sequence[Any] = (), read: Sequence[str] = ()) -> sites.RunOutput:
        """One forward pass; `outputs[site]` holds each codebook's CodebookOutput (codes, sims)."""
        return sites.run(self.model, inputs, self.edits(interventions), read)

    def generate(self, inputs: Any, interventions: Sequence[Any] = (), **kwargs: Any) -> sites.GenerateOutput:
        """Generate with the codebooks (and interventions) in place at every forward pass."""
        return sites.generate(self.model, inputs, self.edits(interventions), **kwargs)

    def use_ivf(self, ivf: IVFConfig | None = IVFConfig()) -> CodebookModel:
        """Approximate (IVF) code search in eval mode at every codebook; None: exact again. See CodebookLayer.use_ivf."""
        for layer in self.codebooks.values():
            layer.use_ivf(ivf)
        return self

    # the model's weights are part of a codebook model's state: a finetuning checkpoint must hold both
    def state_dict(self, *args, **kwargs) -> dict[str, Tensor]:
        sd = {f"codebooks.{k}": v for k, v in self.codebooks.state_dict().items()}
        sd.update({f"model.{k}": v for k, v in sites.unwrap(self.model).state_dict().items()})
        return sd

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> Any:
        self.codebooks.load_state_dict({k.removeprefix("codebooks."): v for k, v in state.items() if k.startswith("codebooks.")}, strict=strict)
        model_sd = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if model_sd:
            sites.unwrap(self.model).load_state_dict(model_sd, strict=strict)

    def save(self, folder: str | os.PathLike, base_model: str | None = None) -> pathlib.Path:
        """Codebooks as safetensors + JSON config next to the (finetuned) base model in save_pretrained form; the folder
        is written under a temporary name and renamed into place (a card.json already there is kept)."""
        folder = pathlib.Path(folder)
        with atomic_folder(folder, keep=("card.json",)) as tmp:
            sites.unwrap(self.model).save_pretrained(tmp)
            tok = sites.tokenizer_of(self.model)
            if tok is not None:
                tok.save_pretrained(tmp)
            save_tensors(tmp / "codebooks.safetensors", {f"{s}": self.layer(s).codebook for s in self.sites})
            save_json(tmp / "codebooks.json", {"format": "nbfeatures.codebook_model", "base_model": base_model,
                                               "sites": {s: self.layer(s).config_dict() for s in self.sites}})
        return folder


def load_codebook_model(name_or_folder: str | os.PathLike) -> CodebookModel:
    """A zoo codebook model by name (`nbf.zoo.codebook_models()`), or a folder written by CodebookModel.save.

    The transformer goes through the zoo's checked loader, so missing or mis-shaped weights are refused. A folder
    without a tokenizer still loads (codebook models are often run on token ids); text inputs then say so."""
    folder = zoo.path(name_or_folder) if str(name_or_folder) in zoo.codebook_models() else pathlib.Path(name_or_folder).expanduser()
    if not (folder / "codebooks.json").is_file():
        raise ValueError(f"{folder} holds no codebooks.json: not a codebook model folder (zoo codebook models: {zoo.codebook_models()})")
    cfg = load_json(folder / "codebooks.json")
    if cfg.get("format") != "nbfeatures.codebook_model":
        raise ValueError(f"{folder}/codebooks.json: not a codebook model (format {cfg.get('format')!r})")
    if not isinstance(cfg.get("sites"), dict) or not cfg["sites"]:
        raise ValueError(f"{folder}/codebooks.json: 'sites' must map each site name to its codebook config, got {cfg.get('sites')!r}")
    tensors = load_tensors(folder / "codebooks.safetensors")
    hf, tokenizer = zoo.load_pretrained(folder)
    model = sites.wrap(hf, tokenizer)
    layers = {site: CodebookLayer.from_saved(c, tensors.get(site), f"{folder}: codebook for {site}") for site, c in cfg["sites"].items()}
    return CodebookModel(model, layers)


@dataclass(frozen=True)
class CodebookTrainConfig:
    """Finetuning hyperparameters of a codebook model (the layers' own shapes are in CodebookConfig)."""

    mse_coef: float = 1.0  # weight of the codebooks' reconstruction MSE next to the next-token CE
    model_lr_factor: float = 0.1  # the model's learning rate is lr x this (0: the model is frozen)
    replace_after: int = 0  # every this many steps re-seed codes that never fired from recent inputs (0: never)
    replace_noise: float = 0.01  # relative noise on re-seeded codes

    def __post_init__(self):
        for name in ("mse_coef", "model_lr_factor", "replace_noise"):
            check_number(f"CodebookTrainConfig.{name}", getattr(self, name), 0)
        check_int("CodebookTrainConfig.replace_after", self.replace_after, 0)


class CodebookObjective:
    """Next-token CE with the codebooks spliced in, plus mse_coef * the codebooks' reconstruction MSE."""

    def __init__(self, cb: CodebookModel, cfg: CodebookTrainConfig = CodebookTrainConfig()):
        if not isinstance(cfg, CodebookTrainConfig):
            raise TypeError(f"CodebookObjective takes a CodebookTrainConfig, got {type(cfg).__name__}")
        self.cb, self.cfg = cb, cfg

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def param_groups(self, lr: float) -> list[dict]:
        """The codebooks at lr; the model's own weights at lr x model_lr_factor (frozen when it is 0)."""
        groups = [{"params": list(self.cb.codebooks.parameters()), "lr": lr}]
        model_params = list(sites.unwrap(self.cb.model).parameters())
        for p in model_params:
            p.requires_grad_(self.cfg.model_lr_factor > 0)
        if self.cfg.model_lr_factor > 0:
            groups.append({"params": model_params, "lr": lr * self.cfg.model_lr_factor})
        return groups

    def after_step_(self, step: int) -> None:
        if self.cfg.replace_after and step % self.cfg.replace_after == 0:
            for layer in self.cb.codebooks.values():
                layer.replace_dead_codes_(self.cfg.replace_noise, seed=step)

    def __call__(self, tokens: Tensor) -> tuple[Tensor, dict[str, float]]:
        self.cb.codebooks.train()
        out = self.cb.run(tokens)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().to(out.logits.device))
        mse = torch.stack([codebook_mse(out.outputs[s]) for s in self.cb.sites]).sum()
        loss = ce + self.cfg.mse_coef * mse
        logs = {"loss": loss.item(), "ce": ce.item(), "codebook_mse": mse.item()}
        for s in self.cb.sites:
            c = self.cb.layer(s).cfg
            codes = out.outputs[s].codes.reshape(-1, c.n_groups, c.k) + (torch.arange(c.n_groups, device=tokens.device) * c.n_codes)[None, :, None]
            logs[f"codes_used/{s}"] = codes.unique().numel() / (c.n_codes * c.n_groups)
        return loss, logs
