"""The zoo's base models: shapes, data streams, objectives and training configs, one recipe per shipped model.

    tokfsm:   GPT-NeoX, 4 layers, 4 heads, d_model 128, d_ff 512, context 128 (the codebook paper's TokFSM shape)
    stories:  GPT-2, 4 layers, 4 heads, d_model 128, d_ff 512, context 256, on the synthetic story corpus
    counting: GPT-2, 2 layers, 1 head, d_model 64 (InversionView's counting task, the reference's shape)

All three train on the shared loop (`nbfeatures.train.train`) nanoGPT-style: AdamW, warm-up then cosine to 0.1 x lr,
gradient clipping at 1, next-token cross-entropy (counting: its own loss, below).

The counting loss is the cross-entropy of the count digit at ':', plus (weight COUNTING_AUX) at every letter the
running count of that letter so far. The reference trains on the count alone; with that loss alone this model sat
on the uniform-guess plateau (loss 1.98, accuracy 0.19) for a whole 2000-step CPU run, and the dense auxiliary
target teaches the layer-0 "attend to the same letter" head it needs within the budget.

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
import torch.nn.functional as F
from torch import Tensor

from ..data.counting import Counting
from ..data.stories import StoryCorpus, story_tokenizer, vocabulary
from ..data.tokfsm import TokFSM
from ..train import TrainConfig


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


def counting_model(task: Counting | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    task = task or Counting()
    config = GPT2Config(vocab_size=task.vocab_size, n_positions=task.seq_len, n_embd=64, n_layer=2, n_head=1, n_inner=256,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


class CountingStream:
    """Fresh counting inputs every step, seeded by (seed, step): (ids [B, T], colon position [B], count [B])."""

    def __init__(self, cfg: TrainConfig, task: Counting | None = None):
        self.cfg, self.task = cfg, task or Counting()

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.task.sample(self.cfg.batch_size, seed=self.cfg.seed * 1_000_003 + step)


def running_counts(ids_BT: Tensor, task: Counting) -> Tensor:
    """Labels [B, T]: at each letter, the digit of how often that letter has occurred up to here; -100 elsewhere."""
    letters = (ids_BT >= 1) & (ids_BT <= task.n_letters)
    bar_seen = (ids_BT == task.bar_id).long().cumsum(1) > 0
    letters &= ~bar_seen  # the target letter after '|' is not counted
    onehot = F.one_hot(ids_BT, task.vocab_size) * letters[..., None]
    counts = onehot.cumsum(1).gather(-1, ids_BT[..., None])[..., 0]
    return torch.where(letters, task.digit_id(counts.clamp(max=9)), torch.full_like(ids_BT, -100))


COUNTING_AUX = 0.5  # weight of the running-count loss at the letters


class CountingObjective:
    """CE of the count digit at ':' + aux * CE of the running count at every letter."""

    def __init__(self, model, task: Counting | None = None, aux: float = COUNTING_AUX):
        self.model, self.task, self.aux = model, task or Counting(), aux

    def __call__(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids_BT, colon_B, count_B = batch
        logits_BTV = self.model(ids_BT, attention_mask=torch.ones_like(ids_BT)).logits
        main = F.cross_entropy(logits_BTV[torch.arange(len(ids_BT)), colon_B], self.task.digit_id(count_B))
        aux = F.cross_entropy(logits_BTV.flatten(0, 1), running_counts(ids_BT, self.task).flatten(), ignore_index=-100)
        loss = main + self.aux * aux
        return loss, {"loss": loss.item(), "count_loss": main.item()}

    def config_dict(self) -> dict:
        return {"aux": self.aux}


class NextTokenObjective:
    """Next-token cross-entropy of a transformers causal LM on token batches [B, T]."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids_BT: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = self.model(ids_BT, attention_mask=torch.ones_like(ids_BT), labels=ids_BT).loss  # HF shifts labels inside
        return loss, {"loss": loss.item()}


def _lm_config(steps: int, batch_size: int, lr: float, weight_decay: float = 0.0) -> TrainConfig:
    # nanoGPT-style: beta2 0.99, warm-up 100 steps, cosine to 0.1 x lr; tiny models on synthetic data do not overfit,
    # so weight decay only slows memorisation (stories keeps a little)
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, adam_betas=(0.9, 0.99), adam_eps=1e-8, weight_decay=weight_decay,
                       schedule="cosine", warmup_steps=100, min_lr_ratio=0.1, grad_clip=1.0, log_every=25)  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    build: Callable  # () -> a fresh, randomly initialised transformers causal LM
    tokenizer: Callable  # () -> PreTrainedTokenizerFast
    stream: type  # (TrainConfig) -> object with .batch(step)
    objective: Callable  # (model) -> the objective the shared loop optimises
    train: TrainConfig


RECIPES = {
    "tokfsm": Recipe(tokfsm_model, lambda: TokFSM().tokenizer(), TokFSMStream, NextTokenObjective, _lm_config(1200, 64, 3e-3)),
    "stories": Recipe(stories_model, story_tokenizer, StoriesStream, NextTokenObjective, _lm_config(1000, 32, 3e-3, weight_decay=0.1)),
    "counting": Recipe(counting_model, lambda: Counting().tokenizer(), CountingStream, CountingObjective, _lm_config(10000, 64, 3e-3)),
}
