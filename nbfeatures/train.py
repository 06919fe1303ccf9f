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
tensors, Adam's state and the objective's state as safetensors plus the step, history, smoothed loss, every
config and a fingerprint of the data (a hash of batch 0) as JSON. Resuming gives bit-for-bit the weights of an
uninterrupted run; resuming with another module, objective or training config is refused with a message naming
the difference, and so is resuming on other data unless asked for (`resume="must"`).

With `distributed=True` under torchrun each process trains on its rows of every batch and gradients are averaged
(`nbfeatures.distributed`); rank 0 writes the checkpoints while the others wait, and a checkpoint resumes on any
number of processes. `metrics_file` receives every history row as a line of JSON (rank 0 appends it), which a
notebook follows with `LiveCurves.follow`. `train_many` (in `train_many.py`) drives several modules over shared
batches through the same `_Run`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from ._checks import bool_arg, choice_arg, int_arg, real_arg
from ._io import atomic_folder, load_json, load_tensors, save_json, save_tensors
from .harvest import TensorSource, _ShardedTable

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
    checkpoint_dir: str | None = None  # where they go (see resume)
    seed: int = 0  # batch order
    # with a checkpoint_dir: "auto" resumes the latest checkpoint when module, objective, configs and data all match
    # (refusing it, naming the difference, otherwise); "must" refuses to start without one and may resume on other
    # data; "never" refuses a folder that already holds a checkpoint
    resume: Literal["auto", "never", "must"] = "auto"
    # join torchrun's process group (gloo on CPU, nccl on GPU) and train data-parallel: rank r takes rows r::world of
    # each batch; without a launcher (WORLD_SIZE unset or 1) one process, as in a notebook. See nbfeatures.distributed
    distributed: bool = False
    metrics_file: str | None = None  # every history row as a line of JSON, appended by rank 0 (a resume rewrites it)

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: store normalised values)
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("log_every", 1), ("checkpoint_every", 0), ("seed", 0)):
            put(name, int_arg("TrainConfig", name, getattr(self, name), minimum))
        if self.lr is not None:
            put("lr", real_arg("TrainConfig", "lr", self.lr, strict=True))
        if self.grad_clip is not None:
            put("grad_clip", real_arg("TrainConfig", "grad_clip", self.grad_clip, strict=True))
        put("adam_eps", real_arg("TrainConfig", "adam_eps", self.adam_eps, strict=True))
        put("weight_decay", real_arg("TrainConfig", "weight_decay", self.weight_decay))
        put("decay_fraction", real_arg("TrainConfig", "decay_fraction", self.decay_fraction, maximum=1.0))
        put("min_lr_ratio", real_arg("TrainConfig", "min_lr_ratio", self.min_lr_ratio, maximum=1.0))
        betas = self.adam_betas
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"TrainConfig: adam_betas must be two numbers in [0, 1), got {betas!r}")
        put("adam_betas", tuple(real_arg("TrainConfig", f"adam_betas[{i}]", b, maximum=1.0) for i, b in enumerate(betas)))
        if 1.0 in self.adam_betas:
            raise ValueError(f"TrainConfig: adam_betas must be two numbers in [0, 1), got {betas!r}")
        choice_arg("TrainConfig", "schedule", self.schedule, ("linear", "cosine"))
        choice_arg("TrainConfig", "resume", self.resume, ("auto", "never", "must"))
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not os.fspath(self.checkpoint_dir):
                raise ValueError(f"TrainConfig: checkpoint_dir must be a folder path (str or Path) or None, got {self.checkpoint_dir!r}")
            put("checkpoint_dir", os.fspath(self.checkpoint_dir))
        if self.metrics_file is not None:
            if not isinstance(self.metrics_file, (str, os.PathLike)) or not os.fspath(self.metrics_file):
                raise ValueError(f"TrainConfig: metrics_file must be a file path (str or Path) or None, got {self.metrics_file!r}")
            put("metrics_file", os.fspath(self.metrics_file))
        bool_arg("TrainConfig", "distributed", self.distributed)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        if self.resume != "auto" and not self.checkpoint_dir:
            raise ValueError(f"TrainConfig: resume={self.resume!r} needs a checkpoint_dir")


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
    _check_train_args(module, source, cfg, objective, callbacks, progress)
    comm = distributed.join(cfg.distributed, next(module.parameters()).device)
    local = distributed.shard(source, comm)  # this rank's rows of each batch
    run = _Run(module, objective, cfg, lambda: data_fingerprint(source), comm, data_parallel=comm.world > 1)
    try:
        metrics = distributed.MetricsFile.start(cfg.metrics_file, run.history) if comm.rank == 0 else None
        bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, disable=not progress or comm.rank > 0, desc=desc)
        for step in bar:
            extra = objective.before_step_(step) if hasattr(objective, "before_step_") else None
            row = run.step_(step, local.batch(step), extra)
            if row is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "fvu", "l0", "dead_fraction")})
                if metrics is not None:
                    metrics.append([row])
                for cb in callbacks:
                    cb(step + 1, row)
            if run.checkpoint_due(step + 1):
                run.save(step + 1)
        bar.close()
    finally:  # an interrupted run (an error, Ctrl-C) leaves the module in eval mode too
        run.close()
    if run.ckpt_dir is not None and run.start < cfg.steps:
        run.save(cfg.steps)
    return pd.DataFrame(run.history)


