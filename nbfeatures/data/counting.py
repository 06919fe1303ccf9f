"""Character counting: the toy task of InversionView's first case study (Huang et al. 2024, §4).

    input  = BOS + a few distinct letters, each repeated 1..max_count times, shuffled + "|" + c + ":"
    target = the number of times letter c occurs, one digit token after ":"      e.g. "<s>abbacb|b:3"

A model has to find the earlier copies of c and count them; InversionView found that a 2-layer, 1-head
model computes the count at the target letter and that the second layer's head copies it to ":"
without the letter's identity. Sequences are right-padded with the special token (also BOS and EOS),
so a causal model's activations at real positions do not depend on the padding.

Dimension key: B batch, T position.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._checks import as_ids, as_int

SPECIAL = "<s>"  # BOS, EOS and PAD


@dataclass(frozen=True)
class Counting:
    """Inputs over `n_letters` letters a, b, c...; `n_distinct` letters per input, each 1..max_count times."""

    n_letters: int = 12
    n_distinct: int = 3
    max_count: int = 9  # counts are written as one digit token

    def __post_init__(self):
        for name in ("n_letters", "n_distinct", "max_count"):
            as_int(name, getattr(self, name), 1)
        if not 1 <= self.n_letters <= 26:
            raise ValueError(f"n_letters must be in [1, 26], got {self.n_letters}")
        if not 1 <= self.n_distinct <= self.n_letters:
            raise ValueError(f"n_distinct must be in [1, n_letters={self.n_letters}], got {self.n_distinct}")
        if not 1 <= self.max_count <= 9:
            raise ValueError(f"max_count must be in [1, 9] (one digit), got {self.max_count}")

    # ------------------------------------------------------------- vocabulary
    @property
    def letters(self) -> str:
        return string.ascii_lowercase[: self.n_letters]

    @property
    def vocab(self) -> list[str]:
        """Token strings by id: special, letters, '|', ':', digits 0-9."""
        return [SPECIAL, *self.letters, "|", ":", *"0123456789"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_id(self) -> int:
        return 0

    @property
    def bar_id(self) -> int:
        return self.n_letters + 1

    @property
    def colon_id(self) -> int:
        return self.n_letters + 2

    def digit_id(self, d) -> Tensor | int:
        """The token id of digit d (an int or an integer tensor of digits 0..9)."""
        lo, hi = (int(d.min()), int(d.max())) if isinstance(d, Tensor) and d.numel() else (d, d) if isinstance(d, int) else (0, 0)
        if not 0 <= lo <= hi <= 9:
            raise ValueError(f"d must be a digit in [0, 9], got {d!r:.40}")
        return d + self.n_letters + 3

    @property
    def seq_len(self) -> int:
        """Longest sequence: BOS, the letters, '|', c, ':', the count, EOS."""
        return 1 + self.n_distinct * self.max_count + 5

    # ------------------------------------------------------------- sampling
    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [n, seq_len] right-padded, colon position [n], count [n]); ids end with the count and EOS."""
        n, seed = as_int("n", n, 1), as_int("seed", seed, 0)
        rng = np.random.default_rng(seed)
        ids = torch.full((n, self.seq_len), self.special_id, dtype=torch.long)
        colon, count = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        for b in range(n):
            chosen = rng.choice(self.n_letters, size=self.n_distinct, replace=False)
            reps = rng.integers(1, self.max_count + 1, size=self.n_distinct)
            body = rng.permutation(np.repeat(chosen, reps)) + 1
            target = rng.integers(self.n_distinct)
            row = [self.special_id, *body.tolist(), self.bar_id, int(chosen[target]) + 1, self.colon_id,
                   int(self.digit_id(int(reps[target]))), self.special_id]  # fmt: skip
            ids[b, : len(row)] = torch.tensor(row)
            colon[b], count[b] = len(row) - 3, int(reps[target])
        return ids, colon, count

    # ------------------------------------------------------------- reading sequences
    def text(self, ids) -> str:
        """One sequence as text, padding and EOS dropped: '<s>abbacb|b:3'."""
        ids = self._ids(ids)
        end = next((i for i, t in enumerate(ids[1:], 1) if t == self.special_id), len(ids))
        return "".join(self.vocab[t] for t in ids[:end])

    def parse(self, ids) -> dict | None:
        """The parts of a well-formed sequence ({'letters', 'target', 'count', 'true_count', 'colon'}), else None.

        `count` is the digit written after ':' (None if absent); `true_count` counts the target in the letters.
        Ids outside the vocabulary make a sequence ill-formed (None), as a model with a padded vocabulary may emit them.
        """
        ids = self._ids(ids, checked=False)
        if not ids or ids[0] != self.special_id or not all(0 <= t < self.vocab_size for t in ids):
            return None
        end = next((i for i, t in enumerate(ids[1:], 1) if t == self.special_id), len(ids))
        body = ids[1:end]
        if body.count(self.bar_id) != 1:
            return None
        bar = body.index(self.bar_id)
        letters, tail = body[:bar], body[bar + 1 :]
        if not letters or any(not 1 <= t <= self.n_letters for t in letters):
            return None
        if len(tail) < 2 or not 1 <= tail[0] <= self.n_letters or tail[1] != self.colon_id:
            return None
        digit = tail[2] - self.digit_id(0) if len(tail) > 2 and tail[2] >= self.digit_id(0) else None
        return {"letters": "".join(self.vocab[t] for t in letters), "target": self.vocab[tail[0]],
                "count": digit, "true_count": letters.count(tail[0]), "colon": bar + 3}  # fmt: skip

    def _ids(self, ids, checked: bool = True) -> list[int]:
        t = as_ids("ids", ids, self.vocab_size if checked else None)
        if t.dim() != 1:
            raise ValueError(f"ids must be one sequence [T], got shape {list(t.shape)}")
        return t.tolist()

    def tokenizer(self):
        """A PreTrainedTokenizerFast: one token per character, BOS prepended, decode joins characters."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(self.vocab)}, unk_token=SPECIAL))
        tok.add_special_tokens([SPECIAL])
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A $B",
                                                           special_tokens=[(SPECIAL, self.special_id)])  # fmt: skip
        tok.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
                                       unk_token=SPECIAL, model_max_length=self.seq_len)  # fmt: skip


def count_accuracy(logits_fn, task: Counting | None = None, n: int = 512, seed: int = 1) -> float:
    """Fraction of sampled inputs whose argmax at ':' is the right count digit; logits_fn: ids [B, T] -> [B, T, V]."""
    task = task or Counting()
    if not isinstance(task, Counting):
        raise TypeError(f"task must be a Counting (or None for the default), got {type(task).__name__}")
    ids, colon, count = task.sample(n, seed=seed)
    with torch.no_grad():
        logits = torch.as_tensor(logits_fn(ids))
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape) or logits.shape[-1] < task.vocab_size:
        raise ValueError(f"logits_fn must map ids [B, T] = {list(ids.shape)} to logits [B, T, V] with V >= "
                         f"{task.vocab_size}; got {list(logits.shape)}")
    pred = logits[torch.arange(n), colon].argmax(-1)
    return float((pred == task.digit_id(count)).float().mean())
