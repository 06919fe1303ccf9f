"""Chapter 3, codebook features: checkers for course/masters/03_codebook.py, on the shipped TokFSM codebook model
`tokfsm-codebook` (GPT-NeoX, 4 layers; a codebook of C = 1000 codes, k = 1, at every MLP output and attention head).

    sims[n, c] = cos(LayerNorm(x_n), code_c)        LayerNorm without affine parameters: F.layer_norm(x, (E,))
    out = sum of the k most similar codes            value; gradient straight through to LayerNorm(x): d out / d xn := I
    label[b, t] = state s on the token that completes s (its second digit: positions 2, 4, ... after BOS), -1 elsewhere
    precision(s, c) = hits / fires(c)     recall(s, c) = hits / count(s)     state code of s = argmax_c F1
    forcing: codes replaced on the state's second digit;  p(next = ab) = p(a | BOS s) p(b | BOS s a)

The references are the library's own answers (CodebookLayer, best_code_per_label, CodebookModel.run with ForceCodes)
(Tamkin, Taufeeque, Goodman 2023, "Codebook features: sparse and discrete interpretability for neural networks").

Dimension key: N tokens, E width, C codes, K codes chosen, B sequences, T positions, S states (100).
"""

from __future__ import annotations

import functools

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import Tensor

from ..codebook import CodebookConfig, CodebookLayer, ForceCodes, best_code_per_label, collect_codes, load_codebook_model
from ..data import TokFSM
from ..plots import next_state_bars
from .checking import CheckFailed, Mistake, call, compare, quietly, register

chapter = register("ch3_codebook", "Codebook features")
MODEL = "tokfsm-codebook"
MLP = [f"blocks.{i}.hook_mlp_out" for i in range(4)]


# ----------------------------------------------------------------------------- shared inputs


@functools.lru_cache(maxsize=1)
def codebook_model():
    """The checkers' own copy of the shipped codebook model (loaded once, quietly)."""
    with quietly():
        return load_codebook_model(MODEL)


@functools.lru_cache(maxsize=1)
def fsm() -> TokFSM:
    return TokFSM()


@functools.lru_cache(maxsize=1)
def fsm_codes() -> tuple[Tensor, dict[str, Tensor]]:
    """24 held-out TokFSM sequences [24, 128] and the codes the model chose on them, site -> [24, 128, (G,) K]."""
    ids = fsm().sample(24, seed=123)
    with quietly():
        return ids, collect_codes(codebook_model(), ids)


@functools.lru_cache(maxsize=1)
def mlp_inputs() -> Tensor:
    """What the layer-2 MLP codebook sees on 12 tokens of a trajectory, un-normalised again: [12, 128]."""
    with torch.no_grad(), quietly():
        target = codebook_model().run(fsm().sample(1, seed=5)[:, :13]).outputs[MLP[2]].target[0, 1:]
    return 2.0 * target + 1.0  # LayerNorm maps it back onto target: the layer sees what it saw


def _codebook(site: str = MLP[2]) -> Tensor:
    return codebook_model().layer(site).codebook.detach()[0]


def _layer(codebook_CE: Tensor, k: int) -> CodebookLayer:
    """A library CodebookLayer holding this codebook (its parameter a fresh leaf), in eval mode."""
    C, E = codebook_CE.shape
    layer = CodebookLayer(CodebookConfig(d_in=E, n_codes=C, k=k), seed=0).eval()
    with torch.no_grad():
        layer.codebook.copy_(codebook_CE[None])
    return layer


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],))


