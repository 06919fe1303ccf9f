"""One training loop for every dictionary; the objective is passed in.

    for step in range(steps):
        x = source.batch(step)                     # deterministic in the step: resumable
        loss, logs = objective(x)                  # objectives hold their own state (dead-latent counters)
        loss.backward(); sae.before_step_(); opt.step(); sae.after_step_()

Checkpoints are folders written under a temporary name and renamed into place, holding the
dictionary's tensors, Adam's state and the objective's state as safetensors plus the step and
history as JSON. Resuming from one gives bit-for-bit the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._io import load_json, load_tensors, save_json, save_tensors
from .harvest import TensorSource

Callback = Callable[[int, dict], Any]


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimiser steps
    batch_size: int = 4096  # activations per step
    lr: float | None = None  # None: the dictionary's default (TopK: 2e-4 / sqrt(d_sae / 2^14)), else 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10  # Gao et al.: small eps, since TopK gradients are small and sparse
    warmup_steps: int = 0  # linear warm-up
    decay_fraction: float = 0.0  # linear decay to 0 over this last fraction of steps
    grad_clip: float | None = None  # max gradient norm
    log_every: int = 10  # steps between history rows and callback calls
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: str | None = None  # where they go; an existing latest checkpoint is resumed
    seed: int = 0  # batch order

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"need steps > 0 and batch_size > 0, got steps={self.steps}, batch_size={self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be > 0, got {self.log_every}")

    def lr_at(self, step: int, base: float) -> float:
        scale = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            scale = (step + 1) / self.warmup_steps
        decay_start = self.steps * (1 - self.decay_fraction)
        if self.decay_fraction and step >= decay_start:
            scale *= max(0.0, (self.steps - step) / (self.steps - decay_start))
        return base * scale


def default_objective(sae: nn.Module) -> Callable[[Tensor], tuple[Tensor, dict]]:
    """TopK SAEs: FVU + AuxK; ReLU SAEs: MSE + L1. Other dictionaries must pass their objective."""
    from .sae.relu import ReLUObjective, ReLUSAE
    from .sae.topk import TopKObjective, TopKSAE

    if isinstance(sae, TopKSAE):
        return TopKObjective(sae)
    if isinstance(sae, ReLUSAE):
        return ReLUObjective(sae)
    raise ValueError(f"no default objective for {type(sae).__name__}; pass objective=...")


def train_sae(sae: nn.Module, source: Any, cfg: TrainConfig, objective: Callable | None = None,
              callbacks: Sequence[Callback] = (), progress: bool = True) -> pd.DataFrame:
    """Train `sae` on `source` (a [N, D] tensor or anything with .batch(step)); returns the history."""
    objective = objective or default_objective(sae)
    if isinstance(source, Tensor) or not hasattr(source, "batch"):
        source = TensorSource(source, cfg.batch_size, cfg.seed)
    base_lr = cfg.lr or getattr(getattr(sae, "cfg", None), "default_lr", 1e-3)
    # a module may ask for several learning rates (a codebook model: codebooks, and the model at a factor)
    groups = sae.param_groups(base_lr) if hasattr(sae, "param_groups") else [{"params": list(sae.parameters()), "lr": base_lr}]
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.Adam(groups, lr=base_lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    start, history = 0, []
    ckpt_dir = pathlib.Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt_dir is not None and latest_checkpoint(ckpt_dir) is not None:
        start, history = load_checkpoint(latest_checkpoint(ckpt_dir), sae, opt, objective)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    t0 = time.perf_counter()
    for step in bar:
        x = source.batch(step)
        x = x.to(next(sae.parameters()).device)
        if not torch.isfinite(x).all():
            raise ValueError(f"step {step}: the activation batch contains non-finite values (NaN or inf)")
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step, group["base_lr"])
        loss, logs = objective(x)
        if not math.isfinite(loss.item()):
            raise ValueError(f"step {step}: loss is {loss.item()}; lower the learning rate or check the activations")
        opt.zero_grad(set_to_none=True)
        # not loss.backward(): importing nnsight patches Tensor.backward to look for a `with` block first
        torch.autograd.backward(loss)
        if hasattr(sae, "before_step_"):
            sae.before_step_()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        if hasattr(sae, "after_step_"):
            sae.after_step_()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n_tok = x.numel() if not x.is_floating_point() else len(x)  # token batches [B, T] or activations [N, D]
            row = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "tokens": (step + 1) * n_tok,
                   "elapsed_s": time.perf_counter() - t0, **logs}
            history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "fvu", "l0", "dead_fraction")})
            for cb in callbacks:
                cb(step + 1, row)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt_dir, step + 1, sae, opt, objective, history, cfg)
    bar.close()
    if ckpt_dir is not None and start < cfg.steps:
        save_checkpoint(ckpt_dir, cfg.steps, sae, opt, objective, history, cfg)
    return pd.DataFrame(history)


# ----------------------------------------------------------------------------- checkpoints


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> pathlib.Path | None:
    """The complete checkpoint with the highest step (half-written ones are never named step_*)."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    steps = sorted((int(p.name.removeprefix("step_")), p) for p in ckpt_dir.glob("step_*") if p.name.removeprefix("step_").isdigit())
    return steps[-1][1] if steps else None


def save_checkpoint(ckpt_dir: pathlib.Path, step: int, sae: nn.Module, opt: torch.optim.Optimizer,
                    objective: Any, history: list[dict], cfg: TrainConfig) -> pathlib.Path:
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "dictionary.safetensors", sae.state_dict())
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    if hasattr(objective, "state_dict"):
        save_tensors(tmp / "objective.safetensors", objective.state_dict())
    save_json(tmp / "trainer_state.json", {"step": step, "optimizer": opt_meta, "history": history,
                                           "config": {k: v for k, v in asdict(cfg).items()}, "dictionary": type(sae).__name__})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a directory rename is atomic: the checkpoint appears whole or not at all
    return final


def load_checkpoint(path: pathlib.Path, sae: nn.Module, opt: torch.optim.Optimizer, objective: Any) -> tuple[int, list[dict]]:
    state = load_json(path / "trainer_state.json")
    if state.get("dictionary") != type(sae).__name__:
        raise ValueError(f"{path}: checkpoint holds a {state.get('dictionary')}, not a {type(sae).__name__}")
    tensors = load_tensors(path / "dictionary.safetensors")
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise ValueError(f"{path}: checkpoint tensors {got} do not match the dictionary's {expected}")
    sae.load_state_dict(tensors)
    opt.load_state_dict(_unflatten_optimizer(load_tensors(path / "optimizer.safetensors"), state["optimizer"]))
    if hasattr(objective, "load_state_dict") and (path / "objective.safetensors").exists():
        objective.load_state_dict(load_tensors(path / "objective.safetensors"))
    return int(state["step"]), list(state["history"])


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v if isinstance(v, Tensor) else torch.tensor(v)
               for i, per in sd["state"].items() for k, v in per.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
