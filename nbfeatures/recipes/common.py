"""What every recipe shares: its command line, and the card each zoo folder carries (how it was made).

A card records the recipe's configs, the exact command as run, wall time, machine, library versions, the weights'
size and sha256 where there is one file of weights, a thinned loss curve and what the recipe measured.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from .._io import save_json


def parser(doc: str, *, steps: bool = True) -> argparse.ArgumentParser:
    """The flags every recipe takes: --out, --threads, --no-progress (and --steps, which overrides the recipe's)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped zoo folder)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    if steps:
        p.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, set the thread count, and remember the command as run (for the card)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else p.prog
    args.command = " ".join(["python -m", module if module.startswith("nbfeatures.") else p.prog, *argv])
    return args


def run_info(threads: int, device: str = "cpu") -> dict:
    """hardware (device, CPU, thread count; the GPU's name on CUDA), library versions and the creation time, for a card."""
    import transformers

    gpu = {"gpu": torch.cuda.get_device_name(torch.device(device))} if torch.device(device).type == "cuda" else {}
    return {
        "hardware": {"device": str(device), **gpu, "processor": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "torch_threads": threads},  # fmt: skip
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def weights_info(model: torch.nn.Module, weights: Path) -> dict:
    """architecture, parameter count, and the size and sha256 of the weights file as written."""
    return {
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def loss_curve(history: Sequence[dict], key: str = "smooth_loss", every: int = 4) -> list[tuple[int, float]]:
    return [(int(r["step"]), round(float(r[key]), 4)) for r in list(history)[::every]]


def write_card(folder: Path, args: argparse.Namespace, wall_s: float, **card: Any) -> dict:
    """card.json in `folder`: the given fields, then wall time, machine, versions, and the command as run."""
    card = {**card, "wall_time_s": round(wall_s, 1), **run_info(args.threads, getattr(args, "device", "cpu")), "command": args.command}
    save_json(Path(folder) / "card.json", card)
    return card
