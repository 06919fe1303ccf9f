"""Teach SAELens our own architectures, so `sae_lens.SAE.load_from_disk` reads their folders.

TopK and ReLU SAEs are SAELens's own `topk` and `standard` and need nothing. Without this,
SAELens meets `architecture: "nbfeatures.binary"` with a KeyError rather than silently wrong math.
"""

from __future__ import annotations

from dataclasses import dataclass


def register_with_saelens() -> None:
    """Register 'nbfeatures.binary' with SAELens (idempotent; needs `pip install nbfeatures[saelens]`)."""
    import torch
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    if "nbfeatures.binary" in SAE_CLASS_REGISTRY:
        return

    @dataclass
    class BinarySAEConfig(StandardSAEConfig):
        estimator: str = "reference"

        @classmethod
        def architecture(cls) -> str:
            return "nbfeatures.binary"

    class BinarySAE(StandardSAE):
        """h = 1[x W_enc + b_enc > 0]; decode as the standard SAE."""

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
            return self.hook_sae_acts_post((pre > 0).to(pre.dtype))

    register_sae_class("nbfeatures.binary", BinarySAE, BinarySAEConfig)