def _random_codebook(seed: int, C: int, E: int) -> tuple[Tensor, Tensor]:
    """Inputs far from zero-mean and codes of very different norms, so that every shortcut changes the answer."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(C, E, generator=g) * torch.linspace(0.3, 3.0, C)[torch.randperm(C, generator=g), None]
    return codes, g


# ----------------------------------------------------------------------------- 3.1 cosine similarities


def ref_code_similarities(x_NE: Tensor, codebook_CE: Tensor) -> Tensor:
    with torch.no_grad():
        out = _layer(codebook_CE, k=len(codebook_CE))(x_NE)  # every code, most similar first
    return torch.zeros(len(x_NE), len(codebook_CE)).scatter(1, out.codes, out.sims)


SIM_MISTAKES = [
    Mistake("you normalised the codes but not the input: cosine similarity needs both",
            "divide LayerNorm(x) by its norm too: F.normalize(xn, dim=-1) @ F.normalize(codebook, dim=-1).T",
            lambda x, c: _ln(x) @ F.normalize(c, dim=-1).T),
    Mistake("you normalised the input but not the codes: cosine similarity needs both",
            "divide each code by its norm too: F.normalize(codebook, dim=-1)", lambda x, c: F.normalize(_ln(x), dim=-1) @ c.T),
    Mistake("you used the dot product, not the cosine", "normalise both sides to unit length first (F.normalize(..., dim=-1))",
            lambda x, c: _ln(x) @ c.T),
    Mistake("you compared the codes with the raw input", "the codebook sees LayerNorm(x): xn = F.layer_norm(x, (E,)), then "
            "the cosine of xn with each code", lambda x, c: F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).T),
    Mistake("you used (minus) the Euclidean distance", "the layer ranks codes by cosine similarity", lambda x, c: -torch.cdist(_ln(x), c)),
    Mistake("your similarities are transposed", "return [N, C]: one row per token, one column per code",
            lambda x, c: ref_code_similarities(x, c).T),
]  # fmt: skip


@chapter.exercise("3.1", "code_similarities", goal="cosine similarity of LayerNorm(x) with every code", difficulty=1, minutes=10)
def check_code_similarities(code_similarities) -> str:
    codes, g = _random_codebook(0, 12, 8)
    x1 = torch.randn(5, 8, generator=g) + 2.0
    codes2, g2 = _random_codebook(1, 3, 8)
    x2 = torch.randn(1, 8, generator=g2) - 1.0
    cases = [("5 random tokens (mean 2) and 12 random codes of norms 0.3 to 3, E = 8", x1, codes),
             ("a single token and 3 codes", x2, codes2),
             ("12 real inputs of the layer-2 MLP codebook and its 1000 codes, E = 128", mlp_inputs(), _codebook())]  # fmt: skip
    for case, x, c in cases:
        got = call(code_similarities, x.clone(), c.clone(), case=case)
        compare(got, ref_code_similarities(x, c), case=case, args=(x, c), mistakes=SIM_MISTAKES, atol=1e-5)
    return f"equals CodebookLayer's cosine similarities on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 3.2 the snap, straight through


def ref_codebook_snap(x_NE: Tensor, codebook_CE: Tensor, k: int) -> Tensor:
    with torch.no_grad():
        return _layer(codebook_CE, k)(x_NE).x_hat


def _snap(x, c, k, *, rank="cos", largest=True, reduce="sum", unit=False):
    """The sum of the k best codes by `rank`, and the knobs its known mistakes turn (value only)."""
    xn = _ln(x)
    sims = {"cos": F.normalize(xn, dim=-1) @ F.normalize(c, dim=-1).T, "dot": xn @ c.T,
            "raw": F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).T}[rank]  # fmt: skip
    ids = sims.topk(k, dim=-1, largest=largest).indices
    picked = (F.normalize(c, dim=-1) if unit else c)[ids]
    return picked.sum(-2) if reduce == "sum" else picked.mean(-2)


SNAP_MISTAKES = [
    Mistake("you took the least similar codes (argmin)", "take the most similar: topk(k) of the cosine similarities "
            "(largest=True), or argmax for k = 1", lambda *a: _snap(*a, largest=False)),
    Mistake("you ranked the codes by dot product, which favours long codes", "rank by cosine similarity: normalise "
            "LayerNorm(x) and the codes before the product", lambda *a: _snap(*a, rank="dot")),
    Mistake("you ranked the codes against the raw input", "the codebook compares LayerNorm(x) with its codes",
            lambda *a: _snap(*a, rank="raw")),
    Mistake("you averaged the k codes", "this layer sums them (as the paper writes; the authors' code averages)",
            lambda *a: _snap(*a, reduce="mean")),
    Mistake("you summed the normalised codes", "output the code vectors themselves: codebook_CE[ids].sum(-2)",
            lambda *a: _snap(*a, unit=True)),
    Mistake("you returned LayerNorm(x) itself", "output the sum of the chosen codes; the straight-through term "
            "xn - xn.detach() adds 0 to the value", lambda x, c, k: _ln(x)),
]  # fmt: skip
NO_STRAIGHT_THROUGH = Mistake("no gradient reaches the input: there is no straight-through (gradient zero)",
                              "add xn - xn.detach() to the chosen codes (xn = LayerNorm(x)): the value is unchanged and "
                              "the output's gradient flows to xn as if the snap were the identity")  # fmt: skip
SKIPS_LAYERNORM = Mistake("your straight-through skips the LayerNorm: the input's gradient is the output's, unchanged",
                          "add xn - xn.detach() with xn = LayerNorm(x), not x - x.detach(): the gradient must pass "
                          "back through the LayerNorm the layer applied")  # fmt: skip
CODES_NO_GRAD = Mistake("the codes get no gradient", "look the chosen codes up in the codebook itself "
                        "(codebook_CE[ids]), not in a detached copy: only the search is detached")


def _grads(fn, x: Tensor, codebook: Tensor, k: int, G: Tensor, *, case: str | None = None, library: bool = False):
    """(output, d<out, G>/dx, d<out, G>/dcodebook) with fresh leaves; None where no gradient reached."""
    x = x.clone().requires_grad_(True)
    if library:
        layer = _layer(codebook, k)
        out, leaf = layer(x).x_hat, layer.codebook
    else:
        leaf = codebook.clone().requires_grad_(True)
        out = call(fn, x, leaf, k, case=case) if case is not None else fn(x, leaf, k)
    if isinstance(out, Tensor) and out.requires_grad and out.shape == G.shape:
        (out * G).sum().backward()
    cb_grad = None if leaf.grad is None else leaf.grad.reshape(codebook.shape)
    return out, x.grad, cb_grad


@chapter.exercise("3.2", "codebook_snap", goal="snap each input to its k most similar codes, with a straight-through gradient",
                  difficulty=2, minutes=15)  # fmt: skip
def check_codebook_snap(codebook_snap) -> str:
    codes, g = _random_codebook(2, 10, 8)
    x = torch.randn(6, 8, generator=g) + 1.5
    cases = [("6 random tokens (mean 1.5), 10 codes of norms 0.3 to 3, k = 1", x, codes, 1),
             ("the same, k = 3", x, codes, 3),
             ("12 real inputs of the layer-2 MLP codebook, its 1000 codes, k = 1", mlp_inputs(), _codebook(), 1)]  # fmt: skip
    for case, xi, c, k in cases:
        G = torch.randn(xi.shape, generator=g)  # d loss / d out: the gradient the layer above sends back
        got, got_x, got_c = _grads(codebook_snap, xi, c, k, G, case=case)
        _, want_x, want_c = _grads(None, xi, c, k, G, library=True)
        compare(got, ref_codebook_snap(xi, c, k), case=case, args=(xi, c, k), mistakes=SNAP_MISTAKES, atol=1e-5)
        if got_x is None or not got_x.any():
            raise NO_STRAIGHT_THROUGH.failed(f"on {case}")
        where = f"on {case}, the input's gradient"
        if not torch.allclose(got_x, want_x, atol=1e-5, rtol=1e-4):
            if torch.allclose(got_x, G, atol=1e-5):
                raise SKIPS_LAYERNORM.failed(where)
            compare(got_x, want_x, case=where)
        if got_c is None or not got_c.any():
            raise CODES_NO_GRAD.failed(f"on {case}")
        compare(got_c, want_c.reshape(c.shape), case=f"{case}, the codebook's gradient", atol=1e-5)
    return f"equals CodebookLayer's output and both gradients on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 3.3 which token is a state?


def ref_state_labels(ids_BT: Tensor, fsm: TokFSM) -> Tensor:
    T = ids_BT.shape[1]
    pos = torch.arange(T)
    second = (pos >= 2) & (pos % 2 == 0)  # BOS at 0, state j's digits at 2j + 1 and 2j + 2
    labels = torch.full(ids_BT.shape, -1, dtype=torch.long)
    labels[:, second] = fsm.decode(ids_BT)[:, : int(second.sum())]
    return labels


def _labels(ids: Tensor, fsm: TokFSM, at=(2,), fill: int = -1) -> Tensor:
    """State j written at positions 2j + a for a in `at`; `fill` elsewhere."""
    states = fsm.decode(ids)
    out = torch.full(ids.shape, fill, dtype=torch.long)
    for j in range(states.shape[1]):
        for a in at:
            if 0 <= 2 * j + a < ids.shape[1]:
                out[:, 2 * j + a] = states[:, j]
    return out


LABEL_MISTAKES = [
    Mistake("you labelled each state's first digit (off by one)", "the state is only known once its second digit is "
            "read: after BOS at 0, state j's digits sit at 2j + 1 and 2j + 2; label 2j + 2", lambda i, f: _labels(i, f, at=(1,))),
    Mistake("you forgot BOS (off by one)", "position 0 is BOS: state j's second digit is at 2j + 2, not 2j + 1",
            lambda i, f: _labels(i, f, at=(0,))),
    Mistake("you labelled the token after the state (off by one)", "label the state's own second digit, 2j + 2",
            lambda i, f: _labels(i, f, at=(3,))),
    Mistake("you labelled both digits of each state", "only the second digit: before it the state is not yet decided",
            lambda i, f: _labels(i, f, at=(1, 2))),
    Mistake("you left 0 on the tokens that complete no state", "use -1 there: 0 is state 00",
            lambda i, f: ref_state_labels(i, f).clamp_min(0)),
    Mistake("you returned the states [B, S]", "return one label per token, [B, T]: the state on its second digit, -1 elsewhere",
            lambda i, f: f.decode(i)),
]  # fmt: skip


@chapter.exercise("3.3", "state_labels", goal="label each token that completes a TokFSM state with that state",
                  difficulty=1, minutes=10)  # fmt: skip
def check_state_labels(state_labels) -> str:
    m = fsm()
    ids = m.sample(3, seed=7)
    cases = [("3 sampled sequences of 128 tokens", ids), ("2 sequences cut to 8 tokens", ids[:2, :8]),
             ("a sequence cut to 6 tokens (BOS, 2 states, half a state)", ids[:1, :6]),
             ("BOS and one digit: no state is complete", ids[:1, :2])]  # fmt: skip
    for case, i in cases:
        got = call(state_labels, i.clone(), m, case=case)
        compare(got, ref_state_labels(i, m), case=case, args=(i, m), mistakes=LABEL_MISTAKES)
    return f"the state on its second digit, -1 elsewhere, on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 3.4 state codes


def _scores(codes_BTK: Tensor, labels_BT: Tensor, n_codes: int, n_states: int, labelled_only: bool = False):
    """(hits [S, C], fires [C], count [S]): on how many tokens of state s code c fired, where c fired at all, and s."""
    c = codes_BTK.reshape(labels_BT.numel(), -1)
    lab = labels_BT.reshape(-1)
    fires_NC = torch.zeros(len(c), n_codes).scatter_(1, c, 1.0)  # a code in two of a token's k slots fires once
    on = lab >= 0
    hits = torch.zeros(n_states, n_codes).index_add_(0, lab[on], fires_NC[on])
    fires = fires_NC[on].sum(0) if labelled_only else fires_NC.sum(0)
    return hits, fires, torch.bincount(lab[on], minlength=n_states).float()


def _f1(hits, fires, count):
    p, r = hits / fires.clamp_min(1), hits / count.clamp_min(1)[:, None]
    return 2 * p * r / (p + r).clamp_min(1e-12), p


def ref_best_state_codes(codes_BTK: Tensor, labels_BT: Tensor, n_codes: int, n_states: int) -> Tensor:
    table = best_code_per_label(codes_BTK, labels_BT, n_codes, n_labels=n_states)
    return torch.tensor(table.code.tolist())


def _chosen_f1(choice: Tensor, codes, labels, n_codes, n_states) -> Tensor:
    """The F1 of the code chosen for each state (what the check compares, so that equally good codes both pass)."""
    f1, _ = _f1(*_scores(codes, labels, n_codes, n_states))
    return f1[torch.arange(n_states), choice.long()]


def _by(what: str):
    def wrong(codes, labels, n_codes, n_states):
        hits, fires, count = _scores(codes, labels, n_codes, n_states, labelled_only=what == "labelled")
        f1, p = _f1(hits, fires, count)
        choice = {"count": hits, "precision": p, "labelled": f1}[what].argmax(1)
        return _chosen_f1(choice, codes, labels, n_codes, n_states)

    return wrong


CODE_MISTAKES = [
    Mistake("you used the code's activation count, not its precision: you picked the code that fires most often on "
            "the state", "a code that fires on everything wins that; rank by F1 = 2PR / (P + R) with precision = hits / "
            "(tokens where the code fires) and recall = hits / (tokens of the state)", _by("count")),
    Mistake("you ranked by precision alone: a code that fired once, on the state, has precision 1",
            "rank by F1, which also asks for recall", _by("precision")),
    Mistake("you counted a code's firings only on labelled tokens", "precision divides by every token where the code "
            "fires, BOS and first digits included: a code that also fires elsewhere is a worse detector", _by("labelled")),
]  # fmt: skip


@chapter.exercise("3.4", "best_state_codes", goal="find the code that best detects each FSM state (F1)", difficulty=2, minutes=20)
def check_best_state_codes(best_state_codes) -> str:
    m, (ids, codes) = fsm(), fsm_codes()
    labels = ref_state_labels(ids, m)
    C = codebook_model().layer(MLP[2]).cfg.n_codes
    cases = [(f"the codes of {MLP[2]} on 24 sequences of 128 tokens", codes[MLP[2]], labels),
             (f"the codes of {MLP[3]} on the same", codes[MLP[3]], labels),
             (f"the codes of {MLP[1]} on 8 of them", codes[MLP[1]][:8], labels[:8])]  # fmt: skip
    for case, c, lab in cases:
        args = (c, lab, C, m.n_states)
        got = call(best_state_codes, c.clone(), lab.clone(), C, m.n_states, case=case)
        got = got if isinstance(got, Tensor) else torch.as_tensor(got.tolist() if hasattr(got, "tolist") else got)
        if got.shape != (m.n_states,) or got.is_floating_point() or int(got.min()) < 0 or int(got.max()) >= C:
            raise CheckFailed(f"on {case}: expected one code id per state, an integer tensor of shape [{m.n_states}] with "
                              f"ids in [0, {C}); got {got.dtype} of shape {list(got.shape)}")  # fmt: skip
        want = _chosen_f1(ref_best_state_codes(*args), *args)
        compare(_chosen_f1(got, *args), want, case=f"{case} (compared: the F1 of the code you chose for each state)",
                args=args, mistakes=CODE_MISTAKES)  # fmt: skip
    return f"a code of best F1 for every state, as best_code_per_label, on {len(cases)} inputs"


# ----------------------------------------------------------------------------- 3.5 forcing codes


def state_codes_of(state: int) -> dict[str, int]:
    """The code each MLP codebook fires on the state's second digit (after BOS and its first digit): site -> code."""
    ids = torch.tensor([[fsm().special_id, *fsm().encode([state]).tolist()]])
    with torch.no_grad():
        out = codebook_model().run(ids).outputs
    return {site: int(out[site].codes[0, 2, 0]) for site in MLP}


