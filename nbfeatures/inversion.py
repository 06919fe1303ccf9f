"""InversionView (Huang et al. 2024): sample the inputs an activation encodes with a conditional decoder.

    preimage_eps(z) = {x : D(f(x), z) <= eps}      D(a, z) = min_t ||a_t - z|| / ||z||   (or min_t 1 - cos(a_t, z))
    decoder p(x | z, site): a small causal transformer; [z / scale_site, site embedding] -> residual MLP blocks
    -> one extra attended key/value slot in every layer ("prefix", the reference's default) or cross-attention

Training pairs are made on the fly: sample inputs, run the probed model once, pick a site and a query position
per row, keep (activation, whole input, site). Sampling draws candidates at several temperatures (optionally
with noise on z), re-runs every candidate through the probed model for its true distance and colours each
token by log p(token | z) - log p(token | z_BOS). A site is a `sites` name; `blocks.{i}.attn.hook_z.{h}`
means head h's output (its slice of the input of the attention's output projection).

Dimension key: B batch, T position, D activation width (zero-padded to the widest site), S sites, V vocab,
M decoder width, H heads.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sites as S
from ._io import load_json, load_tensors, save_json, save_tensors

METRICS = ("euclidean", "cosine")
_HEAD = re.compile(r"(.+\.attn\.hook_z)\.(\d+)")


# ----------------------------------------------------------------------------- distance


def distance(z_D: Tensor, acts_BTD: Tensor, mask_BT: Tensor | None = None, metric: str = "euclidean") -> tuple[Tensor, Tensor]:
    """(min over valid positions of D(acts[b, t], z) [B], the position it is at [B]).

    euclidean: ||a - z|| / ||z||;  cosine: 1 - cos(a, z). `mask_BT` marks the positions a candidate has.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if acts_BTD.shape[-1] != z_D.shape[-1]:
        raise ValueError(f"z has width {z_D.shape[-1]} but the activations have width {acts_BTD.shape[-1]}")
    z_D, acts_BTD = z_D.float(), acts_BTD.float()
    if metric == "euclidean":
        d_BT = (acts_BTD - z_D).norm(dim=-1) / z_D.norm().clamp_min(1e-12)
    else:
        d_BT = 1 - F.cosine_similarity(acts_BTD, z_D.expand_as(acts_BTD), dim=-1, eps=1e-12)
    if mask_BT is not None:
        d_BT = d_BT.masked_fill(~mask_BT.bool(), math.inf)
    return d_BT.min(dim=-1)


# ----------------------------------------------------------------------------- reading sites


def split_site(name: str) -> tuple[str, int | None]:
    """'blocks.1.attn.hook_z.0' -> ('blocks.1.attn.hook_z', 0); any other name -> (name, None)."""
    m = _HEAD.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def default_sites(model: S.Model) -> list[str]:
    """The residual stream at every layer, every attention and MLP output, and every head's output."""
    names = S.site_names(model)
    n_layers = sum(n.endswith("hook_resid_post") for n in names)
    heads = S.resolve(model, "blocks.0.attn.hook_z").heads or 1
    out = ["blocks.0.hook_resid_pre"]
    for i in range(n_layers):
        out += [f"blocks.{i}.attn.hook_z.{h}" for h in range(heads)]
        out += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out", f"blocks.{i}.hook_resid_post"]
    return out


