"""SAELens v6 dictionaries, every inference architecture computed exactly as SAELens 6 computes it.

    sae_in = norm_in(reshape_in(x)) - b_dec * apply_b_dec_to_input     transcoders: no reshape, no b_dec
    latents = act(sae_in W_enc + b_enc)                                  act per architecture, below
    x_hat  = reshape_out(norm_out(latents W_dec + b_dec)) + x W_skip^T   transcoders: no norm_out, no reshape

    standard, transcoder, skip_transcoder    relu(pre)
    jumprelu, jumprelu_(skip_)transcoder     relu(pre) * 1[pre > threshold]          (relu too: a negative threshold
                                                                                      does not let negative values through)
    topk / abstopk                           top k of pre * |W_dec rows| (if rescale_acts_by_decoder_norm), relu'd /
                                             by magnitude with signs kept; decode divides by |W_dec rows| again
    gated                                    1[sae_in W_enc + b_gate > 0] * relu(sae_in (W_enc * exp(r_mag)) + b_mag)

normalize_activations at inference: constant_norm_rescale scales each input to norm sqrt(d_in) and the output back;
layer_norm standardises each input (unbiased std, eps 1e-5 added to it) and the output back; expected_average_only_in
and covariance_whitening do nothing (SAELens folds them into the weights when training ends; a `norm_scaling_factor`
in cfg.json, which SAELens keeps in its registry instead, is folded in at load as `SAE.from_pretrained` does).
reshape_activations="hook_z" reads [.., H, E] as [.., H*E] and writes the output back as [.., H, E].

When the semantics are exactly our own TopKSAE / ReLUSAE (or another registered dictionary), `from_saelens` builds
that, so warm starts and training keep working; sparsify's `nbfeatures.groupmax` and `nbfeatures.topk_transcoder`
build the inference-only modules of sparsify_format.py (SAELens cannot load those two); everything else is an
inference-only `SAELensSAE`. Our dictionaries that SAELens runs as one of its own architectures (JumpReLUSAE, and
BatchTopKSAE / MatryoshkaSAE at inference: `saelens_architecture = "jumprelu"`) are written as SAELens's
`save_inference_model` writes its trained ones: that architecture, metadata.training_architecture naming ours and
metadata.training_architecture_details holding its config. Such a folder loads as ours when the details give every
field of our config; a jumprelu folder without them (SAELens's own) stays an inference-only `SAELensSAE`.

Dimension key: N tokens, D input dim (d_in), O output dim (d_out; = D but for transcoders), F latents (d_sae),
H heads, E head dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from packaging.version import InvalidVersion, Version
from torch import Tensor, nn

from .base import DictionaryModule
from .sparsify_format import SPARSIFY_ARCHITECTURES

TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
SAELENS_ARCHITECTURES = ("standard", "topk", "abstopk", "jumprelu", "gated") + TRANSCODERS
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the metadata SAELens keeps when it converts a pre-6.0 cfg.json (sae_lens.loading.pretrained_sae_loaders)
LLM_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs", "prepend_bos",
                     "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path", "sae_lens_version",
                     "sae_lens_training_version", "hook_name_out", "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")  # fmt: skip
# our own dictionaries, by their name in cfg.json (`architecture`, or `metadata.training_architecture` for those
# with a `saelens_architecture`) -> (module class, config class); each file registers itself via io.py
ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {}


def _registered(arch: str) -> tuple[type[nn.Module], type] | None:
    """(module, config) of one of our dictionaries or of a sparsify variant SAELens lacks; None for SAELens's own."""
    return ARCHITECTURES.get(arch) or SPARSIFY_ARCHITECTURES.get(arch)


def _saved_as(module_cls: type) -> str | None:
    """The SAELens architecture a dictionary of ours is written as (its config then goes into metadata), or None."""
    return getattr(module_cls, "saelens_architecture", None)


def _readable(arch: str) -> bool:
    """An `architecture` a cfg.json may name: SAELens's own, or ours written under our own name."""
    entry = _registered(arch)
    return arch in SAELENS_ARCHITECTURES or (entry is not None and _saved_as(entry[0]) in (None, arch))


