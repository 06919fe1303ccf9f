"""Chapter 1, sites and steering: checkers for course/masters/01_sites.py, on the shipped `stories` model.

    resid_post[layer] = output of block `layer`            (a forward hook's `output`; its `input` is resid_pre)
    pattern = softmax(q k^T / sqrt(E) + causal mask)      [B, H, T, S], rows are queries
    steered resid_post[:, -1] = resid_post[:, -1] + coef * direction
    shift = log sum_{w in topic} p_steered(w) - log sum_{w in topic} p_clean(w)     at the last position

Each reference is the library's own answer (read_acts, hook_pattern, run with a Steer), so the student's raw
hooks are checked against the site layer, and the site layer (in its tests) against raw hooks.

Dimension key: B batch, T position, S key position, D model dim (128), H heads (4), E head dim (32), V vocab, W words.
"""

from __future__ import annotations

import functools

import plotly.graph_objects as go
import torch
from torch import Tensor

from .. import sites, zoo
from ..data import StoryCorpus
from ..edits import Steer
from .checking import CheckFailed, Mistake, call, call_without_leaks, compare, quietly, register

chapter = register("ch1_sites", "Sites and steering")
PROMPT = "Mia was a little girl who loved the sea ."


# ----------------------------------------------------------------------------- shared inputs


@functools.lru_cache(maxsize=1)
def stories() -> sites.Model:
    """The checkers' own copy of the shipped stories model (loaded once, quietly)."""
    with quietly():
        return zoo.load_model("stories")


def prompt_ids(text: str = PROMPT) -> Tensor:
    return sites.tokenizer_of(stories())(text, return_tensors="pt").input_ids


def random_ids(seed: int, B: int, T: int) -> Tensor:
    """Fixed-seed token ids [B, T], each row starting with BOS as the tokenizer's do."""
    V = sites.limits(stories())[0]
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = sites.tokenizer_of(stories()).bos_token_id
    return ids


def unembedding(word: str) -> Tensor:
    """The unit-norm unembedding row of `word`: the direction that raises its logit most per unit."""
    W_U = sites.unwrap(stories()).lm_head.weight.detach()
    row = W_U[sites.tokenizer_of(stories()).convert_tokens_to_ids(word)]
    return row / row.norm()


def topic_words(topic: str) -> Tensor:
    """Token ids [W] of a topic's words in the story corpus (the ground truth: dragon -> dragon, cave, knight ...)."""
    corpus = StoryCorpus()
    return (corpus.token_topics == corpus.topics.index(topic)).nonzero()[:, 0]


def _site(model, ids: Tensor, name: str) -> Tensor:
    with torch.no_grad():
        return sites.read_acts(model, ids, name)[name]


LEFT_HOOK = Mistake("your hook is still registered after your function returned (every later forward pass runs it)",
                    "keep the handle h = module.register_forward_hook(...) and call h.remove() in a finally: block")  # fmt: skip


# ----------------------------------------------------------------------------- 1.1 read the residual stream


def ref_read_resid(model, ids_BT: Tensor, layer: int) -> Tensor:
    return _site(model, ids_BT, f"blocks.{layer}.hook_resid_post")


READ_RESID_MISTAKES = [
    Mistake("you read the block's input (hook_resid_pre), not its output",
            "a forward hook is called as hook(module, input, output): keep output; with output_hidden_states, "
            "hidden_states[layer] is block layer's input and hidden_states[layer + 1] its output",
            lambda m, ids, L: _site(m, ids, f"blocks.{L}.hook_resid_pre")),
    Mistake("you took output[0], the first sequence of the batch",
            "a GPT-2 block returns the hidden states [B, T, D] themselves (transformers < 5 returned a tuple whose "
            "element 0 they were): keep output whole when it is a tensor", lambda m, ids, L: ref_read_resid(m, ids, L)[0]),
    Mistake("you read block layer + 1", "blocks count from 0: hook transformer.h[layer]",
            lambda m, ids, L: _site(m, ids, f"blocks.{L + 1}.hook_resid_post")),
    Mistake("you read after the final LayerNorm ln_f",
            "hidden_states[-1] (and whatever reaches lm_head) has been through ln_f; hook the block transformer.h[layer] itself",
            lambda m, ids, L: _site(m, ids, "ln_final.hook_normalized")),
    Mistake("you returned the last position only", "return every position: [B, T, D]",
            lambda m, ids, L: ref_read_resid(m, ids, L)[:, -1]),
]  # fmt: skip


