"""Training the decoder on fresh (activation, input, site) pairs, resumably, with the reference's site rebalancing.

    loss = cross-entropy of the whole input given z and the site;   site weights = softmax((mean r - r_s) * rebalance)
    where r_s is site s's in-epsilon fraction (`inside_fractions`, the reference's test metric)

Dimension key: B batch, T position, D activation width.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .._io import load_json, load_tensors, save_json, save_tensors
from .decoder import InversionDecoder, sequence_loss
from .probe import PairSource, distance, real_positions, site_acts, site_name
from .sample import _generate


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
    # Site rebalancing (the reference's intended scheme, which its release never applies): every `eval_every` steps
    # measure each site's in-epsilon fraction r_s (`inside_fractions`, temperature 1) and draw sites from
    # softmax((mean r - r_s) * rebalance), so sites the decoder inverts badly get more pairs. 0: uniform sites.
    rebalance: float = 0.0  # the reference uses 6.0 for counting
    eval_every: int = 0  # steps between in-epsilon measurements (0: never; needed by rebalance)
    eval_queries: int = 16  # held-out queries per site
    eval_samples: int = 8  # samples per query
    epsilon: float = 0.1

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.warmup_steps < 0:
            raise ValueError(f"need steps, batch_size >= 1, lr > 0, warmup_steps >= 0; got {self}")
        if self.rebalance < 0 or self.eval_every < 0 or (self.rebalance > 0 and self.eval_every == 0):
            raise ValueError(f"rebalance must be >= 0 and needs eval_every >= 1; got rebalance={self.rebalance}, eval_every={self.eval_every}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))))


def train_decoder(decoder: InversionDecoder, source: PairSource, cfg: DecoderTrainConfig = DecoderTrainConfig(), *,
                  checkpoint: str | Path | None = None, progress: bool = True,
                  callback: Callable[[dict], None] | None = None) -> list[dict]:  # fmt: skip
    """Train on fresh pairs each step (batch i is a pure function of (seed, i, site weights)); returns the history.

    With `checkpoint`, the decoder, the Adam moments and the step are saved there every `checkpoint_every`
    steps and a run resumes from what it finds, to the same result as an uninterrupted run. A decoder that
    arrives trained (warm start) keeps its site scales; a fresh one measures them once.
    With `cfg.eval_every`, history records at those steps carry "inside" (site -> in-epsilon fraction) and,
    when rebalancing, the "site_weights" used from then on.
    """
    from tqdm.auto import tqdm

    names = [site_name(s) for s in source.sites]
    if names != list(decoder.cfg.sites):
        raise ValueError(f"the pair source's sites {names} differ from the decoder's {list(decoder.cfg.sites)}")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history, smooth = 0, [], None
    if checkpoint is not None and (Path(checkpoint) / "train_state.safetensors").is_file():
        start, history, smooth = _resume(decoder, opt, Path(checkpoint))
    elif bool((decoder.act_scale_S == 1).all()):  # a fresh decoder: measure each site's scale once
        z, _, s = source.batch(max(256, cfg.batch_size), seed=2**31 - 1 - cfg.seed)
        decoder.fit_scales_(z, s)
    weights = next((torch.tensor(r["site_weights"]) for r in reversed(history) if "site_weights" in r), None)
    decoder.train()
    elapsed0 = history[-1]["elapsed_s"] if history else 0.0
    t0 = time.perf_counter()
    for step in tqdm(range(start, cfg.steps), desc="train decoder", disable=not progress, initial=start, total=cfg.steps):
        record = {}
        if cfg.eval_every and step % cfg.eval_every == 0:
            inside = inside_fractions(decoder, source, cfg.eval_queries, cfg.eval_samples, epsilon=cfg.epsilon, seed=step)
            record["inside"] = inside
            if cfg.rebalance > 0:
                r = torch.tensor(list(inside.values()))
                weights = ((r.mean() - r) * cfg.rebalance).softmax(0)
                record["site_weights"] = [round(w, 6) for w in weights.tolist()]
                weights = torch.tensor(record["site_weights"])  # what is logged is what is used, so a resume matches
            decoder.train()
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        z_BD, ids_BT, site_B = (source.batch(cfg.batch_size, seed=cfg.seed * 1_000_003 + step) if weights is None else
                                source.batch(cfg.batch_size, seed=cfg.seed * 1_000_003 + step, site_weights=weights))  # fmt: skip
        loss = sequence_loss(decoder(ids_BT, z_BD, site_B), ids_BT, decoder.cfg.eos_id)
        torch.autograd.backward(loss)
        nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if record or step % 25 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), "smooth_loss": smooth,
                            "elapsed_s": elapsed0 + time.perf_counter() - t0, **record})  # fmt: skip
            if callback is not None:
                callback(history[-1])
        if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1):
            _checkpoint(decoder, opt, Path(checkpoint), step + 1, history, smooth)
    decoder.eval()
    return history


@torch.no_grad()
def inside_fractions(decoder: InversionDecoder, source: PairSource, n_queries: int = 16, n_samples: int = 8, *,
                     temperature: float = 1.0, epsilon: float = 0.1, metric: str = "euclidean", seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Site -> the fraction of decoder samples inside epsilon of their query (the reference's test metric).

    Queries are held-out pairs of `source` (its inputs and query positions, seeds apart from training's);
    each gets `n_samples` samples at `temperature`, re-run through the probed model.
    """
    was_training = decoder.training
    decoder.eval()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s, site in enumerate(source.sites):
        z_QD, _, _, latent_Q = source.pairs(n_queries, seed=2**30 + 7919 * s + seed, site=s)
        z_BD, latent_B = z_QD.repeat_interleave(n_samples, 0), latent_Q.repeat_interleave(n_samples, 0)
        ids_BT = _generate(decoder, z_BD, torch.full((len(z_BD),), s), temperature, gen)
        acts_BTD = site_acts(source.model, ids_BT, site, latent_B)
        dist_B, _ = distance(z_BD[:, : acts_BTD.shape[-1]], acts_BTD, real_positions(ids_BT, decoder.cfg.eos_id), metric)
        out[site_name(site)] = float((dist_B <= epsilon).float().mean())
    decoder.train(was_training)
    return out


def _checkpoint(decoder: InversionDecoder, opt: torch.optim.Optimizer, folder: Path, step: int, history: list, smooth: float) -> None:
    state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    for i, p in enumerate(decoder.parameters()):
        for k, v in opt.state.get(p, {}).items():
            state[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    save_tensors(folder / "train_state.safetensors", state)
    save_json(folder / "train_state.json", {"config": asdict(decoder.cfg), "step": step, "smooth_loss": smooth, "history": history})


def _resume(decoder: InversionDecoder, opt: torch.optim.Optimizer, folder: Path) -> tuple[int, list, float | None]:
    meta = load_json(folder / "train_state.json")
    if meta["config"] != asdict(decoder.cfg) | {"sites": list(decoder.cfg.sites)}:
        raise ValueError(f"{folder}: the checkpoint was made for another decoder config: {meta['config']}")
    state = load_tensors(folder / "train_state.safetensors")
    decoder.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    for i, p in enumerate(decoder.parameters()):
        moments = {k.split(".")[-1]: v for k, v in state.items() if k.startswith(f"opt.{i}.")}
        if moments:
            opt.state[p] = moments
    return int(meta["step"]), meta["history"], meta.get("smooth_loss")