class _Run:
    """One module in training: its optimiser, objective, history and checkpoints, resumed when a checkpoint is there.
    `train` drives one over a source, `train_many` one per dictionary over shared batches; `label` (a dictionary's name)
    leads each of its history rows. With `data_parallel` the gradients are averaged over ranks, and rank 0 saves."""

    def __init__(self, module: nn.Module, objective: Any, cfg: TrainConfig, data: Callable[[], dict], comm: distributed.Comm,
                 data_parallel: bool = False, label: str | None = None):  # fmt: skip
        self.module, self.objective, self.cfg, self.comm, self.label = module, objective, cfg, comm, label
        self.shards = comm.world if data_parallel else 1  # processes sharing each batch
        base_lr = cfg.lr or getattr(getattr(module, "cfg", None), "default_lr", 1e-3)
        self.opt = _optimizer(module, objective, base_lr, cfg)
        self.start, self.history, self.smooth, self.data = 0, [], None, None
        self.ckpt_dir = pathlib.Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        if self.ckpt_dir is not None:
            if self.ckpt_dir.exists() and not self.ckpt_dir.is_dir():
                raise ValueError(f"TrainConfig: checkpoint_dir {self.ckpt_dir} is a file; it must be a folder (new or holding checkpoints)")
            latest = latest_checkpoint(self.ckpt_dir)
            if latest is not None and cfg.resume == "never":
                raise ValueError(f"{self.ckpt_dir} already holds a checkpoint ({latest.name}) and resume='never'; use another "
                                 f"checkpoint_dir, delete this one, or resume='auto' to continue it")  # fmt: skip
            if latest is None and cfg.resume == "must":
                raise ValueError(f"resume='must' but {self.ckpt_dir} holds no checkpoint (step_* folder) to resume")
            self.data = data()  # before anything steps: batch 0 as a fresh run sees it
            if latest is not None:
                self.start, self.history, self.smooth = load_checkpoint(latest, module, self.opt, objective, cfg, data=self.data)
        self.device = next(module.parameters()).device
        self.loss_fn, self._undo = objective, None
        if self.shards > 1:  # after the resume: DDP starts every rank from rank 0's state
            self.loss_fn, self._undo = distributed.data_parallel(module, objective)
        self.elapsed0 = self.history[-1]["elapsed_s"] if self.history else 0.0
        self.t0 = time.perf_counter()
        module.train()

    def step_(self, step: int, batch: Any, extra: dict | None = None) -> dict | None:
        """One optimiser step on `batch`; returns the history row when this step is logged."""
        cfg, opt, module, objective = self.cfg, self.opt, self.module, self.objective
        batch = _to(batch, self.device)
        first = batch[0] if isinstance(batch, tuple) else batch
        if isinstance(first, Tensor) and first.is_floating_point() and not torch.isfinite(first).all():
            raise ValueError(f"step {step}: the batch contains non-finite values (NaN or inf)")
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(cfg, step)
        loss, logs = self.loss_fn(batch)
        value = self.comm.mean(loss) if self.shards > 1 else loss.item()  # every rank stops together on a bad loss
        if not math.isfinite(value):
            raise ValueError(f"step {step}: loss is {value}; lower the learning rate or check the data")
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
        self.smooth = value if self.smooth is None else 0.98 * self.smooth + 0.02 * value
        if not (extra or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            return None
        logs = self.comm.mean_logs(logs) if self.shards > 1 else logs
        row = {"dictionary": self.label} if self.label is not None else {}
        row.update({"step": step + 1, "lr": opt.param_groups[0]["lr"], "tokens": (step + 1) * _batch_items(batch) * self.shards,
                    "elapsed_s": self.elapsed0 + time.perf_counter() - self.t0, "smooth_loss": self.smooth, **logs, **(extra or {})})  # fmt: skip
        self.history.append(row)
        return row

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.cfg.checkpoint_every) and step % self.cfg.checkpoint_every == 0 and step < self.cfg.steps

    def save(self, step: int) -> None:
        """Write the checkpoint at `step`: rank 0 for data-parallel runs while the others wait, else this process."""
        if self.shards == 1 or self.comm.rank == 0:
            save_checkpoint(self.ckpt_dir, step, self.module, self.opt, self.objective, self.history, self.cfg, self.smooth, self.data)
        if self.shards > 1:
            self.comm.barrier()

    def close(self) -> None:
        self.module.eval()
        if self._undo is not None:
            self._undo()
            self._undo = None