def read_sites(model: S.Model, ids_BT: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Activations [B, T, D] at each site (head sites sliced out of hook_z) from one forward pass."""
    base = {n: split_site(n) for n in names}
    for name, (site, head) in base.items():
        resolved = S.resolve(model, site)  # ValueError naming the valid sites
        if head is not None and not (resolved.heads and head < resolved.heads):
            raise ValueError(f"site {name!r}: head {head} does not exist; the model has {resolved.heads or 0} heads")
    with torch.no_grad():
        acts = S.read_acts(model, ids_BT, sorted({s for s, _ in base.values()}))
    return {n: (acts[s][:, :, h] if h is not None else acts[s]).float() for n, (s, h) in base.items()}


def site_widths(model: S.Model, names: Sequence[str], bos_id: int) -> dict[str, int]:
    acts = read_sites(model, torch.tensor([[bos_id]]), names)
    return {n: a.shape[-1] for n, a in acts.items()}


# ----------------------------------------------------------------------------- the decoder


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
        object.__setattr__(self, "sites", tuple(self.sites))
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites must be a non-empty list of distinct names, got {list(self.sites)}")
        if self.conditioning not in ("prefix", "cross"):
            raise ValueError(f"conditioning must be 'prefix' or 'cross', got {self.conditioning!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if min(self.vocab_size, self.n_ctx, self.d_act, self.n_layers, self.d_site) < 1 or self.n_ctx < 2:
            raise ValueError("vocab_size, d_act, n_layers, d_site must be >= 1 and n_ctx >= 2")
        for t in (self.bos_id, self.eos_id):
            if t is not None and not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")


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
    """decoder.safetensors + decoder.json (config and anything in `extra`), each written atomically."""
    folder = Path(folder)
    save_tensors(folder / "decoder.safetensors", decoder.state_dict())
    save_json(folder / "decoder.json", {"config": asdict(decoder.cfg), **(extra or {})})


def load_decoder(folder: str | Path) -> InversionDecoder:
    folder = Path(folder)
    meta = load_json(folder / "decoder.json")
    try:
        decoder = InversionDecoder(DecoderConfig(**meta["config"]))
        decoder.load_state_dict(load_tensors(folder / "decoder.safetensors"))
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{folder}: decoder.json and decoder.safetensors do not make a decoder: {e}") from None
    return decoder.eval()


# ----------------------------------------------------------------------------- training data and training


@dataclass
class PairSource:
    """(z, input, site) triples made on the fly through the probed model.

    `inputs(n, seed)` returns token ids [n, T] (right-padded, BOS first); `query_mask(ids)` marks the positions a
    query may sit at (default: every position but BOS, before the first EOS/pad). Sites are drawn uniformly.
    """

    model: S.Model
    sites: Sequence[str]
    inputs: Callable[[int, int], Tensor]
    query_mask: Callable[[Tensor], Tensor] | None = None
    eos_id: int | None = None

    def batch(self, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """(z [n, D_max] zero-padded, ids [n, T], site index [n])."""
        ids_BT = self.inputs(n, seed)
        gen = torch.Generator().manual_seed(seed)
        acts = read_sites(self.model, ids_BT, self.sites)
        mask_BT = self.query_mask(ids_BT) if self.query_mask else real_positions(ids_BT, self.eos_id)
        mask_BT = mask_BT.clone()
        mask_BT[:, 0] &= self.query_mask is not None  # BOS carries no information; only a custom mask may ask for it
        if not bool(mask_BT.any(1).all()):
            raise ValueError("query_mask leaves some inputs without a position to query")
        pos_B = torch.multinomial(mask_BT.float(), 1, generator=gen)[:, 0]
        site_B = torch.randint(len(self.sites), (n,), generator=gen)
        width = max(a.shape[-1] for a in acts.values())
        z_BD = torch.zeros(n, width)
        rows = torch.arange(n)
        for s, name in enumerate(self.sites):
            pick = site_B == s
            a = acts[name][rows[pick], pos_B[pick]]
            z_BD[pick, : a.shape[-1]] = a
        return z_BD, ids_BT, site_B


def real_positions(ids_BT: Tensor, eos_id: int | None) -> Tensor:
    """Bool [B, T]: positions before the first EOS after BOS (all positions when eos_id is None)."""
    if eos_id is None:
        return torch.ones_like(ids_BT, dtype=torch.bool)
    is_eos = ids_BT == eos_id
    is_eos[:, 0] = False
    return is_eos.long().cumsum(1) == 0


@dataclass(frozen=True)
class DecoderTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200  # steps between resumable checkpoints (when a checkpoint folder is given)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.warmup_steps < 0:
            raise ValueError(f"need steps, batch_size >= 1, lr > 0, warmup_steps >= 0; got {self}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))))


def train_decoder(decoder: InversionDecoder, source: PairSource, cfg: DecoderTrainConfig = DecoderTrainConfig(), *,
                  checkpoint: str | Path | None = None, progress: bool = True,
                  callback: Callable[[dict], None] | None = None) -> list[dict]:  # fmt: skip
    """Train on fresh pairs each step (batch i is a pure function of (seed, i)); returns the history.

    With `checkpoint`, the decoder, the Adam moments and the step are saved there every `checkpoint_every`
    steps and a run resumes from what it finds.
    """
    from tqdm.auto import tqdm

    if list(source.sites) != list(decoder.cfg.sites):
        raise ValueError(f"the pair source's sites {list(source.sites)} differ from the decoder's {list(decoder.cfg.sites)}")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = 0, []
    if checkpoint is not None and (Path(checkpoint) / "train_state.safetensors").is_file():
        start, history = _resume(decoder, opt, Path(checkpoint))
    else:  # a fresh run: measure each site's scale once
        z, _, s = source.batch(max(256, cfg.batch_size), seed=2**31 - 1 - cfg.seed)
        decoder.fit_scales_(z, s)
    decoder.train()
    smooth = history[-1]["smooth_loss"] if history else None
    elapsed0 = history[-1]["elapsed_s"] if history else 0.0
    t0 = time.perf_counter()
    for step in tqdm(range(start, cfg.steps), desc="train decoder", disable=not progress, initial=start, total=cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        z_BD, ids_BT, site_B = source.batch(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        loss = sequence_loss(decoder(ids_BT, z_BD, site_B), ids_BT, decoder.cfg.eos_id)
        loss.backward()
        nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 25 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), "smooth_loss": smooth,
                            "elapsed_s": elapsed0 + time.perf_counter() - t0})  # fmt: skip
            if callback is not None:
                callback(history[-1])
        if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1):
            _checkpoint(decoder, opt, Path(checkpoint), step + 1, history)
    decoder.eval()
    return history


def _checkpoint(decoder: InversionDecoder, opt: torch.optim.Optimizer, folder: Path, step: int, history: list) -> None:
    state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    for i, p in enumerate(decoder.parameters()):
        for k, v in opt.state.get(p, {}).items():
            state[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    save_tensors(folder / "train_state.safetensors", state)
    save_json(folder / "train_state.json", {"config": asdict(decoder.cfg), "step": step, "history": history})


def _resume(decoder: InversionDecoder, opt: torch.optim.Optimizer, folder: Path) -> tuple[int, list]:
    meta = load_json(folder / "train_state.json")
    if meta["config"] != asdict(decoder.cfg) | {"sites": list(decoder.cfg.sites)}:
        raise ValueError(f"{folder}: the checkpoint was made for another decoder config: {meta['config']}")
    state = load_tensors(folder / "train_state.safetensors")
    decoder.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    for i, p in enumerate(decoder.parameters()):
        moments = {k.split(".")[-1]: v for k, v in state.items() if k.startswith(f"opt.{i}.")}
        if moments:
            opt.state[p] = moments
    return int(meta["step"]), meta["history"]


# ----------------------------------------------------------------------------- sampling


class InversionSamples(NamedTuple):
    """Candidates for one query, sorted by true distance."""

    tokens: list[list[int]]  # each candidate, BOS first, EOS and padding dropped
    distance: Tensor  # [N] min over positions of D(f(x), z)
    position: Tensor  # [N] the position where that minimum is
    inside: Tensor  # [N] bool: distance <= epsilon
    temperature: Tensor  # [N] the temperature it was drawn at
    colour: list[Tensor]  # per candidate [len]: log p(token | z) - log p(token | z_BOS) (0 at BOS)
    site: str
    epsilon: float

    @property
    def inside_fraction(self) -> float:
        return float(self.inside.float().mean()) if len(self.inside) else 0.0


def query_activation(model: S.Model, ids_T: Tensor, site: str, position: int) -> Tensor:
    """The activation z [D] of a query input at a site and position."""
    ids_T = torch.as_tensor(ids_T).reshape(-1)
    if not -len(ids_T) <= position < len(ids_T):
        raise ValueError(f"position {position} is outside the query input of {len(ids_T)} tokens; allowed 0..{len(ids_T) - 1}")
    return read_sites(model, ids_T[None], [site])[site][0, position]


@torch.no_grad()
def generate(decoder: InversionDecoder, z_D: Tensor, site: str, n: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """n inputs [n, n_ctx] drawn from p(x | z, site), BOS first, padded with EOS (or BOS) after the end."""
    cfg = decoder.cfg
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z_BD = decoder.pad(z_D.reshape(1, -1)).expand(n, -1)
    site_B = torch.full((n,), decoder.site_index(site), dtype=torch.long)
    pad = cfg.eos_id if cfg.eos_id is not None else cfg.bos_id
    ids = torch.full((n, 1), cfg.bos_id, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(cfg.n_ctx - 1):
        probs = (decoder(ids, z_BD, site_B)[:, -1] / temperature).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].masked_fill(done, pad)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if cfg.eos_id is not None:
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
    return ids


@torch.no_grad()
def token_logprobs(decoder: InversionDecoder, ids_BT: Tensor, z_D: Tensor, site: str) -> Tensor:
    """log p(token_t | tokens_<t, z) [B, T] (0 at BOS)."""
    site_B = torch.full((len(ids_BT),), decoder.site_index(site), dtype=torch.long)
    logp = decoder(ids_BT, decoder.pad(z_D.reshape(1, -1)).expand(len(ids_BT), -1), site_B).log_softmax(-1)
    return F.pad(logp[:, :-1].gather(-1, ids_BT[:, 1:, None])[..., 0], (1, 0))


def sample(decoder: InversionDecoder, model: S.Model, site: str, *, query: Tensor | None = None, position: int | None = None,
           z: Tensor | None = None, temperatures: Sequence[float] = (0.5, 1.0, 2.0), n_per_temperature: int = 32,
           noise: float = 0.0, epsilon: float = 0.1, metric: str = "euclidean", seed: int = 0) -> InversionSamples:  # fmt: skip
    """Draw candidates for the activation at (query, site, position), or for a given z, and measure them.

    noise > 0 adds Gaussian noise of std noise * std(z) to z for each temperature's draw (the reference's eta).
    """
    decoder.site_index(site)
    if (z is None) == (query is None):
        raise ValueError("pass either query (token ids) with position, or z (an activation)")
    if z is None:
        if position is None:
            raise ValueError("a query needs a position")
        z = query_activation(model, query, site, position)
    z = torch.as_tensor(z).float().reshape(-1)
    bos = torch.tensor([[decoder.cfg.bos_id]])
    z_bos = read_sites(model, bos, [site])[site][0, 0]
    if z.shape[-1] != z_bos.shape[-1]:
        raise ValueError(f"z has width {z.shape[-1]} but site {site!r} has width {z_bos.shape[-1]}")
    gen = torch.Generator().manual_seed(seed)
    drawn, temps = [], []
    for t in temperatures:
        z_t = z + noise * z.std() * torch.randn(z.shape, generator=gen) if noise > 0 else z
        drawn.append(generate(decoder, z_t, site, n_per_temperature, t, gen))
        temps += [float(t)] * n_per_temperature
    width = max(d.shape[1] for d in drawn)
    pad = decoder.cfg.eos_id if decoder.cfg.eos_id is not None else decoder.cfg.bos_id
    ids_BT = torch.cat([F.pad(d, (0, width - d.shape[1]), value=pad) for d in drawn])
    mask_BT = real_positions(ids_BT, decoder.cfg.eos_id)
    acts = read_sites(model, ids_BT, [site])[site]
    dist_B, pos_B = distance(z, acts, mask_BT, metric)
    diff_BT = token_logprobs(decoder, ids_BT, z, site) - token_logprobs(decoder, ids_BT, z_bos, site)
    order = dist_B.argsort(stable=True)
    lengths = mask_BT.sum(1)
    if decoder.cfg.eos_id is not None:  # keep the EOS token in what is shown: it ends the input
        lengths = (lengths + 1).clamp(max=width)
    return InversionSamples(
        tokens=[ids_BT[i, : lengths[i]].tolist() for i in order.tolist()],
        distance=dist_B[order], position=pos_B[order], inside=dist_B[order] <= epsilon,
        temperature=torch.tensor(temps)[order], colour=[diff_BT[i, : lengths[i]] for i in order.tolist()],
        site=site, epsilon=epsilon,
    )  # fmt: skip


def feature_query(W_dec_FD: Tensor, index: int, scale: float, b_dec_D: Tensor | None = None) -> Tensor:
    """z for "inputs where this feature fires like this": scale * W_dec[index] (+ b_dec).

    With scale = a latent's activation on some input this is that input's activation restricted to the one
    SAE latent; with a codebook, pass the codebook [C, D] and the code (scale 1, or the code's norm share).
    """
    if not 0 <= index < W_dec_FD.shape[0]:
        raise ValueError(f"feature index {index} is outside 0..{W_dec_FD.shape[0] - 1}")
    z = scale * W_dec_FD[index].detach().float()
    return z + b_dec_D.detach().float() if b_dec_D is not None else z


def panel_callables(decoder: InversionDecoder, model: S.Model, vocab: Sequence[str], encode: Callable[[str], list[int]], *,
                    n_per_temperature: int = 32, noise: float = 0.0, metric: str = "euclidean", seed: int = 0):  # fmt: skip
    """(sample, tokenize) for `widgets.inversion.InversionPanel`: token strings in, token strings out.

    Each call draws fresh samples (call i uses seed + i), so pressing Sample again shows new ones; the sequence of
    draws is reproducible from `seed`.
    """
    calls = itertools.count()

    def tokenize(text: str) -> list[str]:
        return [vocab[t] for t in encode(text)]

    def sample_fn(text: str, site: str, position: int, temperature: float) -> InversionSamples:
        out = sample(decoder, model, site, query=torch.tensor(encode(text)), position=position, temperatures=(temperature,),
                     n_per_temperature=n_per_temperature, noise=noise, metric=metric, seed=seed + next(calls))  # fmt: skip
        return out._replace(tokens=[[vocab[t] for t in row] for row in out.tokens])

    return sample_fn, tokenize
