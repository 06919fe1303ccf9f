"""TokFSM: the tokenised finite-state machine of the codebook-features paper (Tamkin et al. 2023, §3).

    edges[s] = 10 distinct states drawn uniformly (fixed seed)      P(s_{t+1} = e | s_t) = 1/10  for e in edges[s_t]
    a state is written as 2 zero-padded digit tokens; a sequence is BOS + 64 transitions, cut to 128 tokens

A model has to parse digit pairs back into states, recall the current state's out-edges and re-tokenise
the next state: the first digit of a state is predicted from the previous state alone, the second digit
from the previous state and the first digit.

Dimension key: B batch, T position, V vocab (11), S states in a trajectory, N_S number of states (100),
E out-edges per state (10).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import as_ids, as_int

SPECIAL = "<|endoftext|>"  # one token serves as BOS, EOS and PAD, as in the paper's tokenizer
N_DIGITS = 10  # token ids 0..9 are the digits '0'..'9'; the special token is id 10


@dataclass(frozen=True)
class TokFSM:
    """A random FSM with `n_states` states and `n_edges` distinct out-edges each (self-loops allowed)."""

    n_states: int = 100  # states are written with ceil(log10(n_states)) digits
    n_edges: int = 10  # out-degree of every state; transitions are uniform over the out-edges
    seed: int = 42  # seed of the edge draw (the paper's value); the FSM is a pure function of these fields
    n_transitions: int = 64  # transitions per sampled trajectory
    seq_len: int = 128  # BOS + digits, truncated to this many tokens
    edges: np.ndarray = field(init=False, repr=False, compare=False)  # int [N_S, E], sorted per row
    adjacency: np.ndarray = field(init=False, repr=False, compare=False)  # bool [N_S, N_S]: a -> b is an edge

    def __post_init__(self):
        for name in ("n_states", "n_edges", "seed", "n_transitions", "seq_len"):
            as_int(name, getattr(self, name), 0)
        if not 2 <= self.n_states <= 10_000:
            raise ValueError(f"n_states must be in [2, 10000], got {self.n_states}")
        if not 1 <= self.n_edges <= self.n_states:
            raise ValueError(f"n_edges must be in [1, n_states={self.n_states}], got {self.n_edges}")
        if self.n_transitions < 1:
            raise ValueError(f"n_transitions must be >= 1, got {self.n_transitions}")
        if not 1 + self.digits <= self.seq_len:
            raise ValueError(f"seq_len must hold BOS + one state ({1 + self.digits} tokens), got {self.seq_len}")
        rng = np.random.default_rng(self.seed)
        # Same draw as codebook-features' FSM(seed=42): one choice without replacement per state, in order.
        edges_SE = np.stack([rng.choice(self.n_states, size=self.n_edges, replace=False) for _ in range(self.n_states)])
        object.__setattr__(self, "edges", np.sort(edges_SE, axis=1))
        adj = np.zeros((self.n_states, self.n_states), dtype=bool)
        adj[np.arange(self.n_states)[:, None], edges_SE] = True
        object.__setattr__(self, "adjacency", adj)

    @property
    def digits(self) -> int:
        return max(1, math.ceil(math.log10(self.n_states)))

    @property
    def vocab_size(self) -> int:
        return N_DIGITS + 1

    @property
    def special_id(self) -> int:
        return N_DIGITS

    def sample_states(self, n: int, seed: int = 0) -> np.ndarray:
        """Int [n, n_transitions + 1]: trajectories from uniform start states."""
        n, seed = as_int("n", n, 1), as_int("seed", seed, 0)
        rng = np.random.default_rng(seed)
        states = np.empty((n, self.n_transitions + 1), dtype=np.int64)
        states[:, 0] = rng.integers(self.n_states, size=n)
        picks = rng.integers(self.n_edges, size=(n, self.n_transitions))
        for t in range(self.n_transitions):
            states[:, t + 1] = self.edges[states[:, t], picks[:, t]]
        return states

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """LongTensor [n, seq_len]: BOS followed by the digits of a sampled trajectory."""
        n = as_int("n", n, 1)
        digits = self.encode(self.sample_states(n, seed))
        bos = torch.full((n, 1), self.special_id, dtype=torch.long)
        return torch.cat([bos, digits], dim=1)[:, : self.seq_len]

    def encode(self, states) -> Tensor:
        """States [..., S] -> digit token ids [..., S * digits] (no BOS)."""
        states = as_ids("states", states, self.n_states)
        powers = 10 ** torch.arange(self.digits - 1, -1, -1)
        return (states[..., None] // powers % 10).flatten(-2)

    def decode(self, tokens) -> Tensor:
        """Token ids [..., T] -> states [..., S]; a leading BOS is dropped, a trailing partial state too.

        A state containing a non-digit token decodes to -1.
        """
        tokens = as_ids("tokens", tokens, None)  # any integer: a state holding a non-digit decodes to -1
        if tokens.dim() == 0:
            raise ValueError("tokens must be [..., T] token ids, got a single number")
        if tokens.shape[-1] and bool((tokens[..., 0] == self.special_id).all()):
            tokens = tokens[..., 1:]
        n_full = tokens.shape[-1] // self.digits
        groups = tokens[..., : n_full * self.digits].unflatten(-1, (n_full, self.digits))
        powers = 10 ** torch.arange(self.digits - 1, -1, -1)
        states = (groups * powers).sum(-1)
        bad = ((groups < 0) | (groups >= N_DIGITS)).any(-1) | (states >= self.n_states)
        return states.masked_fill(bad, -1)

    def is_valid(self, prev, next):
        """True where prev -> next is an edge (arrays broadcast; out-of-range states are never valid)."""
        prev, nxt = np.asarray(prev), np.asarray(next)
        inside = (prev >= 0) & (prev < self.n_states) & (nxt >= 0) & (nxt < self.n_states)
        ok = inside & self.adjacency[np.where(inside, prev, 0), np.where(inside, nxt, 0)]
        return bool(ok) if ok.ndim == 0 else ok

    def text(self, tokens) -> str:
        """One sequence of token ids as the string the tokenizer reads, e.g. '<|endoftext|>0512'."""
        tokens = as_ids("tokens", tokens, self.vocab_size)
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be one sequence [T], got shape {list(tokens.shape)}")
        return "".join(SPECIAL if t == self.special_id else str(int(t)) for t in tokens)

    def tokenizer(self):
        """A PreTrainedTokenizerFast: one token per digit, BOS prepended by default, decode joins digits."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {str(d): d for d in range(N_DIGITS)} | {SPECIAL: self.special_id}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL))
        tok.add_special_tokens([SPECIAL])
        tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A $B", special_tokens=[(SPECIAL, self.special_id)]
        )
        tok.decoder = decoders.Fuse()  # '0','5' -> '05': digits are written without spaces
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL, unk_token=SPECIAL,
            model_max_length=self.seq_len,
        )