def train_sae(sae: nn.Module, source: Any, cfg: TrainConfig, objective: Objective | None = None,
              callbacks: Sequence[Callback] = (), progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """Train a dictionary on `source` (a [N, D] tensor, or anything with .batch(step)); returns the history.

    Without `objective`, the dictionary's own `default_objective()` (TopK: FVU + AuxK; ReLU: MSE + L1; ...)."""
    if not isinstance(sae, nn.Module):
        raise ValueError(f"train_sae: sae must be a dictionary module (TopKSAE, ReLUSAE, BinaryAE ...), got {type(sae).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"train_sae: cfg must be a TrainConfig, got {type(cfg).__name__}")
    d_in = getattr(getattr(sae, "cfg", None), "d_in", None)
    if objective is None:
        if not hasattr(sae, "default_objective"):
            raise ValueError(f"{type(sae).__name__} has no default objective; pass objective=...")
        objective = sae.default_objective()
        if hasattr(source, "batch") and not isinstance(source, Tensor):  # the default objective reads activations [N, d_in]
            _check_activations("train_sae: source.batch(0)", source.batch(0), d_in, check_finite=False)
    if isinstance(source, (Tensor, np.ndarray, _ShardedTable)):
        _check_activations("train_sae: source", source, d_in)
        source = TensorSource(source, cfg.batch_size, cfg.seed)
    elif not hasattr(source, "batch"):
        raise ValueError(f"train_sae: source must be activations [N, D] (a float tensor, a numpy array or a harvested "
                         f"cache[site]) or an object with .batch(step); got {type(source).__name__}")  # fmt: skip
    return train(sae, source, cfg, objective, callbacks, progress)


def _check_activations(what: str, acts: Any, d_in: int | None, check_finite: bool = True) -> None:
    """A float table [N, d_in] without NaN or inf (a harvested table is checked for shape and dtype only)."""
    shape = list(getattr(acts, "shape", []))
    dtype = acts.dtype if isinstance(acts, (Tensor, _ShardedTable)) else getattr(acts, "dtype", type(acts).__name__)
    if isinstance(dtype, torch.dtype):
        floating = dtype.is_floating_point
    else:
        floating = isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating)
    if not isinstance(acts, (Tensor, np.ndarray, _ShardedTable)) or len(shape) != 2 or not floating:
        raise ValueError(f"{what} must be a 2-D float table [N, D] of activations; got {type(acts).__name__} "
                         f"of shape {shape} and dtype {dtype}")  # fmt: skip
    if d_in is not None and shape[1] != d_in:
        raise ValueError(f"{what} has width {shape[1]} (shape {shape}) but the dictionary has d_in={d_in}; "
                         f"pass activations [N, {d_in}] or build the dictionary with d_in={shape[1]}")  # fmt: skip
    if check_finite and not isinstance(acts, _ShardedTable):
        table = torch.as_tensor(acts)
        bad = torch.cat([~torch.isfinite(chunk).all(1) for chunk in table.split(1 << 16)])  # chunks: no [N, D] mask
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise ValueError(f"{what} has non-finite values (NaN or inf) in {len(rows)} row(s) (first: row {int(rows[0])}); "
                             f"training needs finite activations: drop or fix those rows")  # fmt: skip


def _check_train_args(module: Any, source: Any, cfg: Any, objective: Any, callbacks: Any, progress: Any) -> None:
    if not isinstance(module, nn.Module) or not any(True for _ in module.parameters()):
        raise ValueError(f"train: module must be a torch nn.Module with parameters, got {type(module).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"train: cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not callable(getattr(source, "batch", None)):
        raise ValueError(f"train: source must have a .batch(step) method, got {type(source).__name__}")
    if not callable(objective):
        raise ValueError(f"train: objective must be callable (batch -> (loss, logs)), got {type(objective).__name__}")
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence) or not all(callable(c) for c in callbacks):
        raise ValueError(f"train: callbacks must be a list of functions (step, row) -> None, got {callbacks!r:.80}")
    bool_arg("train", "progress", progress)


def data_fingerprint(source: Any) -> dict:
    """What a resume checks the data against: the source's kind and length and a hash of batch 0's bytes."""
    batch = source.batch(0)
    parts = batch if isinstance(batch, tuple) else (batch,)
    digest, shapes = hashlib.sha256(), []
    for t in parts:
        if isinstance(t, Tensor):
            flat = t.detach().cpu().contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
            shapes.append(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}")
        else:
            digest.update(repr(t).encode())
            shapes.append(type(t).__name__)
    rows = getattr(source, "acts", None)
    return {"source": type(source).__name__, "rows": len(rows) if rows is not None else None,
            "batch_0": " ".join(shapes), "batch_0_sha256": digest.hexdigest()[:16]}  # fmt: skip


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
    # the fused kernel where it runs (floating tensors on CPU or CUDA; torch checks only at the first step): the default
    # one allocates [F, D] temporaries, 220 vs 38 ms a step at d_sae 32768 on 2 CPU threads
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=base_lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=0.0, fused=fused or None)