def _next(cb, state: int, forced: dict, *, positions=(2,), first: bool = True, order: str = "ab") -> Tensor:
    """The next-state distribution [S] with `forced` codes on the state's second digit, and the knobs of its mistakes."""
    m = fsm()
    prefix = torch.tensor([m.special_id, *m.encode([state]).tolist()])
    batch = torch.cat([prefix.repeat(10, 1), torch.arange(10)[:, None]], 1)  # BOS s1 s2 a, for each first digit a
    edits = [ForceCodes(site, cb.layer(site), (int(code),), positions=None if positions is None else list(positions))
             for site, code in forced.items()]  # fmt: skip
    with torch.no_grad():
        logits = cb.run(batch, edits).logits[:, -2:].float()
    probs = logits.softmax(-1)[..., :10]  # over the whole vocabulary, as first_transition_accuracy
    joint = (probs[0, 0][:, None] if first else 1.0) * probs[:, 1]  # [a, b]: p(a) p(b | a)
    return (joint if order == "ab" else joint.T).reshape(100)[: m.n_states]


def ref_forced_next_states(cb, state: int, forced: dict) -> Tensor:
    return _next(cb, state, forced)


FORCE_MISTAKES = [
    Mistake("you forced the code at every position", "force it on the state's second digit only: ForceCodes(..., positions=[2])",
            lambda cb, s, f: _next(cb, s, f, positions=None)),
    Mistake("you forced the code on the last position, the next state's first digit",
            "the state is completed at position 2 (BOS, first digit, second digit): positions=[2]",
            lambda cb, s, f: _next(cb, s, f, positions=(-1,))),
    Mistake("you forced the code on the state's first digit (off by one)", "position 0 is BOS: the second digit is at 2",
            lambda cb, s, f: _next(cb, s, f, positions=(1,))),
    Mistake("your forcing never reached the model: this is the unforced distribution",
            "pass the edits to the run: cb.run(ids, [ForceCodes(site, cb.layer(site), (code,), positions=[2]), ...])",
            lambda cb, s, f: _next(cb, s, {})),
    Mistake("you left out p(first digit)", "p(next = ab) = p(a | BOS s) p(b | BOS s a): multiply by the first digit's "
            "probability, read at position 2", lambda cb, s, f: _next(cb, s, f, first=False)),
    Mistake("your states are transposed: state ab is 10 a + b", "index the joint [a, b] (first digit, second digit) "
            "before flattening", lambda cb, s, f: _next(cb, s, f, order="ba")),
]  # fmt: skip


