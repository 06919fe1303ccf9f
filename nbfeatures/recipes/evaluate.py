"""The bars each shipped model must clear, computed in code and written into its model card.

    tokfsm:  transition accuracy of sampled continuations, first-transition accuracy (data.tokfsm)
    stories: val loss vs a bigram fitted to the same stories,  loss_reduction = 1 - loss / bigram_loss
             topic stay = P(topic words of the prompt's topic outnumber all other topic words in a continuation)

Dimension key: B batch, T position, V vocab, K topics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.stories import StoryCorpus
from ..data.tokfsm import TokFSM, eval_mode, as_logits_fn, first_transition_accuracy, transition_accuracy

VAL_SEED = 1  # validation stories come from another corpus seed than the training stories (seed 0)


def evaluate_tokfsm(model, *, n: int = 512, seed: int = 0) -> dict:
    fsm = TokFSM()
    seed = 10_000 + seed  # the training stream draws with seeds 0, 1, 2 ... (one per step) for recipe seed 0
    ids_BT = fsm.sample(n, seed=seed)
    return {
        "transition_accuracy": transition_accuracy(model, fsm, n=n, seed=seed),
        "first_transition_accuracy": first_transition_accuracy(model, fsm),
        "val_loss": mean_loss(model, [row.tolist() for row in ids_BT]),
    }


def mean_loss(model, rows: list[list[int]], batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over all predicted tokens of all rows (rows padded on the right)."""
    run = as_logits_fn(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids_BT = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
            mask_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
            for b, row in enumerate(chunk):
                ids_BT[b, : len(row)], mask_BT[b, : len(row)] = torch.tensor(row), True
            logp_BTV = run(ids_BT).log_softmax(-1)[:, :-1]
            nll_BT = -logp_BTV.gather(-1, ids_BT[:, 1:, None])[..., 0]
            total += float(nll_BT[mask_BT[:, 1:]].sum())
            count += int(mask_BT[:, 1:].sum())
    return total / count


def fit_bigram(tokens: Tensor, vocab_size: int, alpha: float) -> Tensor:
    """Log-probabilities [V, V] of next token given previous, add-alpha smoothed, from one token stream."""
    counts = torch.bincount(tokens[:-1] * vocab_size + tokens[1:], minlength=vocab_size**2).double()
    counts = counts.reshape(vocab_size, vocab_size) + alpha
    return (counts / counts.sum(-1, keepdim=True)).log().float()


def bigram_model(logp_VV: Tensor):
    """The bigram as a callable ids [B, T] -> logits [B, T, V], usable wherever a model is."""
    return lambda ids_BT: logp_VV[ids_BT]


def sample_continuations(model, prompts: list[list[int]], new_tokens: int, seed: int = 0, temperature: float = 1.0):
    """Sampled continuations (without the prompt) for each prompt; equal-length prompts share forward passes."""
    run, gen = as_logits_fn(model), torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    with eval_mode(model):
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            ids_BT = torch.tensor([prompts[i] for i in rows])
            for _ in range(new_tokens):
                probs = (run(ids_BT)[:, -1] / temperature).softmax(-1)
                ids_BT = torch.cat([ids_BT, torch.multinomial(probs, 1, generator=gen)], 1)
            for i, row in zip(rows, ids_BT[:, length:].tolist()):
                out[i] = row
    return out


def topic_stay_rate(model, corpus: StoryCorpus | None = None, *, per_topic: int = 10, new_tokens: int = 48,
                    seed: int = 0) -> float:  # fmt: skip
    """Fraction of continuations of a topic's opening sentence whose topic words are mostly that topic's.

    A continuation is read up to the first end-of-story token; one with no topic words counts as a miss.
    """
    corpus = corpus or StoryCorpus()
    tok = corpus.tokenizer()
    topics = [k for k in range(len(corpus.topics)) for _ in range(per_topic)]
    prompts = [tok(corpus.topic_prompt(k, seed=seed * 100_003 + j))["input_ids"] for j, k in enumerate(topics)]
    token_topics = corpus.token_topics
    stays = 0
    for k, cont in zip(topics, sample_continuations(model, prompts, new_tokens, seed=seed)):
        cont = cont[: cont.index(0)] if 0 in cont else cont
        found = token_topics[torch.tensor(cont, dtype=torch.long)]
        own, other = int((found == k).sum()), int(((found >= 0) & (found != k)).sum())
        stays += own > other
    return stays / len(topics)


def evaluate_stories(model, *, train_tokens: Tensor, n_val: int = 1000, per_topic: int = 10, seed: int = 0) -> dict:
    """Val loss of `model` and of the best add-alpha bigram fitted to `train_tokens`, and both topic-stay rates."""
    corpus = StoryCorpus(seed=VAL_SEED)
    val_rows = corpus.encode(corpus.generate(n_val))
    vocab_size = len(corpus.vocab)
    # The baseline gets its best smoothing, chosen on the validation stories: a generous comparison.
    bigrams = [bigram_model(fit_bigram(train_tokens, vocab_size, a)) for a in (1e-3, 1e-2, 1e-1, 1.0)]
    bigram_losses = [mean_loss(b, val_rows, batch_size=256) for b in bigrams]
    best = min(range(len(bigrams)), key=bigram_losses.__getitem__)
    loss = mean_loss(model, val_rows)
    return {
        "val_loss": loss,
        "bigram_val_loss": bigram_losses[best],
        "loss_reduction_vs_bigram": 1 - loss / bigram_losses[best],
        "topic_stay_rate": topic_stay_rate(model, corpus, per_topic=per_topic, seed=seed),
        "bigram_topic_stay_rate": topic_stay_rate(bigrams[best], corpus, per_topic=per_topic, seed=seed),
    }