# ----------------------------------------------------------------------------- checkpoints

# fields that may differ between a run and the one it resumes: how long it runs, how often it logs or saves, and on how
# many processes (each process's rows make up the same global batch)
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "checkpoint_dir", "resume", "distributed", "metrics_file"}


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> pathlib.Path | None:
    """The complete checkpoint with the highest step (half-written ones are never named step_*)."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    steps = sorted((int(p.name.removeprefix("step_")), p) for p in ckpt_dir.glob("step_*") if p.name.removeprefix("step_").isdigit())
    return steps[-1][1] if steps else None


def _configs(module: nn.Module, objective: Any, cfg: TrainConfig) -> dict:
    """Everything a resume must agree on: the module's class and config, the objective's class and hyperparameters,
    and the training config (JSON round-tripped, so a loaded one compares equal)."""
    module_cfg = module.config_dict() if hasattr(module, "config_dict") else None
    objective_cfg = objective.config_dict() if hasattr(objective, "config_dict") else None
    train_cfg = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _RESUMABLE_CHANGES}
    return json.loads(json.dumps({"module": type(module).__name__, "module_config": module_cfg, "objective": type(objective).__name__,
                                  "objective_config": objective_cfg, "train_config": train_cfg}, default=str))  # fmt: skip


def save_checkpoint(ckpt_dir: pathlib.Path, step: int, module: nn.Module, opt: torch.optim.Optimizer, objective: Any,
                    history: list[dict], cfg: TrainConfig, smooth: float | None = None, data: dict | None = None) -> pathlib.Path:  # fmt: skip
    final = ckpt_dir / f"step_{step:08d}"
    with atomic_folder(final) as tmp:  # the checkpoint appears whole or not at all (never named step_* half-written)
        save_tensors(tmp / "dictionary.safetensors", module.state_dict())
        opt_tensors, opt_meta = _flatten_optimizer(opt)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        if hasattr(objective, "state_dict"):
            save_tensors(tmp / "objective.safetensors", objective.state_dict())
        save_json(tmp / "trainer_state.json", {"step": step, "optimizer": opt_meta, "history": history, "smooth_loss": smooth,
                                               "config": asdict(cfg), **_configs(module, objective, cfg), "data": data})  # fmt: skip
    return final


def load_checkpoint(path: pathlib.Path, module: nn.Module, opt: torch.optim.Optimizer, objective: Any,
                    cfg: TrainConfig, data: dict | None = None) -> tuple[int, list[dict], float | None]:  # fmt: skip
    """Restore a checkpoint into module, optimizer and objective after checking it belongs to this run: the same
    module, objective and training config, and (unless cfg.resume == "must") the same data fingerprint."""
    state = load_json(path / "trainer_state.json")
    if isinstance(state.get("step"), bool) or not isinstance(state.get("step"), int) or not isinstance(state.get("history"), list) \
            or not isinstance(state.get("optimizer"), dict):  # fmt: skip
        raise ValueError(f"{path}/trainer_state.json: not a checkpoint of this loop (needs an int step, a history list "
                         f"and the optimizer's groups)")  # fmt: skip
    ours = _configs(module, objective, cfg)
    # a checkpoint written before data fingerprints existed has none to compare
    if data is not None and state.get("data") is not None and cfg.resume != "must":
        ours["data"] = json.loads(json.dumps(data))
    for key, want in ours.items():
        have = state.get(key)
        if have != want:
            both = isinstance(have, dict) and isinstance(want, dict)
            differ = ", ".join(sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))) if both else ""
            advice = ("Pass TrainConfig(resume='must') to continue this run on the new data, use another checkpoint_dir, "
                      "or delete this one to start afresh") if key == "data" else "Use another checkpoint_dir, or delete this one to start afresh"  # fmt: skip
            raise ValueError(f"{path} holds another run: its {key.replace('_', ' ')} is {have}, this run's is {want}"
                             + (f" (differs in: {differ})" if differ else "") + f". {advice}")  # fmt: skip
    tensors = load_tensors(path / "dictionary.safetensors")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise ValueError(f"{path}: checkpoint tensors {got} do not match the module's {expected}")
    # read every file before touching anything, and put the module back if a state does not fit: a refused resume
    # leaves the module as it was
    opt_file = path / "optimizer.safetensors"
    opt_state = _unflatten_optimizer(load_tensors(opt_file), state["optimizer"])
    for saved, group in zip(opt_state.get("param_groups", []), opt.param_groups):
        saved["fused"] = group.get("fused")  # a compute setting: a checkpoint from before fused AdamW keeps it fast
    has_objective_state = hasattr(objective, "load_state_dict") and (path / "objective.safetensors").exists()
    objective_state = load_tensors(path / "objective.safetensors") if has_objective_state else None
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        module.load_state_dict(tensors)
        opt.load_state_dict(opt_state)
        if objective_state is not None:
            objective.load_state_dict(objective_state)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        module.load_state_dict(before)
        raise ValueError(f"{opt_file}: the optimizer or objective state does not fit this run: {e}") from None
    return state["step"], list(state["history"]), state.get("smooth_loss")


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