@chapter.exercise("3.5", "forced_next_states", goal="force codes on a state and return the model's next-state distribution",
                  difficulty=2, minutes=15)  # fmt: skip
def check_forced_next_states(forced_next_states) -> str:
    cb = codebook_model()
    c47, c15 = state_codes_of(47), state_codes_of(15)
    cases = [(f"state 40, {MLP[2]} forced to state 47's code {c47[MLP[2]]}", 40, {MLP[2]: c47[MLP[2]]}),
             ("state 12, every MLP codebook forced to state 15's codes", 12, c15),
             ("state 63, nothing forced", 63, {})]  # fmt: skip
    for case, state, forced in cases:
        got = call(forced_next_states, cb, state, dict(forced), case=case)
        compare(got, ref_forced_next_states(cb, state, forced), case=case, args=(cb, state, forced), mistakes=FORCE_MISTAKES,
                atol=1e-5)  # fmt: skip
    return f"equals CodebookModel.run with ForceCodes on the second digit on {len(cases)} inputs"


def forcing_figure(state: int = 40, target: int = 47, next_states_fn=None) -> go.Figure:
    """The next-state distribution of `state` before and after forcing `target`'s codes in every MLP codebook, with
    both states' out-edges marked: the expected picture of 3.5. `next_states_fn` is a forced_next_states (None: the
    reference)."""
    fn = ref_forced_next_states if next_states_fn is None else next_states_fn
    cb = codebook_model()
    before = torch.as_tensor(fn(cb, state, {})).tolist()
    after = torch.as_tensor(fn(cb, state, state_codes_of(target))).tolist()
    return next_state_bars(before, after, fsm().edges[state], fsm().edges[target],
                           title=f"state {state:02d}, its second digit's MLP codes forced to state {target:02d}'s")


__all__ = ["chapter", "check_code_similarities", "check_codebook_snap", "check_state_labels", "check_best_state_codes",
           "check_forced_next_states", "forcing_figure", "ref_state_labels", "codebook_model", "fsm", "fsm_codes", "state_codes_of", "MLP",
           "MODEL", "CheckFailed"]  # fmt: skip
