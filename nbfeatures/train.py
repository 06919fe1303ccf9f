"""One training loop for everything that trains: dictionaries, codebook models, InversionView decoders, zoo models.

    for step in range(steps):
        extra = objective.before_step_(step)       # optional: measurements that steer training (site rebalancing)
        batch = source.batch(step)                 # deterministic in the step: resumable
        loss, logs = objective(batch)              # objectives hold their own state (dead-latent counters)
        backward; module.before_step_(); clip; AdamW step at lr * lr_factor(cfg, step); module.after_step_()

The module is what is trained (its parameters, or `objective.param_groups(lr)`); the objective is passed in (a
dictionary's `default_objective()` when omitted). Weight decay is decoupled (AdamW) and, as in nanoGPT, applies
to weight matrices only: decaying biases and norm gains only hurts.

Checkpoints are `step_*` folders written under a temporary name and renamed into place, holding the module's
tensors, Adam's state and the objective's state as safetensors plus the step, history, smoothed loss and every
config as JSON. Resuming gives bit-for-bit the weights of an uninterrupted run; resuming with another module,
objective or training config is refused with a message naming the difference.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Literal, Protocol, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._io import load_json, load_tensors, save_json, save_tensors
from .harvest import TensorSource

Callback = Callable[[int, dict], Any]


class Objective(Protocol):
    """batch -> (loss, logs). Optional: state_dict / load_state_dict (saved in checkpoints), config_dict (its
    hyperparameters, checked on resume), param_groups(lr), before_step_(step) -> extra history fields or None,
    after_step_(step)."""

    def __call__(self, batch: Any) -> tuple[Tensor, dict[str, float]]: ...


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimiser steps
    batch_size: int = 4096  # activations (or sequences, or pairs) per step
    lr: float | None = None  # None: the dictionary's default (TopK: 2e-4 / sqrt(d_sae / 2^14)), else 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10  # Gao et al.: small eps, since TopK gradients are small and sparse
    weight_decay: float = 0.0  # decoupled (AdamW), on weight matrices only
    schedule: Literal["linear", "cosine"] = "linear"  # see lr_factor
    warmup_steps: int = 0  # linear warm-up
    decay_fraction: float = 0.0  # "linear": decay to 0 over this last fraction of steps
    min_lr_ratio: float = 0.1  # "cosine": the cosine ends at this fraction of lr, so late steps still learn
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
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"decay_fraction and min_lr_ratio must lie in [0, 1], got {self.decay_fraction}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or (self.grad_clip is not None and not self.grad_clip > 0):
            raise ValueError(f"need warmup_steps >= 0, weight_decay >= 0 and grad_clip > 0 (or None); got "
                             f"{self.warmup_steps}, {self.weight_decay}, {self.grad_clip}")  # fmt: skip
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        if self.log_every <= 0 or self.checkpoint_every < 0:
            raise ValueError(f"need log_every > 0 and checkpoint_every >= 0, got {self.log_every}, {self.checkpoint_every}")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The one learning-rate schedule: linear warm-up, then "linear" (constant, then towards 0 over the last
    decay_fraction of steps) or "cosine" (towards min_lr_ratio); both reach their end value at step == steps,
    one past the last step trained."""
    if cfg.schedule == "cosine":
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    scale = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
    decay_start = cfg.steps * (1 - cfg.decay_fraction)
    if cfg.decay_fraction and step >= decay_start:
        scale *= max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return scale


def train(module: nn.Module, source: Any, cfg: TrainConfig, objective: Objective, callbacks: Sequence[Callback] = (),
          progress: bool = True, desc: str = "train") -> pd.DataFrame:  # fmt: skip
    """Train `module` on `source.batch(step)` with `objective`; returns the history (one row per logged step)."""
    base_lr = cfg.lr or getattr(getattr(module, "cfg", None), "default_lr", 1e-3)
    opt = _optimizer(module, objective, base_lr, cfg)
    start, history, smooth = 0, [], None
    ckpt_dir = pathlib.Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt_dir is not None and latest_checkpoint(ckpt_dir) is not None:
        start, history, smooth = load_checkpoint(latest_checkpoint(ckpt_dir), module, opt, objective, cfg)
    module.train()
    device = next(module.parameters()).device
    elapsed0 = history[-1]["elapsed_s"] if history else 0.0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc=desc)
    t0 = time.perf_counter()
    for step in bar:
        extra = objective.before_step_(step) if hasattr(objective, "before_step_") else None
        batch = _to(source.batch(step), device)
        first = batch[0] if isinstance(batch, tuple) else batch
        if isinstance(first, Tensor) and first.is_floating_point() and not torch.isfinite(first).all():
            raise ValueError(f"step {step}: the batch contains non-finite values (NaN or inf)")
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(cfg, step)
        loss, logs = objective(batch)
        if not math.isfinite(loss.item()):
            raise ValueError(f"step {step}: loss is {loss.item()}; lower the learning rate or check the data")
        opt.zero_grad(set_to_none=True)
        # not loss.backward(): importing nnsight patches Tensor.backward to look for a `with` block first
        torch.autograd.backward(loss)
        if hasattr(module, "before_step_"):
            module.before_step_()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        if hasattr(module, "after_step_"):
            module.after_step_()
        if hasattr(objective, "after_step_"):
            objective.after_step_(step + 1)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if extra or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "tokens": (step + 1) * _batch_items(batch),
                   "elapsed_s": elapsed0 + time.perf_counter() - t0, "smooth_loss": smooth, **logs, **(extra or {})}  # fmt: skip
            history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "fvu", "l0", "dead_fraction")})
            for cb in callbacks:
                cb(step + 1, row)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt_dir, step + 1, module, opt, objective, history, cfg, smooth)
    bar.close()
    module.eval()
    if ckpt_dir is not None and start < cfg.steps:
        save_checkpoint(ckpt_dir, cfg.steps, module, opt, objective, history, cfg, smooth)
    return pd.DataFrame(history)


