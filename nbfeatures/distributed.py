"""Multi-process training under torchrun: the process group, data parallelism, rank shards, global dead-latent counts,
and the metrics file another process follows.

    torchrun --standalone --nproc-per-node 2 -m nbfeatures.recipes.train_distributed --steps 50 --out runs/demo

`TrainConfig(distributed=True)` is the opt-in. Each process then joins the process group that torchrun describes in
its environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or one already initialised: gloo when the
module is on the CPU, nccl on a GPU (the script puts rank r on cuda:LOCAL_RANK). Without a launcher (WORLD_SIZE unset
or 1) the same script trains in one process. A notebook kernel cannot host torchrun: it launches the command and
follows the run's metrics file (`TrainConfig.metrics_file`, JSON lines appended by rank 0) with `LiveCurves.follow`.

Data parallel: rank r trains on rows r::world of every global batch of `batch_size` rows, and DistributedDataParallel
averages the gradients. An objective whose loss is a mean over rows (MSE, L1: ReLU SAEs) then takes the step one
process takes with the whole batch (to float rounding, ~1e-7). FVU (TopK, BatchTopK) divides by the batch's own
variance, so each rank's FVU has its own denominator: close to the one-process step, not equal (sparsify does the
same; measured: FVU 0.3905 against 0.3896 after 100 steps of 2 x 256 rows). Everything after the step stays identical
on every rank: the averaged gradients are, so the decoder renormalisation is; dead-latent counts are made global (a
latent fired if it fired on any rank, and every rank's tokens count), so AuxK picks the same dead latents everywhere,
the ones one process would pick; module buffers follow rank 0 (DDP broadcasts them at each step).

Dimension key: F latents.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._io import write_atomic
from .harvest import TensorSource


@dataclass(frozen=True)
class Comm:
    """This process's place in the group (rank 0 of 1 when training alone) and the few collectives training needs."""

    rank: int = 0
    world: int = 1

    def mean(self, value: Tensor) -> float:
        """The mean of a scalar over ranks (every rank gets it)."""
        if self.world == 1:
            return value.item()
        t = value.detach().float().reshape(1).clone()
        dist.all_reduce(t)
        return t.item() / self.world

    def mean_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Each logged number averaged over the ranks that logged it (in the first rank's key order)."""
        if self.world == 1:
            return logs
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, logs)
        keys = list(dict.fromkeys(k for part in everyone for k in part))
        return {k: sum(p[k] for p in everyone if k in p) / sum(k in p for p in everyone) for k in keys}

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (every rank gets it)."""
        if self.world == 1:
            return list(items)
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, items)
        return [x for part in everyone for x in part]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_module_(self, module: nn.Module, src: int) -> None:
        """Copy rank `src`'s parameters and buffers into `module` on every rank."""
        if self.world > 1:
            for t in module.state_dict().values():
                dist.broadcast(t, src)


LOCAL = Comm()


def join(enabled: bool, device: torch.device) -> Comm:
    """The process group to train in: torchrun's (joined here) or one already initialised when `enabled`, else none."""
    if not enabled:
        return LOCAL
    if not dist.is_available():
        raise ValueError("TrainConfig(distributed=True): this torch build has no torch.distributed; use distributed=False")
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return LOCAL  # no launcher: one process, as in a notebook
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env://: the variables torchrun sets
    return Comm(dist.get_rank(), dist.get_world_size())


def shard(source: Any, comm: Comm) -> Any:
    """The rows of each global batch this rank trains on: rows r::world (a TensorSource reads only those)."""
    if comm.world == 1:
        return source
    if type(source) is TensorSource:
        return TensorSource(source.acts, source.batch_size, source.seed, rank=comm.rank, world=comm.world)
    return _RankRows(source, comm)