@dataclass(frozen=True)
class SAELensConfig:
    architecture: str  # SAELens's name, one of SAELENS_ARCHITECTURES
    d_in: int  # input width (H*E for hook_z)
    d_sae: int  # number of latents
    d_out: int | None = None  # output width: transcoders only, None means d_in
    k: int | None = None  # topk / abstopk: active latents per token
    apply_b_dec_to_input: bool = True  # subtract b_dec before encoding (never for transcoders)
    rescale_acts_by_decoder_norm: bool = False  # topk / abstopk: rank pre * |W_dec rows|, decode acts / |W_dec rows|
    normalize_activations: str = "none"  # one of NORMALIZATIONS
    reshape_activations: str = "none"  # "none" or "hook_z"
    dtype: str = "float32"  # the dtype the weights were loaded in

    def __post_init__(self):
        if self.architecture not in SAELENS_ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {list(SAELENS_ARCHITECTURES)}")
        for name in ("d_in", "d_sae") + (("d_out",) if self.d_out is not None else ()):
            v = getattr(self, name)
            if type(v) is not int or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        transcoder = self.architecture in TRANSCODERS
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        elif not transcoder and self.d_out != self.d_in:
            raise ValueError(f"d_out={self.d_out} differs from d_in={self.d_in}: only transcoders have their own d_out")
        if self.architecture in ("topk", "abstopk"):
            if type(self.k) is not int or not 0 < self.k <= self.d_sae:
                raise ValueError(f"{self.architecture} needs an integer 0 < k <= d_sae={self.d_sae}, got k={self.k!r}")
        elif self.k is not None or self.rescale_acts_by_decoder_norm:
            raise ValueError(f"k and rescale_acts_by_decoder_norm belong to topk / abstopk, not {self.architecture!r}")
        for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if transcoder and self.apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input must be false for transcoders (b_dec is an output bias)")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations={self.normalize_activations!r} is not one of {list(NORMALIZATIONS)}")
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"reshape_activations={self.reshape_activations!r} is not 'none' or 'hook_z'")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")


