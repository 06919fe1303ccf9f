"""Attention probabilities as a site: an identity module each attention's probabilities pass through.

transformers computes attention through its attention interface; while `patterns_on(model)` is active the model's own
eager attention runs instead, its probabilities [B, H, T, S] go through `attn.nbf_hook_pattern` (an nn.Identity
that `attach_pattern_modules` adds), and an edited pattern is multiplied by the values again. Pure torch.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

PATTERN_MODULE = "nbf_hook_pattern"  # the nn.Identity added to each attention module
PATTERN_IMPL = "nbf_pattern"


def attach_pattern_modules(attention_modules) -> None:
    """Give each attention module an nn.Identity that its probabilities pass through (once)."""
    for attn in attention_modules:
        if not hasattr(attn, PATTERN_MODULE):
            attn.add_module(PATTERN_MODULE, nn.Identity())


def _pattern_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """The model's own eager attention, with its probabilities [B, H, T, S] passed through `module.nbf_hook_pattern`;
    when that returns another tensor (an edit), the output is recomputed from it."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, probs = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    seen = getattr(module, PATTERN_MODULE)(probs)
    if seen is probs:
        return out, probs
    v = value if value.shape[1] == seen.shape[1] else value.repeat_interleave(seen.shape[1] // value.shape[1], dim=1)
    return torch.matmul(seen.to(v.dtype), v).transpose(1, 2).contiguous(), seen


class patterns_on:
    """Within this block the model's attention runs through `_pattern_attention` (eager, probabilities exposed)."""

    def __init__(self, module: nn.Module):
        self.config = module.config
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(PATTERN_IMPL, _pattern_attention)
        AttentionMaskInterface.register(PATTERN_IMPL, eager_mask)

    def __enter__(self):
        self.before = self.config._attn_implementation
        self.config._attn_implementation = PATTERN_IMPL
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.before
        return False
