"""What every zoo artefact's card records about how it was made: machine, library versions, time, weights."""

from __future__ import annotations

import hashlib
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def run_info(threads: int) -> dict:
    """hardware (CPU, thread count), library versions and the creation time, for a model card."""
    import transformers

    return {
        "hardware": {"device": "cpu", "processor": platform.processor() or platform.machine(),
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