# ---------------------------------------------------------------- metrics


def as_logits_fn(model) -> Callable[[Tensor], Tensor]:
    """Turn a module (HF causal LM, plain nn.Module, nnsight wrapper with `_module`) or callable into ids -> logits."""
    inner = getattr(model, "_module", None)
    if isinstance(inner, nn.Module):
        model = inner
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        # HF models warn about padding when the BOS id is also the pad id; a full mask says "no padding".
        wants_mask = "attention_mask" in inspect.signature(model.forward).parameters

        def run(ids_BT: Tensor) -> Tensor:
            ids_BT = ids_BT.to(device)
            out = model(ids_BT, attention_mask=torch.ones_like(ids_BT)) if wants_mask else model(ids_BT)
            logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
            return logits.float().cpu()

        return run
    if callable(model):
        return lambda ids_BT: torch.as_tensor(model(ids_BT)).float().cpu()
    raise TypeError(f"model must be an nn.Module or a callable ids[B,T] -> logits[B,T,V], got {type(model).__name__}")


class eval_mode:
    """Put a module in eval mode and no-grad for the block, restoring its training flag after."""

    def __init__(self, model):
        inner = getattr(model, "_module", model)
        self.module = inner if isinstance(inner, nn.Module) else None

    def __enter__(self):
        self.was_training = self.module.training if self.module is not None else False
        if self.module is not None:
            self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        if self.module is not None:
            self.module.train(self.was_training)