class _RankRows:
    """Rows r::world of every batch of a source (a tensor, a tuple of tensors or a dict of them)."""

    def __init__(self, source: Any, comm: Comm):
        self.source, self.comm = source, comm

    def batch(self, step: int) -> Any:
        return self._slice(self.source.batch(step))

    def _slice(self, b: Any) -> Any:
        r, w = self.comm.rank, self.comm.world
        if isinstance(b, Tensor):
            if len(b) % w:
                raise ValueError(f"a batch of {len(b)} rows does not split evenly over {w} processes; use a batch_size "
                                 f"divisible by {w}")  # fmt: skip
            return b[r::w]
        if isinstance(b, tuple):
            parts = [self._slice(x) for x in b]
            return type(b)(*parts) if hasattr(b, "_fields") else tuple(parts)
        if isinstance(b, dict):
            return {k: self._slice(v) for k, v in b.items()}
        raise ValueError(f"distributed training splits each batch by rows; a batch of type {type(b).__name__} cannot be split")


class _Objective(nn.Module):
    """DDP wraps a module's forward, and objectives call the dictionary's methods directly (encode_topk, decode_sparse):
    so the objective is made the forward of a module that holds the dictionary."""

    def __init__(self, module: nn.Module, objective: Callable):
        super().__init__()
        self.module = module
        self.__dict__["objective"] = objective  # not registered: an objective that is a module keeps its own parameters

    def forward(self, batch: Any) -> Any:
        return self.objective(batch)


class GlobalFiring:
    """A dead-latent tracker whose counts are global: a latent fired if it fired on any rank, and every rank's tokens
    count, so every rank keeps the same dead set as one process with the whole batch would."""

    def __init__(self, inner: Any):
        self.inner = inner

    @torch.no_grad()
    def update(self, fired_F: Tensor, n_tokens: int) -> Tensor:
        fired = fired_F.to(device=_comm_device(), dtype=torch.int32)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        return self.inner.update(fired.bool().to(fired_F.device), self._total(n_tokens))

    def dying(self, n_tokens: int) -> Tensor:
        """The latents this step leaves dead unless they fire (TopK's blocked AuxK), counting every rank's tokens."""
        return self.inner.dying(self._total(n_tokens))

    def _total(self, n_tokens: int) -> int:
        n = torch.tensor([int(n_tokens)], dtype=torch.long, device=_comm_device())
        dist.all_reduce(n)
        return int(n.item())

    # state_dict, load_state_dict, dead_tokens ... are the tracker's own; a new method that takes a token count needs
    # its global twin above, as update and dying have
    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _comm_device() -> torch.device:
    """Where collectives take their tensors: nccl on this process's GPU, gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def data_parallel(module: nn.Module, objective: Callable) -> tuple[Callable, Callable[[], None]]:
    """(loss function batch -> (loss, logs) whose backward averages gradients over ranks, undo) for DDP training.

    The objective's dead-latent tracker (`objective.firing`) counts globally until `undo()` puts the original back."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    # DDP copies rank 0's parameters and buffers to every rank here: a resumed or differently seeded rank starts equal
    ddp = DistributedDataParallel(_Objective(module, objective), device_ids=[device] if device.type == "cuda" else None)
    firing = getattr(objective, "firing", None)
    if firing is not None and callable(getattr(firing, "update", None)) and not isinstance(firing, GlobalFiring):
        objective.firing = GlobalFiring(firing)

    def undo() -> None:
        if isinstance(getattr(objective, "firing", None), GlobalFiring):
            objective.firing = objective.firing.inner

    return ddp, undo


class MetricsFile:
    """History rows as lines of JSON, for a process that follows the run (LiveCurves.follow). Each append is one
    write to a file opened for appending; a reader takes only whole lines, so it never sees half a row."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    @classmethod
    def start(cls, path: str | os.PathLike | None, rows: Sequence[dict]) -> "MetricsFile | None":
        """The file as the run stands: the rows of its checkpoint's history (none for a fresh run), written whole."""
        if path is None:
            return None
        write_atomic(path, _json_lines(rows))
        return cls(path)

    def append(self, rows: Sequence[dict]) -> None:
        data = _json_lines(rows)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)


def _json_lines(rows: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r, default=float) + "\n" for r in rows).encode()