@chapter.exercise("1.1", "read_resid", goal="read the residual stream after a block with a raw torch hook",
                  difficulty=1, minutes=10)  # fmt: skip
def check_read_resid(read_resid) -> str:
    m = stories()
    cases = [(f"the prompt {PROMPT!r}, layer 1", prompt_ids(), 1), ("2 random sequences of 7 tokens, layer 0", random_ids(0, 2, 7), 0),
             ("a single token (BOS), layer 2", prompt_ids()[:, :1], 2), ("the prompt, layer 3 (the last block)", prompt_ids(), 3)]  # fmt: skip
    for case, ids, layer in cases:
        got = call_without_leaks(m, read_resid, ids.clone(), layer, case=case, left_hook=LEFT_HOOK)
        compare(got, ref_read_resid(m, ids, layer), case=case, args=(m, ids, layer), mistakes=READ_RESID_MISTAKES)
    return f"equals read_acts at blocks.L.hook_resid_post on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 1.2 attention pattern from q, k


def ref_attention_pattern(q_BHTE: Tensor, k_BHTE: Tensor) -> Tensor:
    return _attend(q_BHTE, k_BHTE)


def _attend(q: Tensor, k: Tensor, *, scale: float | None = None, fill: float | None = float("-inf"), diagonal: int = 1,
            dim: int = -1, after: bool = False, naive: bool = False) -> Tensor:  # fmt: skip
    """softmax(q k^T * scale) with the causal mask, and the knobs its known mistakes turn."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    future = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(diagonal)
    if fill is not None and not after:
        scores = scores.masked_fill(future, fill)
    probs = scores.exp() / scores.exp().sum(dim, keepdim=True) if naive else scores.softmax(dim)
    return probs.masked_fill(future, 0.0) if after else probs


ATTENTION_MISTAKES = [
    Mistake("your pattern has no causal mask: tokens attend to later tokens",
            "set the scores above the diagonal to -inf before the softmax (torch.ones(T, T).triu(1) marks them)",
            lambda q, k: _attend(q, k, fill=None)),
    Mistake("you filled the masked scores with 0, and exp(0) = 1 still gives later tokens weight",
            "fill them with -inf (or a very negative number) before the softmax", lambda q, k: _attend(q, k, fill=0.0)),
    Mistake("you masked after the softmax, so the rows no longer sum to 1",
            "mask the scores with -inf before the softmax", lambda q, k: _attend(q, k, after=True)),
    Mistake("you masked the diagonal too: a token may attend to itself", "mask only keys after the query: triu(1), not triu(0)",
            lambda q, k: _attend(q, k, diagonal=0)),
    Mistake("your scores are not scaled", "divide q k^T by sqrt(E), E the head dim (q.shape[-1])",
            lambda q, k: _attend(q, k, scale=1.0)),
    Mistake("you scaled by 1/E", "scale by 1/sqrt(E)", lambda q, k: _attend(q, k, scale=1.0 / q.shape[-1])),
    Mistake("your softmax runs over the queries (dim -2)", "normalise over the keys: softmax(dim=-1), each row sums to 1",
            lambda q, k: _attend(q, k, dim=-2)),
    Mistake("your pattern is transposed: rows must be queries, columns keys", "compute q @ k.transpose(-1, -2), not k @ q^T",
            lambda q, k: _attend(q, k).transpose(-1, -2)),
    Mistake("your softmax overflows: exp of a large score is inf, and inf / inf is NaN",
            "use torch.softmax (it subtracts each row's max first)", lambda q, k: _attend(q, k, naive=True)),
]  # fmt: skip


def model_qk(model, ids_BT: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, T, E] of a GPT-2 block, from its c_attn output [B, T, 3D] (read at the raw module path)."""
    H = sites.unwrap(model).config.n_head
    qkv = _site(model, ids_BT, f"transformer.h.{layer}.attn.c_attn")
    return tuple(t.unflatten(-1, (H, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


@chapter.exercise("1.2", "attention_pattern", goal="compute attention probabilities from queries and keys",
                  difficulty=2, minutes=15)  # fmt: skip
def check_attention_pattern(attention_pattern) -> str:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 4, 6, 32, generator=g)
    q1, k1 = torch.randn(2, 1, 2, 1, 8, generator=g)
    qb, kb = 30 * torch.randn(2, 1, 1, 5, 16, generator=g)
    qm, km, _ = model_qk(stories(), prompt_ids(), 1)
    cases = [("random q, k of shape [2, 4, 6, 32]", q, k), ("a single position, q, k of shape [1, 2, 1, 8]", q1, k1),
             ("large scores (q, k ~ 30 N(0, 1)), shape [1, 1, 5, 16]", qb, kb), ("q, k of the stories model's layer 1 on the prompt", qm, km)]  # fmt: skip
    for case, qi, ki in cases:
        got = call(attention_pattern, qi.clone(), ki.clone(), case=case)
        compare(got, ref_attention_pattern(qi, ki), case=case, args=(qi, ki), mistakes=ATTENTION_MISTAKES)
    return f"softmax(q k^T / sqrt(E)) with the causal mask on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 1.3 a head's pattern in the model


def ref_head_pattern(model, ids_BT: Tensor, layer: int, head: int) -> Tensor:
    return _site(model, ids_BT, f"blocks.{layer}.attn.hook_pattern")[:, head]


def _split_wrong(model, ids, L):  # [.., (E, H)] instead of [.., (H, E)]: each "head" takes every H-th channel
    H = sites.unwrap(model).config.n_head
    qkv = _site(model, ids, f"transformer.h.{L}.attn.c_attn")
    return tuple(t.unflatten(-1, (-1, H)).permute(0, 3, 1, 2) for t in qkv.chunk(3, dim=-1))


HEAD_MISTAKES = [
    Mistake("you swapped queries and keys", "c_attn's output is [q | k | v] along its last dim: the first D channels are the queries",
            lambda m, ids, L, h: _attend(model_qk(m, ids, L)[1], model_qk(m, ids, L)[0])[:, h]),
    Mistake("you used the values as keys", "c_attn's output is [q | k | v]: keys are channels D..2D",
            lambda m, ids, L, h: _attend(model_qk(m, ids, L)[0], model_qk(m, ids, L)[2])[:, h]),
    Mistake("you split the heads the wrong way round", "each head owns E consecutive channels: unflatten(-1, (H, E)), "
            "then move H in front of T (transpose(1, 2))", lambda m, ids, L, h: _attend(*_split_wrong(m, ids, L)[:2])[:, h]),
    Mistake("you returned every head", "index the head: pattern[:, head] gives [B, T, S]",
            lambda m, ids, L, h: _site(m, ids, f"blocks.{L}.attn.hook_pattern")),
]  # fmt: skip


@chapter.exercise("1.3", "head_pattern", goal="one head's attention pattern inside the stories model", difficulty=2, minutes=15)
def check_head_pattern(head_pattern) -> str:
    m = stories()
    cases = [("the prompt, layer 1, head 2", prompt_ids(), 1, 2), ("2 random sequences of 9 tokens, layer 3, head 0", random_ids(1, 2, 9), 3, 0),
             ("the prompt, layer 0, head 3", prompt_ids(), 0, 3)]  # fmt: skip
    for case, ids, layer, head in cases:
        got = call_without_leaks(m, head_pattern, ids.clone(), layer, head, case=case, left_hook=LEFT_HOOK)
        compare(got, ref_head_pattern(m, ids, layer, head), case=case, args=(m, ids, layer, head), mistakes=HEAD_MISTAKES)
    return f"equals blocks.L.attn.hook_pattern[:, head] on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 1.4 steering with a hook


def _steered(model, ids: Tensor, site: str, direction: Tensor, coef: float, positions=-1) -> Tensor:
    with torch.no_grad():
        return sites.run(model, ids, [Steer(site, direction, coef=float(coef), positions=positions)]).logits


def ref_steered_logits(model, ids_BT: Tensor, layer: int, direction_D: Tensor, coef: float) -> Tensor:
    return _steered(model, ids_BT, f"blocks.{layer}.hook_resid_post", direction_D, coef)


STEER_MISTAKES = [
    Mistake("you steered every position", "add coef * direction at the last position only: output[:, -1]",
            lambda m, ids, L, d, c: _steered(m, ids, f"blocks.{L}.hook_resid_post", d, c, positions=None)),
    Mistake("you steered the first position (BOS)", "index -1 is the last position, 0 the first",
            lambda m, ids, L, d, c: _steered(m, ids, f"blocks.{L}.hook_resid_post", d, c, positions=0)),
    Mistake("you steered the block's input (hook_resid_pre)",
            "use register_forward_hook and change its output, not a pre-hook on the input",
            lambda m, ids, L, d, c: _steered(m, ids, f"blocks.{L}.hook_resid_pre", d, c)),
    Mistake("you steered block layer + 1", "blocks count from 0: hook transformer.h[layer]",
            lambda m, ids, L, d, c: _steered(m, ids, f"blocks.{L + 1}.hook_resid_post", d, c)),
    Mistake("you normalised the direction", "add coef * direction exactly as given (the caller chooses its norm)",
            lambda m, ids, L, d, c: _steered(m, ids, f"blocks.{L}.hook_resid_post", d / d.norm(), c)),
    Mistake("you left out coef", "add coef * direction", lambda m, ids, L, d, c: _steered(m, ids, f"blocks.{L}.hook_resid_post", d, 1.0)),
    Mistake("your edit never reached the model: these are the clean logits",
            "a forward hook changes the output by returning the new value, or by changing output in place "
            "(output[:, -1] += ...); `h = h + ...` inside the hook only rebinds a local name",
            lambda m, ids, L, d, c: _steered(m, ids, f"blocks.{L}.hook_resid_post", d, 0.0)),
]  # fmt: skip


@chapter.exercise("1.4", "steered_logits", goal="steer the model by adding a direction at a site, with a raw hook",
                  difficulty=2, minutes=15)  # fmt: skip
def check_steered_logits(steered_logits) -> str:
    m = stories()
    d_rand = torch.randn(sites.unwrap(m).config.n_embd, generator=torch.Generator().manual_seed(2))
    d_rand = 3.0 * d_rand / d_rand.norm()
    cases = [("the prompt, layer 2, the unit unembedding of 'dragon', coef 8", prompt_ids(), 2, unembedding("dragon"), 8.0),
             ("2 random sequences of 6 tokens, layer 0, a random direction of norm 3, coef -2.5", random_ids(3, 2, 6), 0, d_rand, -2.5),
             ("the prompt, layer 3, coef 0 (must equal the clean run)", prompt_ids(), 3, d_rand, 0.0)]  # fmt: skip
    for case, ids, layer, direction, coef in cases:
        got = call_without_leaks(m, steered_logits, ids.clone(), layer, direction.clone(), coef, case=case, left_hook=LEFT_HOOK)
        compare(got, ref_steered_logits(m, ids, layer, direction, coef), case=case, args=(m, ids, layer, direction, coef),
                mistakes=STEER_MISTAKES, atol=1e-4)  # fmt: skip
    return f"equals run(model, ids, [Steer(blocks.L.hook_resid_post, direction, coef, positions=-1)]) on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 1.5 measure the effect


def _shift(model, ids, L, d, c, topic, *, how: str = "logsumexp", positions=-1) -> Tensor:
    clean = _steered(model, ids, f"blocks.{L}.hook_resid_post", d, 0.0)[:, -1]
    steered = _steered(model, ids, f"blocks.{L}.hook_resid_post", d, c, positions)[:, -1]
    if how == "logits":  # no softmax: logits are not log-probabilities
        return steered[:, topic].logsumexp(-1) - clean[:, topic].logsumexp(-1)
    lp_s, lp_c = steered.log_softmax(-1)[:, topic], clean.log_softmax(-1)[:, topic]
    if how == "sum":
        return lp_s.sum(-1) - lp_c.sum(-1)
    if how == "mean":
        return lp_s.mean(-1) - lp_c.mean(-1)
    if how == "probs":
        return lp_s.exp().sum(-1) - lp_c.exp().sum(-1)
    return lp_s.logsumexp(-1) - lp_c.logsumexp(-1)


def ref_topic_logprob_shift(model, ids_BT: Tensor, layer: int, direction_D: Tensor, coef: float, topic_ids_W: Tensor) -> Tensor:
    return _shift(model, ids_BT, layer, direction_D, coef, topic_ids_W)


SHIFT_MISTAKES = [
    Mistake("you summed the words' log-probabilities", "the log-probability of a set of words is log sum_w p(w): "
            "torch.logsumexp over their log-probs, not a sum of log-probs", lambda *a: _shift(*a, how="sum")),
    Mistake("you averaged the words' log-probabilities", "the log-probability of a set of words is log sum_w p(w) (torch.logsumexp)",
            lambda *a: _shift(*a, how="mean")),
    Mistake("you used raw logits", "logits are not log-probabilities: apply log_softmax over the vocabulary first",
            lambda *a: _shift(*a, how="logits")),
    Mistake("you subtracted probabilities, not log-probabilities", "take the log of each summed probability, then subtract",
            lambda *a: _shift(*a, how="probs")),
    Mistake("your sign is reversed", "steered minus clean: a direction that helps the topic gives a positive shift",
            lambda *a: -_shift(*a)),
    Mistake("you steered every position", "steer the last position only, as in 1.4", lambda *a: _shift(*a, positions=None)),
    Mistake("you averaged over the prompts", "return one shift per prompt: [B]", lambda *a: _shift(*a).mean()),
]  # fmt: skip
EVERY_POSITION = Mistake("you measured at every position", "measure the next-token distribution at the last position: logits[:, -1]")


@chapter.exercise("1.5", "topic_logprob_shift", goal="measure how far steering moves a topic's words' log-probability",
                  difficulty=2, minutes=15)  # fmt: skip
def check_topic_logprob_shift(topic_logprob_shift) -> str:
    m = stories()
    d_rand = torch.randn(sites.unwrap(m).config.n_embd, generator=torch.Generator().manual_seed(4))
    cases = [("the prompt, dragon words, the unembedding of 'dragon' at layer 2, coef 6", prompt_ids(), 2, unembedding("dragon"), 6.0,
              topic_words("dragon")),
             ("3 random sequences of 8 tokens, ocean words, a random direction at layer 1, coef 4", random_ids(5, 3, 8), 1, d_rand, 4.0,
              topic_words("ocean")),
             ("the prompt, coef 0 (no shift)", prompt_ids(), 3, d_rand, 0.0, topic_words("space"))]  # fmt: skip
    for case, ids, layer, direction, coef, words in cases:
        args = (m, ids, layer, direction, coef, words)
        got = call_without_leaks(m, topic_logprob_shift, ids.clone(), layer, direction.clone(), coef, words.clone(), case=case, left_hook=LEFT_HOOK)
        if isinstance(got, Tensor) and got.dim() == 2 and got.shape[1] == ids.shape[1] > 1:  # [B, T]: a shift per position
            raise EVERY_POSITION.failed(f"on {case}: your output has shape {list(got.shape)}, expected [{len(ids)}]")
        compare(got, ref_topic_logprob_shift(*args), case=case, args=args, mistakes=SHIFT_MISTAKES, atol=1e-4)
    return f"log sum p(topic) steered - clean at the last position, on {len(cases)} inputs"


def topic_shift_figure(shift_fn=None, prompt: str = "Tom went to the", layer: int = 2, coefs=tuple(range(-4, 13, 2)),
                       topics=("dragon", "ocean", "space")) -> go.Figure:  # fmt: skip
    """Each topic's shift against the coefficient of the 'dragon' unembedding: the expected picture of 1.5.

    `shift_fn` is a topic_logprob_shift (called once per coefficient and topic); None draws the reference.
    """
    m, ids, d = stories(), prompt_ids(prompt), unembedding("dragon")
    words = {topic: topic_words(topic) for topic in topics}
    if shift_fn is None:  # one steered run per coefficient serves every topic
        site = f"blocks.{layer}.hook_resid_post"
        clean = _steered(m, ids, site, d, 0.0)[0, -1].log_softmax(-1)
        runs = [_steered(m, ids, site, d, float(c))[0, -1].log_softmax(-1) for c in coefs]
        ys = {t: [float(lp[w].logsumexp(-1) - clean[w].logsumexp(-1)) for lp in runs] for t, w in words.items()}
    else:
        ys = {t: [float(torch.as_tensor(shift_fn(m, ids, layer, d, float(c), w)).reshape(-1)[0]) for c in coefs] for t, w in words.items()}
    fig = go.Figure([go.Scatter(x=list(coefs), y=ys[t], mode="lines+markers", name=f"{t} words") for t in topics])
    return fig.update_layout(title=f"{prompt!r}, steered along 'dragon' at blocks.{layer}.hook_resid_post: "
                                   "change in log p(topic words) at the next token",
                             xaxis_title="coef", yaxis_title="Δ log p (nats)", height=340)  # fmt: skip


__all__ = ["chapter", "check_read_resid", "check_attention_pattern", "check_head_pattern", "check_steered_logits",
           "check_topic_logprob_shift", "topic_shift_figure", "stories", "prompt_ids", "random_ids", "unembedding",
           "topic_words", "model_qk", "CheckFailed"]  # fmt: skip
