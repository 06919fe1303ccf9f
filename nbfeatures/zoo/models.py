"""The zoo's model shapes, training recipes and data streams, one entry per shipped model.

    tokfsm:  GPT-NeoX, 4 layers, 4 heads, d_model 128, d_ff 512, context 128 (the codebook paper's TokFSM shape)
    stories: GPT-2, 4 layers, 4 heads, d_model 128, d_ff 512, context 256, on the synthetic story corpus

One departure from the paper: the TokFSM model's rotary base is pi^(-4/3) instead of 10000, so its four
rotary frequencies are 1, 1.46, 2.14 and pi rad/token. The pi pair flips sign every token, which makes
"first or second digit of a state" (the parity of the distance to BOS) readable by attention. With the
default base the model has to infer that parity from content; measured on CPU here it then needs several
times more tokens to reach the same sampled-transition accuracy (0.60 vs 0.97 after 3.3M tokens).

Each batch is a pure function of (recipe seed, step), so a run is reproducible from its seed.

Dimension key: B batch, T position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..data.stories import StoryCorpus, story_tokenizer, vocabulary
from ..data.tokfsm import TokFSM


@dataclass(frozen=True)
class TrainConfig:
    """A nanoGPT-style recipe: AdamW, linear warmup then cosine decay to min_lr_ratio * lr."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of lr, not 0, so late steps still learn
    weight_decay: float = 0.0  # tiny models on synthetic data do not overfit; decay only slows memorisation
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0  # model init and data order

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0 and grad_clip > 0, "
                             f"got {self.warmup_steps}, {self.weight_decay}, {self.grad_clip}")  # fmt: skip

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


TOKFSM_ROPE_THETA = math.pi ** (-4 / 3)  # with 8 rotary dims: inv_freq = theta^(-k/4) = 1, 1.46, 2.14, pi


def tokfsm_model():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    fsm = TokFSM()
    config = GPTNeoXConfig(
        vocab_size=fsm.vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=fsm.seq_len,
        bos_token_id=fsm.special_id, eos_token_id=fsm.special_id, pad_token_id=fsm.special_id,
        rope_parameters={"rope_type": "default", "rope_theta": TOKFSM_ROPE_THETA, "partial_rotary_factor": 0.25},
    )  # fmt: skip
    # transformers 4.x reads the rotary settings from these older keys; written so the folder loads the same there.
    config.rotary_emb_base, config.rotary_pct = TOKFSM_ROPE_THETA, 0.25
    return GPTNeoXForCausalLM(config)


def stories_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(vocabulary()[0]), n_positions=256, n_embd=128, n_layer=4, n_head=4,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the grammar is an endless supply: no dropout
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class TokFSMStream:
    """Fresh FSM trajectories every step (the paper samples them on the fly too)."""

    def __init__(self, cfg: TrainConfig):
        self.fsm, self.cfg = TokFSM(), cfg

    def batch(self, step: int) -> Tensor:
        return self.fsm.sample(self.cfg.batch_size, seed=self.cfg.seed * 1_000_003 + step)


class StoriesStream:
    """Stories of StoryCorpus(seed=0) packed into one token stream (separated by the special token);
    a batch is B random windows of n_ctx tokens, nanoGPT style."""

    n_ctx = 256
    max_stories = 150_000  # about 15M tokens, a little more than a full run reads
    mean_story_tokens = 98

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # A short run (e.g. a test) only needs enough stories to fill its windows a few times over.
        wanted = 2 * cfg.steps * cfg.batch_size * self.n_ctx // self.mean_story_tokens + 64
        corpus = StoryCorpus(seed=0)
        self.stories = corpus.generate(min(self.max_stories, wanted))
        self.tokens = torch.tensor([t for ids in corpus.encode(self.stories) for t in ids[:-1]] + [0])

    def batch(self, step: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        starts = torch.randint(len(self.tokens) - self.n_ctx, (self.cfg.batch_size,), generator=gen)
        return torch.stack([self.tokens[s : s + self.n_ctx] for s in starts.tolist()])


@dataclass(frozen=True)
class Recipe:
    build: Callable  # () -> a fresh, randomly initialised transformers causal LM
    tokenizer: Callable  # () -> PreTrainedTokenizerFast
    stream: type  # (TrainConfig) -> object with .batch(step) -> ids [B, T]
    train: TrainConfig


RECIPES = {
    "tokfsm": Recipe(tokfsm_model, lambda: TokFSM().tokenizer(), TokFSMStream,
                     TrainConfig(steps=1200, batch_size=64, lr=3e-3, warmup_steps=100)),  # fmt: skip
    "stories": Recipe(stories_model, story_tokenizer, StoriesStream,
                      TrainConfig(steps=1000, batch_size=32, lr=3e-3, warmup_steps=100, weight_decay=0.1)),  # fmt: skip
}