def _fsm(fsm) -> TokFSM:
    if fsm is None:
        return TokFSM()
    if not isinstance(fsm, TokFSM):
        raise TypeError(f"fsm must be a TokFSM (or None for the paper's), got {type(fsm).__name__}")
    return fsm


def first_transition_accuracy(model, fsm: TokFSM | None = None) -> float:
    """Mean over states of |top-E of the model's next-state distribution ∩ true out-edges| / E.

    For state s the model reads BOS + digits(s); p(next = ab) = p(a | BOS s) · p(b | BOS s a), over the full
    vocabulary softmax, exactly as codebook-features' `fsm_utils.first_transition_accuracy` (2-digit FSMs).
    """
    fsm = _fsm(fsm)
    if fsm.digits != 2:
        raise ValueError(f"first_transition_accuracy is defined for 2-digit FSMs, got digits={fsm.digits}")
    run = as_logits_fn(model)
    n = fsm.n_states
    with eval_mode(model):
        prefix_ST = torch.cat([torch.full((n, 1), fsm.special_id), fsm.encode(torch.arange(n)[:, None])], 1)
        # One batch of N_S * 10 inputs BOS s a; position -2 gives p(a | s), position -1 gives p(b | s a).
        ids = torch.cat([prefix_ST.repeat_interleave(N_DIGITS, 0), torch.arange(N_DIGITS).repeat(n)[:, None]], 1)
        probs = run(ids)[:, -2:].softmax(-1)
        p_first = probs[:, 0].gather(1, ids[:, -1:])  # [N_S*10, 1]
        p_next_SN = (p_first * probs[:, 1, :N_DIGITS]).reshape(n, N_DIGITS * N_DIGITS)[:, :n]
    top_SE = p_next_SN.topk(fsm.n_edges, dim=-1).indices.numpy()
    hits = fsm.adjacency[np.arange(n)[:, None], top_SE]
    return float(hits.mean())


def transition_accuracy(
    model, fsm: TokFSM | None = None, *, n: int = 64, new_states: int = 8, seed: int = 0, temperature: float = 1.0
) -> float:
    """Fraction of valid transitions in sampled continuations of real prefixes.

    Each of `n` real sequences is cut after BOS + k whole states (k uniform in [1, max], so every depth of
    the context is tested), then `new_states` states are sampled token by token. The transitions counted
    are last-prefix-state -> first new state and between new states; a state holding a special token is
    invalid, and so is any transition touching it. The model must be causal: all rows advance together,
    each reading its logits at its own position, so tokens to the right of it must not matter.
    """
    fsm = _fsm(fsm)
    n, new_states, seed = as_int("n", n, 1), as_int("new_states", new_states, 1), as_int("seed", seed, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    max_prefix = (fsm.seq_len - 1) // fsm.digits - new_states
    if max_prefix < 1:
        raise ValueError(f"new_states={new_states} leaves no room for a prefix in seq_len={fsm.seq_len}")
    run = as_logits_fn(model)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    ids_BT = fsm.sample(n, seed=seed + 1)
    prefix_B = torch.as_tensor(rng.integers(1, max_prefix + 1, size=n))
    pos_B = prefix_B * fsm.digits  # position of each row's last prefix token
    rows = torch.arange(n)
    with eval_mode(model):
        for _ in range(new_states * fsm.digits):
            logits_BV = run(ids_BT[:, : int(pos_B.max()) + 1])[rows, pos_B] / temperature
            ids_BT[rows, pos_B + 1] = torch.multinomial(logits_BV.softmax(-1), 1, generator=gen)[:, 0]
            pos_B += 1
    states_BS = fsm.decode(ids_BT)  # BOS dropped: state j sits at tokens 2j+1, 2j+2
    # Row b: its last prefix state is number prefix_B[b] - 1, followed by new_states sampled ones.
    idx_BS = (prefix_B - 1)[:, None] + torch.arange(new_states + 1)
    chain_BS = states_BS.gather(1, idx_BS).numpy()
    return float(fsm.is_valid(chain_BS[:, :-1], chain_BS[:, 1:]).mean())
