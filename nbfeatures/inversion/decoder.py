"""The InversionView decoder p(x | z, site): a small causal transformer over the probed model's tokens.

    [z / scale_site, site embedding] -> residual MLP blocks -> one extra attended key/value slot in every layer
    ("prefix", the reference's default) or a cross-attention sublayer ("cross")

Dimension key: B batch, T position, D activation width, S sites, V vocab, M decoder width, H heads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import int_arg
from .._io import atomic_folder, load_json, load_tensors, save_json, save_tensors


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    n_ctx: int  # longest input the decoder writes, BOS included
    sites: tuple[str, ...]  # the sites it is conditioned on; z of a narrower site is zero-padded to d_act
    d_act: int
    bos_id: int
    eos_id: int | None = None  # generation stops here; None: every input has n_ctx tokens
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_act_blocks: int = 3  # residual MLP blocks on [z, site embedding] (the reference uses 6)
    d_site: int = 16
    conditioning: str = "prefix"  # "prefix": one extra key/value slot per layer; "cross": a cross-attention sublayer

    def __post_init__(self):
        sites = self.sites
        if isinstance(sites, (str, bytes)) or not hasattr(sites, "__iter__"):
            raise ValueError(f"DecoderConfig: sites must be a non-empty list of distinct site names, got {sites!r}")
        object.__setattr__(self, "sites", tuple(sites))
        if not self.sites or len(set(self.sites)) != len(self.sites) or not all(isinstance(s, str) and s for s in self.sites):
            raise ValueError(f"sites must be a non-empty list of distinct names, got {list(self.sites)}")
        if self.conditioning not in ("prefix", "cross"):
            raise ValueError(f"conditioning must be 'prefix' or 'cross', got {self.conditioning!r}")
        for name, minimum in (("vocab_size", 1), ("n_ctx", 2), ("d_act", 1), ("d_model", 1), ("n_layers", 1), ("n_heads", 1),
                              ("n_act_blocks", 0), ("d_site", 1)):  # fmt: skip
            object.__setattr__(self, name, int_arg("DecoderConfig", name, getattr(self, name), minimum))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("bos_id", "eos_id"):
            if name == "bos_id" or self.eos_id is not None:
                object.__setattr__(self, name, int_arg("DecoderConfig", name, getattr(self, name), 0, self.vocab_size - 1))


class _Attention(nn.Module):
    """Causal self-attention whose keys/values may start with extra always-visible slots."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x_BTM: Tensor, extra_BKM: Tensor | None, causal: bool = True) -> Tensor:
        B, T, M = x_BTM.shape
        q, k, v = self.qkv(x_BTM).chunk(3, dim=-1)
        n_extra = 0
        if extra_BKM is not None:
            _, ek, ev = self.qkv(extra_BKM).chunk(3, dim=-1)  # the slot's own query is dropped
            n_extra = extra_BKM.shape[1]
            k, v = torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if not causal:  # cross-attention: the queries see only the extra slots
            k, v, n_extra = k[:, :n_extra], v[:, :n_extra], n_extra
        heads = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # noqa: E731
        allowed = torch.ones(T, k.shape[1], dtype=torch.bool, device=x_BTM.device)
        if causal:
            allowed[:, n_extra:] = torch.ones(T, T, dtype=torch.bool, device=x_BTM.device).tril()
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=allowed)
        return self.out(y.transpose(1, 2).flatten(2))


class _Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), _Attention(cfg)
        self.act_proj = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.LayerNorm(cfg.d_model))  # per-layer view of z
        if cfg.conditioning == "cross":
            self.noop = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)  # lets a token attend to "nothing"
            self.ln_x, self.cross = nn.LayerNorm(cfg.d_model), _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x_BTM: Tensor, act_BM: Tensor) -> Tensor:
        a_B1M = self.act_proj(act_BM)[:, None]
        if self.cfg.conditioning == "prefix":
            x_BTM = x_BTM + self.attn(self.ln1(x_BTM), a_B1M)
        else:
            x_BTM = x_BTM + self.attn(self.ln1(x_BTM), None)
            slots = torch.cat([self.noop.expand(len(a_B1M), 1, -1), a_B1M], 1)
            x_BTM = x_BTM + self.cross(self.ln_x(x_BTM), slots, causal=False)
        return x_BTM + self.mlp(self.ln2(x_BTM))


