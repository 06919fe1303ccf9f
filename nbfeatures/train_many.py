"""Many dictionaries from one model pass: each token batch is read once, at every site a dictionary needs, and every
dictionary takes its step on its own site's activations (SAELens' MultiSAETrainingRunner, sparsify's hookpoints).

    history = train_many(model, tokens, {"res1": ("blocks.1.hook_resid_post", sae1),
                                         "res2": ("blocks.2.hook_resid_post", sae2, TopKObjective(sae2))}, cfg)

Step s takes token batch s (cfg.batch_size sequences, drawn as TokenSource draws them), runs one forward pass stopped
after the deepest site (`sites.read_acts`), drops each sequence's first position (as `harvest` does) and hands each
dictionary its site's activations [batch_size * (T - 1), D]: each trains exactly as `train_sae` would on the
activations harvested from the same token batches. Checkpoints go to cfg.checkpoint_dir / name / step_*, and each
dictionary resumes from its own latest one. The history has one row per dictionary and logged step, its name in the
`dictionary` column (callbacks get the same rows; LiveCurves draws a line per dictionary from them).

Distributed (`TrainConfig(distributed=True)` under torchrun), `shard` says what the processes split:
    "data"          every rank trains every dictionary on sequences r::world of each token batch, gradients averaged
                    (as in `train`); rank 0 writes the checkpoints
    "dictionaries"  rank r owns dictionaries r::world (in the mapping's order), reads whole batches up to its own
                    deepest site and trains and checkpoints only its own; at the end every dictionary is copied from
                    its owner to every rank. Activations are computed, not all-gathered: the simple choice when the
                    model is small next to the dictionaries
Either way every rank gets every history row, and rank 0 writes the metrics file.

Dimension key: B sequences, T positions, N tokens (B * (T - 1)), D width at a site.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from typing import Any, Literal, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from . import sites as _sites
from ._checks import bool_arg, choice_arg
from .harvest import TokenSource
from .train import Callback, TrainConfig, _check_activations, _Run, data_fingerprint


def train_many(model: _sites.Model, tokens: Any, dictionaries: Mapping[str, tuple], cfg: TrainConfig, *,
               callbacks: Sequence[Callback] = (), progress: bool = True, drop_first: bool = True,
               shard: Literal["data", "dictionaries"] = "data") -> pd.DataFrame:  # fmt: skip
    """Train every dictionary of {name: (site, dictionary[, objective])} on one pass per token batch of `tokens`
    (an integer tensor [N, T], or anything whose .batch(step) gives one [B, T]); returns the history of them all."""
    specs = _check_args(model, dictionaries, cfg, callbacks, progress, drop_first, shard)
    names = list(specs)
    comm = distributed.join(cfg.distributed, next(specs[names[0]][1].parameters()).device)
    split_data = shard == "data" and comm.world > 1
    if split_data and cfg.batch_size % comm.world:
        raise ValueError(f"train_many: batch_size={cfg.batch_size} sequences do not split evenly over {comm.world} processes; "
                         f"use a multiple of {comm.world}")  # fmt: skip
    has_batch = callable(getattr(tokens, "batch", None)) and not isinstance(tokens, Tensor)
    source = tokens if has_batch else TokenSource(tokens, cfg.batch_size, cfg.seed)
    reader = distributed.shard(source, comm) if split_data else source
    mine = names if shard == "data" else names[comm.rank::comm.world]
    tokens_fingerprint = functools.cache(lambda: data_fingerprint(source))

    def fingerprint(site: str) -> dict:  # what a resume checks: the token batches, and which activations of them
        return {**tokens_fingerprint(), "site": site, "drop_first": drop_first}

    runs: dict[str, _Run] = {}
    try:
        for name in mine:
            site, module, objective = specs[name]
            run_cfg = dataclasses.replace(cfg, checkpoint_dir=str(pathlib.Path(cfg.checkpoint_dir) / name)) if cfg.checkpoint_dir else cfg
            runs[name] = _Run(module, objective, run_cfg, functools.partial(fingerprint, site), comm, split_data, label=name)
        gather = comm.gather if shard == "dictionaries" else list  # rows that only the owner has
        rows = gather([r for run in runs.values() for r in run.history])
        metrics = distributed.MetricsFile.start(cfg.metrics_file, rows) if comm.rank == 0 else None
        start = min(gather([min((run.start for run in runs.values()), default=cfg.steps)]))
        pending: list[dict] = []
        for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or comm.rank > 0, desc="train_many"):
            active = [name for name, run in runs.items() if run.start <= step]
            if active:
                acts = _read(model, reader.batch(step), [specs[name][0] for name in active], drop_first)
            for name in active:
                site, module, objective = specs[name]
                d_in = getattr(getattr(module, "cfg", None), "d_in", None)
                _check_activations(f"train_many: {name}: the activations at {site}", acts[site], d_in, check_finite=False)
                extra = objective.before_step_(step) if hasattr(objective, "before_step_") else None
                row = runs[name].step_(step, acts[site], extra)
                if row is not None:
                    pending.append(row)
            if shard == "data" or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:  # every rank gathers here
                new, pending = gather(pending), []
                rows += new
                if metrics is not None and new:
                    metrics.append(new)
                for row in new:
                    for cb in callbacks:
                        cb(row["step"], row)
            for name in active:
                if runs[name].checkpoint_due(step + 1):
                    runs[name].save(step + 1)
    finally:  # an interrupted run leaves every dictionary in eval mode
        for run in runs.values():
            run.close()
    for run in runs.values():
        if run.ckpt_dir is not None and run.start < cfg.steps:
            run.save(cfg.steps)
    if shard == "dictionaries":
        for i, name in enumerate(names):
            comm.broadcast_module_(specs[name][1], src=i % comm.world)
    order = {name: i for i, name in enumerate(names)}
    return pd.DataFrame(sorted(rows, key=lambda r: order[r["dictionary"]]))  # a stable sort: each one's rows in step order


def _read(model: _sites.Model, ids: Tensor, sites: list[str], drop_first: bool) -> dict[str, Tensor]:
    """Activations [N, D] at each site from one forward pass, real tokens in harvest's order (and its inputs)."""
    acts = _sites.read_acts(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, list(dict.fromkeys(sites)))
    return {site: a[:, int(drop_first):].flatten(2).flatten(0, 1) for site, a in acts.items()}


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_args(model: Any, dictionaries: Any, cfg: Any, callbacks: Any, progress: Any, drop_first: Any,
                shard: Any) -> dict[str, tuple[str, nn.Module, Any]]:  # fmt: skip
    """name -> (site, dictionary, objective), the default objective filled in; every problem named."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"train_many: cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(dictionaries, Mapping) or not dictionaries:
        raise ValueError("train_many: dictionaries must be a non-empty dict {name: (site, dictionary)} or "
                         f"{{name: (site, dictionary, objective)}}; got {dictionaries!r:.80}")  # fmt: skip
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence) or not all(callable(c) for c in callbacks):
        raise ValueError(f"train_many: callbacks must be a list of functions (step, row) -> None, got {callbacks!r:.80}")
    bool_arg("train_many", "progress", progress)
    bool_arg("train_many", "drop_first", drop_first)
    choice_arg("train_many", "shard", shard, ("data", "dictionaries"))
    specs, seen = {}, {}
    for name, spec in dictionaries.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"train_many: dictionary name {name!r} must be a folder name (letters, digits, '.', '_', '-'; "
                             f"not starting with '.' or '-'): checkpoints go to checkpoint_dir/<name>")  # fmt: skip
        if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
            raise ValueError(f"train_many: {name!r} must map to (site, dictionary) or (site, dictionary, objective), got {spec!r:.80}")
        site, module, objective = (*spec, None) if len(spec) == 2 else spec
        if not isinstance(site, str):
            raise ValueError(f"train_many: {name!r}: the site must be a site name (str), got {site!r}")
        _sites.resolve(model, site)  # a bad site fails before any work, naming what is allowed
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters()):
            raise ValueError(f"train_many: {name!r}: the dictionary must be a module with parameters (TopKSAE, ReLUSAE ...), "
                             f"got {type(module).__name__}")  # fmt: skip
        if id(module) in seen:
            raise ValueError(f"train_many: {name!r} and {seen[id(module)]!r} are the same dictionary; each name needs its own")
        seen[id(module)] = name
        if objective is None:
            if not hasattr(module, "default_objective"):
                raise ValueError(f"train_many: {name!r}: {type(module).__name__} has no default objective; pass (site, dictionary, objective)")
            objective = module.default_objective()
        elif not callable(objective):
            raise ValueError(f"train_many: {name!r}: the objective must be callable (batch -> (loss, logs)), got {type(objective).__name__}")
        specs[name] = (site, module, objective)
    return specs