def tensor_shapes(cfg: SAELensConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a weights file for `cfg` holds, with their shapes (SAELens's names)."""
    D, F, O = cfg.d_in, cfg.d_sae, cfg.d_out
    shapes = {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, O), "b_dec": (O,)}
    if cfg.architecture.startswith("jumprelu"):
        shapes["threshold"] = (F,)
    if cfg.architecture == "gated":
        del shapes["b_enc"]
        shapes |= {"b_gate": (F,), "r_mag": (F,), "b_mag": (F,)}
    if cfg.architecture.endswith("skip_transcoder"):
        shapes["W_skip"] = (O, D)
    return shapes


class SAELensOutput(NamedTuple):
    x_hat: Tensor  # [..., O], or [..., H, E] for hook_z
    latents: Tensor  # [..., F]
    pre_acts: Tensor  # [..., F] what SAELens's hook_sae_acts_pre sees (gated: the magnitude path)


class SAELensSAE(DictionaryModule):
    """Any SAELens v6 inference dictionary, with SAELens's parameter names and shapes (see the module docstring)."""

    def __init__(self, cfg: SAELensConfig, tensors: dict[str, Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        for name, shape in tensor_shapes(cfg).items():
            value = tensors[name] if tensors is not None else torch.zeros(shape, dtype=dtype)
            setattr(self, name, nn.Parameter(value.to(dtype), requires_grad=False))
        self.metadata: dict = {}

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    # ------------------------------------------------------------------ pieces, on flat [N, .] tensors

    def _flat(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """x -> (x_ND in the weights' dtype, the leading dims); hook_z reads [.., H, E] as [.., H*E]."""
        D = self.cfg.d_in
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"SAELensSAE: input must be a floating-point Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        hook_z = self.cfg.reshape_activations == "hook_z" and self.cfg.architecture not in TRANSCODERS
        if hook_z and x.dim() >= 2 and x.shape[-2] * x.shape[-1] == D:
            lead = x.shape[:-2]
        elif x.shape[-1] == D:
            lead = x.shape[:-1]
        else:
            want = f"[.., H, E] with H*E = d_in = {D}" if hook_z else f"width d_in = {D}"
            raise ValueError(f"SAELensSAE: input has shape {list(x.shape)}, expected {want}")
        return x.reshape(-1, D).to(self.W_enc.dtype), tuple(lead)

    def _norm_in(self, x_ND: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in**0.5) / x_ND.norm(dim=-1, keepdim=True)
            return x_ND * coeff, (coeff, coeff)
        if mode == "layer_norm":
            mu = x_ND.mean(dim=-1, keepdim=True)
            centred = x_ND - mu
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + 1e-5), (mu, std)
        return x_ND, None  # none; expected_average_only_in and covariance_whitening are folded into the weights

    def _norm_out(self, y_NO: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        if stats is None or self.cfg.architecture in TRANSCODERS:  # SAELens never un-normalises a transcoder's output
            return y_NO
        if self.cfg.normalize_activations == "constant_norm_rescale":
            return y_NO / stats[0]
        mu, std = stats
        return y_NO * std + mu

    def _stats(self, x_ND: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        sae_in, stats = self._norm_in(x_ND)
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        return sae_in, stats

    def _encode(self, sae_in_ND: Tensor) -> tuple[Tensor, Tensor]:
        """sae_in -> (pre_NF, latents_NF)."""
        arch = self.cfg.architecture
        if arch == "gated":
            active = (sae_in_ND @ self.W_enc + self.b_gate > 0).to(sae_in_ND.dtype)
            pre = sae_in_ND @ (self.W_enc * self.r_mag.exp()) + self.b_mag
            return pre, active * torch.relu(pre)
        pre = sae_in_ND @ self.W_enc + self.b_enc
        if arch in ("topk", "abstopk"):
            ranked = pre * self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else pre
            if arch == "topk":
                vals, idx = ranked.topk(self.cfg.k, dim=-1, sorted=False)
                vals = vals.relu()
            else:
                idx = ranked.abs().topk(self.cfg.k, dim=-1, sorted=False).indices
                vals = ranked.gather(-1, idx)
            return pre, torch.zeros_like(ranked).scatter_(-1, idx, vals)
        latents = torch.relu(pre)
        if arch.startswith("jumprelu"):
            latents = latents * (pre > self.threshold).to(latents.dtype)
        return pre, latents

    def _decode(self, latents_NF: Tensor, x_ND: Tensor | None, stats) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            latents_NF = latents_NF * (1 / self.W_dec.norm(dim=-1))
        y = self._norm_out(latents_NF @ self.W_dec + self.b_dec, stats)
        if self.cfg.architecture.endswith("skip_transcoder") and x_ND is not None:
            y = y + x_ND @ self.W_skip.T
        return y

    # ------------------------------------------------------------------ the Dictionary contract

    def encode(self, x: Tensor) -> Tensor:
        """x [..., D] (hook_z: [..., H, E]) -> latents [..., F]."""
        x_ND, lead = self._flat(x)
        return self._encode(self._stats(x_ND)[0])[1].reshape(*lead, -1)

    def decode(self, latents: Tensor, x: Tensor | None = None) -> Tensor:
        """latents [..., F] -> x_hat [..., O]. Pass the encoded input `x` where the output depends on it beyond the
        latents: to undo constant_norm_rescale / layer_norm (required), to add a skip transcoder's x W_skip^T, and to
        give hook_z's output its [..., H, E] shape. Without `x` this is SAELens's own `decode`."""
        lead, F_ = latents.shape[:-1], self.cfg.d_sae
        norm = self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm") and self.cfg.architecture not in TRANSCODERS
        if x is None:
            if norm:
                raise ValueError(f"decode: normalize_activations={self.cfg.normalize_activations!r} depends on the input; pass x")
            return self._decode(latents.reshape(-1, F_).to(self.W_dec.dtype), None, None).reshape(*lead, -1)
        x_ND, x_lead = self._flat(x)
        stats = self._stats(x_ND)[1]
        y = self._decode(latents.reshape(-1, F_).to(self.W_dec.dtype), x_ND, stats)
        return self._shape_out(y, x, x_lead)

    def _shape_out(self, y_NO: Tensor, x: Tensor, lead: tuple[int, ...]) -> Tensor:
        if len(lead) == x.dim() - 2:  # hook_z: back to the input's [.., H, E]
            return y_NO.reshape(x.shape).to(x.dtype)
        return y_NO.reshape(*lead, -1).to(x.dtype)

    def forward(self, x: Tensor) -> SAELensOutput:
        x_ND, lead = self._flat(x)
        sae_in, stats = self._stats(x_ND)
        pre, latents = self._encode(sae_in)
        x_hat = self._shape_out(self._decode(latents, x_ND, stats), x, lead)
        return SAELensOutput(x_hat, latents.reshape(*lead, -1), pre.reshape(*lead, -1))

    def default_objective(self):
        raise NotImplementedError(f"SAELensSAE ({self.architecture}) is inference only: train a TopKSAE or ReLUSAE here, "
                                  "or this architecture with SAELens itself")  # fmt: skip


# ---------------------------------------------------------------------- cfg.json <-> modules


def _legacy_to_v6(cfg: dict) -> dict:
    """SAELens 6's `handle_pre_6_0_config`: rename old keys, default the new ones, topk from activation_fn_kwargs."""
    new = {{"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}.get(k, k): v
           for k, v in cfg.items()}  # fmt: skip
    new.setdefault("prepend_bos", True)
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("sae_lens_training_version", None)
    new.setdefault("architecture", "standard")
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in (new.get("hook_name") or "") else "none")
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and kwargs.get("k") is not None:
        new["architecture"], new["k"] = "topk", kwargs["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    if new.get("normalize_activations") is None:
        new["normalize_activations"] = "none"
    new["metadata"] = {k: v for k, v in new.items() if k in LLM_METADATA_KEYS}
    return new


def _is_pre_v6(cfg: dict, where: str) -> bool:
    """SAELens 6 also converts a v6-shaped cfg without a version; we take a `metadata` object (new in 6.0) as v6."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return not isinstance(cfg.get("metadata"), dict)
    try:
        return Version(str(version)) < Version("6.0.0-rc.0")
    except InvalidVersion:
        raise ValueError(f"{where}: field 'sae_lens_version' = {version!r} is not a version number") from None


def saelens_cfg(cfg: dict, where: str) -> dict:
    """A cfg.json as SAELens 6 reads it (pre-6.0 files converted), its fields checked; ValueError names `where` and the field."""
    if not isinstance(cfg.get("metadata", {}), dict):
        raise ValueError(f"{where}: field 'metadata' must be an object, got {type(cfg['metadata']).__name__}")
    cfg = dict(_legacy_to_v6(cfg) if _is_pre_v6(cfg, where) else cfg)
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or not _readable(arch):
        supported = {a for a in set(SAELENS_ARCHITECTURES) | set(ARCHITECTURES) | set(SPARSIFY_ARCHITECTURES) if _readable(a)}
        raise ValueError(f"{where}: field 'architecture' = {arch!r} is not supported; supported: {sorted(supported)}")
    topk, transcoder = arch in ("topk", "abstopk"), arch in TRANSCODERS
    defaults = {"k": 100} if topk else {"d_out": 768} if transcoder else {}  # SAELens's config defaults
    for name in ("d_in", "d_sae", *defaults):
        if name not in cfg and name not in defaults:
            raise ValueError(f"{where}: field {name!r} is missing")
        v = cfg.setdefault(name, defaults.get(name))
        if type(v) is not int or v <= 0:
            raise ValueError(f"{where}: field {name!r} must be a positive integer, got {v!r}")
    if topk and cfg["k"] > cfg["d_sae"]:
        raise ValueError(f"{where}: field 'k' = {cfg['k']} exceeds d_sae = {cfg['d_sae']}")
    dtype = cfg.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in DTYPES:
        raise ValueError(f"{where}: field 'dtype' = {dtype!r} is not a float dtype; allowed: {list(DTYPES)}")
    cfg["dtype"] = dtype.removeprefix("torch.")
    for name in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
        if not isinstance(cfg.get(name, False), bool):
            raise ValueError(f"{where}: field {name!r} must be true or false, got {cfg[name]!r}")
    if transcoder and cfg.get("apply_b_dec_to_input", False):
        raise ValueError(f"{where}: field 'apply_b_dec_to_input' must be false for a transcoder (its b_dec is an output bias)")
    if cfg.get("normalize_activations", "none") not in NORMALIZATIONS:
        raise ValueError(f"{where}: field 'normalize_activations' = {cfg['normalize_activations']!r} "
                         f"is not one of {list(NORMALIZATIONS)}")  # fmt: skip
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise ValueError(f"{where}: field 'reshape_activations' = {cfg['reshape_activations']!r} is not 'none' or 'hook_z'")
    return cfg


def _config(cfg: dict) -> SAELensConfig:
    """The SAELensConfig of a checked cfg (from `saelens_cfg`)."""
    arch = cfg["architecture"]
    topk = arch in ("topk", "abstopk")
    return SAELensConfig(
        architecture=arch, d_in=cfg["d_in"], d_sae=cfg["d_sae"], d_out=cfg["d_out"] if arch in TRANSCODERS else None,
        k=cfg["k"] if topk else None, apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", arch not in TRANSCODERS),
        rescale_acts_by_decoder_norm=cfg.get("rescale_acts_by_decoder_norm", False) if topk else False,
        normalize_activations=cfg.get("normalize_activations", "none"), reshape_activations=cfg.get("reshape_activations", "none"),
        dtype=cfg["dtype"],
    )  # fmt: skip


def _native(cfg: dict, where: str) -> nn.Module | None:
    """Our own dictionary (on the meta device: no memory) when it computes exactly what SAELens computes for `cfg`."""
    arch, meta = cfg["architecture"], cfg.get("metadata") or {}
    trained, details = meta.get("training_architecture"), meta.get("training_architecture_details")
    entry = ARCHITECTURES.get(trained) if isinstance(trained, str) else None
    if entry is not None and _saved_as(entry[0]) == arch and isinstance(details, dict):
        classes, given = entry, {**details, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"]}  # written as SAELens writes its own
    elif _registered(arch) is not None and _saved_as(_registered(arch)[0]) is None:
        classes, given = _registered(arch), cfg
    else:
        return None
    plain = cfg.get("normalize_activations", "none") == "none" and cfg.get("reshape_activations", "none") == "none"
    if arch in SAELENS_ARCHITECTURES and not (plain and cfg.get("apply_b_dec_to_input", True) is True):
        return None
    if not plain:
        raise ValueError(f"{where}: architecture {arch!r} takes normalize_activations and reshape_activations 'none' only")
    module_cls, config_cls = classes
    names = [f for f in dataclasses.fields(config_cls) if f.name not in ("d_in", "d_sae")]
    if given is not cfg and not all(f.name in given for f in names):
        return None  # e.g. a JumpReLU SAELens trained: its details name SAELens's settings, not ours
    try:
        config = config_cls(d_in=cfg["d_in"], d_sae=cfg["d_sae"],
                            **{f.name: given[f.name] for f in names if f.name in given or f.default is dataclasses.MISSING})  # fmt: skip
        with torch.device("meta"):
            return module_cls(config, seed=None)
    except KeyError as e:
        raise ValueError(f"{where}: field {e.args[0]!r} is missing, needed for architecture {arch!r}") from None
    except (TypeError, ValueError) as e:
        if given is not cfg:
            return None  # details we cannot build (SAELens's BatchTopK allows a fractional k): its inference JumpReLU
        raise ValueError(f"{where}: {e}") from None


def file_shapes(cfg: dict, where: str = "cfg") -> dict[str, tuple[int, ...]]:
    """The tensors (and shapes) the weights file of a checked cfg (from `saelens_cfg`) must hold."""
    native = _native(cfg, where)
    if native is not None:
        return {name: tuple(t.shape) for name, t in native.state_dict().items()}
    return tensor_shapes(_config(cfg))


def from_saelens(cfg: dict, tensors: dict[str, Tensor], where: str) -> nn.Module:
    """Build the dictionary a SAELens cfg.json (any version) and its tensors describe; `where` names them in errors."""
    cfg = saelens_cfg(cfg, where)
    dtype = DTYPES[cfg["dtype"]]
    tensors = {k: v.to(dtype) for k, v in tensors.items()}  # SAELens casts every tensor to cfg's dtype on load
    shapes = file_shapes(cfg, where)
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(f"{where}: tensors do not match architecture {cfg['architecture']!r}: "
                         f"missing {missing}, unexpected {extra}")  # fmt: skip
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            got = list(tensors[name].shape)
            raise ValueError(f"{where}: tensor {name!r} has shape {got}, expected {list(shape)} from the config")
        bad = tensors[name].isnan() | (tensors[name].isinf() if name != "threshold" else tensors[name].isneginf())
        if bool(bad.any()):  # a threshold of +inf is a latent that never fires
            raise ValueError(f"{where}: tensor {name!r} contains non-finite values")
    factor = cfg.get("norm_scaling_factor")
    if cfg.get("normalize_activations") == "expected_average_only_in" and factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
            raise ValueError(f"{where}: field 'norm_scaling_factor' must be a positive number, got {factor!r}")
        # SAE.fold_activation_norm_scaling_factor, as SAE.from_pretrained applies its registry's factor
        tensors = {**tensors, "W_enc": tensors["W_enc"] * factor, "W_dec": tensors["W_dec"] / factor,
                   "b_dec": tensors["b_dec"] / factor}  # fmt: skip
        cfg = {**cfg, "normalize_activations": "none"}
    sae = _native(cfg, where)
    if sae is None:
        sae = SAELensSAE(_config(cfg), tensors)
    else:
        if cfg["architecture"] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
            norms = tensors["W_dec"].norm(dim=-1)  # fold the decoder norms in, as SAELens's fold_W_dec_norm does
            tensors = {**tensors, "W_enc": tensors["W_enc"] * norms, "b_enc": tensors["b_enc"] * norms,
                       "W_dec": tensors["W_dec"] / norms[:, None]}  # fmt: skip
        # take the module's own memory layout (TopKSAE's W_enc is a transposed clone): a matmul's rounding depends on it
        like = sae.state_dict()
        tensors = {k: v if v.stride() == like[k].stride() else torch.empty_like(like[k], dtype=v.dtype, device=v.device).copy_(v)
                   for k, v in tensors.items()}  # fmt: skip
        sae.load_state_dict(tensors, assign=True)
    sae.metadata = dict(cfg.get("metadata") or {})
    return sae.eval()  # loaded for inference (BatchTopK: thresholded per token); train() switches back


def to_saelens(sae: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(cfg.json fields, tensors) that SAELens 6 loads as the same dictionary; the sparsify variants
    (`nbfeatures.groupmax`, `nbfeatures.topk_transcoder`) keep their own name, which only nbfeatures loads. The fields
    hold no metadata but for a dictionary written as a SAELens architecture (JumpReLU, BatchTopK, Matryoshka): then
    "metadata" has training_architecture and training_architecture_details, as SAELens's `save_inference_model`."""
    dtype = str(sae.W_dec.dtype).removeprefix("torch.")
    tensors = {name: p.detach() for name, p in sae.state_dict().items()}
    if isinstance(sae, SAELensSAE):
        c = sae.cfg
        cfg = {"d_in": c.d_in, "d_sae": c.d_sae}
        if c.architecture in TRANSCODERS:
            cfg["d_out"] = c.d_out
        if c.architecture in ("topk", "abstopk"):
            cfg |= {"k": c.k, "rescale_acts_by_decoder_norm": c.rescale_acts_by_decoder_norm}
        cfg |= {"dtype": dtype, "device": "cpu", "apply_b_dec_to_input": c.apply_b_dec_to_input,
                "normalize_activations": c.normalize_activations, "reshape_activations": c.reshape_activations}  # fmt: skip
        return cfg | {"architecture": c.architecture}, tensors
    arch = getattr(sae, "architecture", None)
    if not isinstance(arch, str) or _registered(arch) is None:
        raise ValueError(f"cannot save {type(sae).__name__}: architecture {arch!r} is not one of "
                         f"{sorted(set(ARCHITECTURES) | set(SPARSIFY_ARCHITECTURES) | {'SAELensSAE'})}")  # fmt: skip
    cfg = {**sae.config_dict(), "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": getattr(sae, "apply_b_dec_to_input", True),
           "normalize_activations": "none", "reshape_activations": "none"}  # fmt: skip
    saved_as = _saved_as(type(sae))
    if saved_as is not None:  # SAELens's own fields on top, ours in metadata (SAELens drops unknown top-level keys)
        details = {k: v for k, v in sae.config_dict().items() if k not in ("d_in", "d_sae")}
        meta = {"training_architecture": arch, "training_architecture_details": details}
        return {k: v for k, v in cfg.items() if k not in details} | {"architecture": saved_as, "metadata": meta}, tensors
    if arch == "topk":
        cfg["rescale_acts_by_decoder_norm"] = False  # our decoder rows are unit-norm already
    return cfg | {"architecture": arch}, tensors
