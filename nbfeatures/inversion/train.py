"""Training the decoder on fresh (activation, input, site) pairs, resumably, with the reference's site rebalancing.

    loss = cross-entropy of the whole input given z and the site;   site weights = softmax((mean r - r_s) * rebalance)
    where r_s is site s's in-epsilon fraction (`inside_fractions`, the reference's test metric); with a focus site f,
    weights = (1 - focus_share) * weights + focus_share * onehot(f)   (a curriculum for the site one cares about)

Dimension key: B batch, T position, D activation width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from .._checks import int_arg, real_arg
from ..train import TrainConfig, latest_checkpoint, train
from .decoder import InversionDecoder, sequence_loss
from .probe import PairSource, distance, real_positions, site_acts, site_name
from .sample import _generate


# The decoder's training recipe on the shared loop: AdamW with weight decay, warm-up then cosine to 0.1 x lr.
DECODER_TRAIN = TrainConfig(steps=2000, batch_size=64, lr=1e-3, adam_eps=1e-8, weight_decay=0.01, schedule="cosine",
                            warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0, log_every=25)  # fmt: skip


def decoder_train_config(**changes) -> TrainConfig:
    """DECODER_TRAIN with some fields changed, e.g. decoder_train_config(steps=16000, checkpoint_dir=...)."""
    return dataclasses.replace(DECODER_TRAIN, **changes)


@dataclass(frozen=True)
class RebalanceConfig:
    """Site rebalancing (the reference's intended scheme, which its release never applies): every `eval_every` steps
    measure each site's in-epsilon fraction r_s (`inside_fractions`, temperature 1) and draw sites from
    softmax((mean r - r_s) * rebalance), so sites the decoder inverts badly get more pairs. 0: uniform sites.
    With `focus`, that site gets `focus_share` of the pairs on top (measured on counting: +4 points in epsilon there
    for the same pairs, -4 at another site; benchmarks/inversion_in_eps.py)."""

    rebalance: float = 0.0  # the reference uses 6.0 for counting
    eval_every: int = 0  # steps between in-epsilon measurements (0: never; needed by rebalance)
    eval_queries: int = 16  # held-out queries per site
    eval_samples: int = 8  # samples per query
    epsilon: float = 0.1
    focus: str | None = None  # a site that always gets at least focus_share of the pairs
    focus_share: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "rebalance", real_arg("RebalanceConfig", "rebalance", self.rebalance))
        for name, minimum in (("eval_every", 0), ("eval_queries", 1), ("eval_samples", 1)):
            object.__setattr__(self, name, int_arg("RebalanceConfig", name, getattr(self, name), minimum))
        object.__setattr__(self, "epsilon", real_arg("RebalanceConfig", "epsilon", self.epsilon, strict=True))
        if self.rebalance > 0 and self.eval_every == 0:  # the ranges themselves were checked just above
            raise ValueError(f"rebalance must be >= 0 and needs eval_every >= 1; got rebalance={self.rebalance}, eval_every={self.eval_every}")
        object.__setattr__(self, "focus_share", real_arg("RebalanceConfig", "focus_share", self.focus_share, maximum=1.0))
        if (self.focus is None) != (self.focus_share == 0) or not isinstance(self.focus, (str, type(None))):
            raise ValueError(f"focus (a site name) and focus_share (0 < share <= 1) go together; got focus={self.focus!r}, focus_share={self.focus_share}")


class DecoderObjective:
    """Cross-entropy of the whole input given (z, site); also the batch source (batch i is a pure function of
    (seed, i, site weights)) and, with `cfg.eval_every`, the in-epsilon measurement that rebalances sites."""

    def __init__(self, decoder: InversionDecoder, source: PairSource, cfg: RebalanceConfig, batch_size: int, seed: int = 0):
        names = [site_name(s) for s in source.sites]
        if names != list(decoder.cfg.sites):
            raise ValueError(f"the pair source's sites {names} differ from the decoder's {list(decoder.cfg.sites)}")
        if cfg.focus is not None and cfg.focus not in names:
            raise ValueError(f"focus site {cfg.focus!r} is not one of the decoder's sites {names}")
        self.decoder, self.source, self.cfg, self.batch_size, self.seed = decoder, source, cfg, batch_size, seed
        self.weights: Tensor | None = self.focused(torch.full((len(names),), 1 / len(names))) if cfg.focus else None  # None: uniform

    def focused(self, weights: Tensor) -> Tensor:
        """Site weights with the focus site's share mixed in (unchanged without a focus)."""
        if self.cfg.focus is None:
            return weights
        onehot = torch.zeros_like(weights)
        onehot[list(self.decoder.cfg.sites).index(self.cfg.focus)] = 1.0
        return (1 - self.cfg.focus_share) * weights + self.cfg.focus_share * onehot

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        seed = self.seed * 1_000_003 + step
        if self.weights is None:
            return self.source.batch(self.batch_size, seed=seed)
        return self.source.batch(self.batch_size, seed=seed, site_weights=self.weights)

    def before_step_(self, step: int) -> dict | None:
        if not self.cfg.eval_every or step % self.cfg.eval_every:
            return None
        c = self.cfg
        record = {"measured_at": step, "inside": inside_fractions(self.decoder, self.source, c.eval_queries, c.eval_samples, epsilon=c.epsilon, seed=step)}
        if c.rebalance > 0:
            r = torch.tensor(list(record["inside"].values()))
            record["site_weights"] = [round(w, 6) for w in self.focused(((r.mean() - r) * c.rebalance).softmax(0)).tolist()]
            self.weights = torch.tensor(record["site_weights"])  # what is logged is what is used, so a resume matches
        self.decoder.train()
        return record

    def __call__(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        z_BD, ids_BT, site_B = batch
        loss = sequence_loss(self.decoder(ids_BT, z_BD, site_B), ids_BT, self.decoder.cfg.eos_id)
        return loss, {"loss": loss.item()}

    def config_dict(self) -> dict:
        return {**asdict(self.cfg), "seed": self.seed}

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.weights is None else {"site_weights": self.weights}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.weights = state.get("site_weights")


def train_decoder(decoder: InversionDecoder, source: PairSource, cfg: TrainConfig = DECODER_TRAIN,
                  rebalance: RebalanceConfig = RebalanceConfig(), *, progress: bool = True,
                  callback: Callable[[dict], None] | None = None) -> list[dict]:  # fmt: skip
    """Train on fresh pairs each step through the shared loop (`nbfeatures.train.train`); returns the history.

    With `cfg.checkpoint_dir` a run saves every `cfg.checkpoint_every` steps and resumes from what it finds, to the
    same result as an uninterrupted run. A decoder that arrives trained (warm start) keeps its site scales; a fresh
    one measures them once. With `rebalance.eval_every`, history rows carry "inside" (site -> in-epsilon fraction,
    measured before the update of step "measured_at") and, when rebalancing, the "site_weights" used from then on.
    """
    objective = DecoderObjective(decoder, source, rebalance, cfg.batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    resuming = cfg.checkpoint_dir is not None and latest_checkpoint(cfg.checkpoint_dir) is not None
    if not resuming and bool((decoder.act_scale_S == 1).all()):  # a fresh decoder: measure each site's scale once
        z, _, s = source.batch(max(256, cfg.batch_size), seed=2**31 - 1 - cfg.seed)
        decoder.fit_scales_(z.to(decoder.act_scale_S.device), s.to(decoder.act_scale_S.device))
    callbacks = [lambda step, row: callback(row)] if callback is not None else []
    history = train(decoder, objective, cfg, objective, callbacks, progress, desc="train decoder")
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))} for row in history.to_dict("records")]


@torch.no_grad()
def inside_fractions(decoder: InversionDecoder, source: PairSource, n_queries: int = 16, n_samples: int = 8, *,
                     temperature: float = 1.0, epsilon: float = 0.1, metric: str = "euclidean", seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Site -> the fraction of decoder samples inside epsilon of their query (the reference's test metric).

    Queries are held-out pairs of `source` (its inputs and query positions, seeds apart from training's);
    each gets `n_samples` samples at `temperature`, re-run through the probed model. The decoder may sit on
    another device than the pairs (which stay on the CPU); the draws are the same on any device.
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