class _ResMLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class InversionDecoder(nn.Module):
    """p(x | z, site): a causal transformer over the probed model's tokens, conditioned on one activation."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.randn(cfg.n_ctx, cfg.d_model) * 0.02)
        self.site_emb = nn.Parameter(torch.randn(len(cfg.sites), cfg.d_site))
        # z is divided by its site's typical norm (set from data by fit_scales_) so every site arrives at unit scale.
        self.register_buffer("act_scale_S", torch.ones(len(cfg.sites)))
        self.act_in = nn.Linear(cfg.d_act + cfg.d_site, cfg.d_model)
        self.act_blocks = nn.Sequential(*[_ResMLP(cfg.d_model) for _ in range(cfg.n_act_blocks)], nn.LayerNorm(cfg.d_model))
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f, self.head = nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.vocab_size)

    def site_index(self, site: str) -> int:
        if site not in self.cfg.sites:
            raise ValueError(f"unknown site {site!r} for this decoder; it was trained on {list(self.cfg.sites)}")
        return self.cfg.sites.index(site)

    def pad(self, z_BD: Tensor) -> Tensor:
        if z_BD.shape[-1] > self.cfg.d_act:
            raise ValueError(f"z has width {z_BD.shape[-1]}; this decoder takes activations of width <= {self.cfg.d_act}")
        return F.pad(z_BD.float(), (0, self.cfg.d_act - z_BD.shape[-1]))

    def condition(self, z_BD: Tensor, site_B: Tensor) -> Tensor:
        z_BD = self.pad(z_BD) / self.act_scale_S[site_B, None]
        return self.act_blocks(self.act_in(torch.cat([z_BD, self.site_emb[site_B]], -1)))

    def forward(self, ids_BT: Tensor, z_BD: Tensor, site_B: Tensor) -> Tensor:
        """Next-token logits [B, T, V]."""
        if ids_BT.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"input of {ids_BT.shape[1]} tokens is longer than the decoder's n_ctx={self.cfg.n_ctx}")
        act_BM = self.condition(z_BD, site_B)
        x = self.tok_emb(ids_BT) + self.pos_emb[: ids_BT.shape[1]]
        for block in self.blocks:
            x = block(x, act_BM)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def fit_scales_(self, z_BD: Tensor, site_B: Tensor) -> None:
        """Set each site's scale to the mean norm of its activations in this sample."""
        for s in range(len(self.cfg.sites)):
            rows = z_BD[site_B == s]
            if len(rows):
                self.act_scale_S[s] = rows.float().norm(dim=-1).mean().clamp_min(1e-6) / math.sqrt(self.cfg.d_act)


def sequence_loss(logits_BTV: Tensor, ids_BT: Tensor, eos_id: int | None) -> Tensor:
    """Cross-entropy of tokens 1.. given their prefix, up to and including the first EOS."""
    targets = ids_BT[:, 1:].clone()
    if eos_id is not None:
        after = (targets == eos_id).long().cumsum(1) - (targets == eos_id).long() > 0  # strictly after the first EOS
        targets[after] = -100
    return F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


def save_decoder(decoder: InversionDecoder, folder: str | Path, extra: dict | None = None) -> None:
    """decoder.safetensors + decoder.json (config and anything in `extra`); the folder is written under a temporary
    name and renamed into place, keeping a feature site's codebook/ and a card.json already there."""
    with atomic_folder(folder, keep=("codebook", "card.json")) as tmp:
        save_tensors(tmp / "decoder.safetensors", decoder.state_dict())
        save_json(tmp / "decoder.json", {"config": asdict(decoder.cfg), **(extra or {})})


def load_decoder(folder: str | Path) -> InversionDecoder:
    folder = Path(folder)
    meta = load_json(folder / "decoder.json")
    try:
        decoder = InversionDecoder(DecoderConfig(**meta["config"]))
        decoder.load_state_dict(load_tensors(folder / "decoder.safetensors"))
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{folder}: decoder.json and decoder.safetensors do not make a decoder: {e}") from None
    return decoder.eval()