def train_sae(sae: nn.Module, source: Any, cfg: TrainConfig, objective: Objective | None = None,
              callbacks: Sequence[Callback] = (), progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Train a dictionary on `source` (a [N, D] tensor, or anything with .batch(step)); returns the history.

    Without `objective`, the dictionary's own `default_objective()` (TopK: FVU + AuxK; ReLU: MSE + L1; ...)."""
    if objective is None:
        if not hasattr(sae, "default_objective"):
            raise ValueError(f"{type(sae).__name__} has no default objective; pass objective=...")
        objective = sae.default_objective()
    if isinstance(source, Tensor) or not hasattr(source, "batch"):
        source = TensorSource(source, cfg.batch_size, cfg.seed)
    return train(sae, source, cfg, objective, callbacks, progress)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return type(batch)(*(_to(b, device) for b in batch)) if hasattr(batch, "_fields") else tuple(_to(b, device) for b in batch)
    return batch


def _batch_items(batch: Any) -> int:
    """Tokens in a batch: every id of a token batch [B, T]; one per row of activations [N, D] or of a tuple's first."""
    first = batch[0] if isinstance(batch, tuple) else batch
    if not isinstance(first, Tensor):
        return 0
    return first.numel() if not first.is_floating_point() else len(first)


def _optimizer(module: nn.Module, objective: Any, base_lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    # an objective may ask for several learning rates (a codebook model: codebooks, and the model at a factor)
    groups = objective.param_groups(base_lr) if hasattr(objective, "param_groups") else [{"params": list(module.parameters()), "lr": base_lr}]
    if cfg.weight_decay > 0:  # nanoGPT's split: matrices decay, biases and gains do not
        groups = [{**g, "params": ps, "weight_decay": wd} for g in groups
                  for ps, wd in (([p for p in g["params"] if p.dim() >= 2], cfg.weight_decay), ([p for p in g["params"] if p.dim() < 2], 0.0)) if ps]  # fmt: skip
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=base_lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=0.0)


# ----------------------------------------------------------------------------- checkpoints

# fields that may differ between a run and the one it resumes: how long it runs and how often it logs or saves
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "checkpoint_dir"}


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> pathlib.Path | None:
    """The complete checkpoint with the highest step (half-written ones are never named step_*)."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    steps = sorted((int(p.name.removeprefix("step_")), p) for p in ckpt_dir.glob("step_*") if p.name.removeprefix("step_").isdigit())
    return steps[-1][1] if steps else None


def _configs(module: nn.Module, objective: Any, cfg: TrainConfig) -> dict:
    """Everything a resume must agree on: the module's class and config, the objective's class and hyperparameters,
    and the training config (JSON round-tripped, so a loaded one compares equal)."""
    import json

    module_cfg = module.config_dict() if hasattr(module, "config_dict") else None
    objective_cfg = objective.config_dict() if hasattr(objective, "config_dict") else None
    train_cfg = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _RESUMABLE_CHANGES}
    return json.loads(json.dumps({"module": type(module).__name__, "module_config": module_cfg, "objective": type(objective).__name__,
                                  "objective_config": objective_cfg, "train_config": train_cfg}, default=str))  # fmt: skip


def save_checkpoint(ckpt_dir: pathlib.Path, step: int, module: nn.Module, opt: torch.optim.Optimizer, objective: Any,
                    history: list[dict], cfg: TrainConfig, smooth: float | None = None) -> pathlib.Path:  # fmt: skip
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "dictionary.safetensors", module.state_dict())
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    if hasattr(objective, "state_dict"):
        save_tensors(tmp / "objective.safetensors", objective.state_dict())
    save_json(tmp / "trainer_state.json", {"step": step, "optimizer": opt_meta, "history": history, "smooth_loss": smooth,
                                           "config": asdict(cfg), **_configs(module, objective, cfg)})  # fmt: skip
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a directory rename is atomic: the checkpoint appears whole or not at all
    return final


def load_checkpoint(path: pathlib.Path, module: nn.Module, opt: torch.optim.Optimizer, objective: Any,
                    cfg: TrainConfig) -> tuple[int, list[dict], float | None]:  # fmt: skip
    state = load_json(path / "trainer_state.json")
    ours = _configs(module, objective, cfg)
    for key, want in ours.items():
        have = state.get(key)
        if have != want:
            both = isinstance(have, dict) and isinstance(want, dict)
            differ = ", ".join(sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))) if both else ""
            raise ValueError(f"{path} holds another run: its {key.replace('_', ' ')} is {have}, this run's is {want}"
                             + (f" (differs in: {differ})" if differ else "")
                             + ". Use another checkpoint_dir, or delete this one to start afresh")  # fmt: skip
    tensors = load_tensors(path / "dictionary.safetensors")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise ValueError(f"{path}: checkpoint tensors {got} do not match the module's {expected}")
    module.load_state_dict(tensors)
    opt.load_state_dict(_unflatten_optimizer(load_tensors(path / "optimizer.safetensors"), state["optimizer"]))
    if hasattr(objective, "load_state_dict") and (path / "objective.safetensors").exists():
        objective.load_state_dict(load_tensors(path / "objective.safetensors"))
    return int(state["step"]), list(state["history"]), state.get("smooth_loss")


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
