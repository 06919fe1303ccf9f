# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3: Codebook features
# > Write the codebook layer's cosine search and its straight-through snap, find the codes that stand for the states of a finite-state machine, and force one state's codes into another to watch the model's next-state distribution move.

# %% [markdown]
# Each exercise states its goal, a difficulty (●○○ easy to ●●● hard) and a time. Replace the `raise NotImplementedError` of its stub with your code and run the check cell under it. A check prints one line when your function gives the library's answer, or raises `CheckFailed` naming the mistake it recognised and how to fix it; until you have written the function it prints `not implemented yet`. Hints and solutions are folded under each stub. The panel below ticks each exercise as its check passes.
#
# A **codebook** (Tamkin, Taufeeque & Goodman 2023) replaces an activation by a few vectors from a finite set: each token's activation is normalised, compared with all C codes by cosine similarity, and replaced by the sum of the k most similar codes. With k = 1, everything the model passes on at that site is one of C discrete, nameable codes.
#
# The model is `tokfsm-codebook`: a 4-layer GPT-NeoX trained on TokFSM, a random finite-state machine of 100 states, each with 10 out-edges, a state written as two digit tokens (`BOS 4 7 0 3 ...` is state 47 then state 03). It was finetuned with a codebook of 1000 codes, k = 1, on every MLP output (`blocks.{i}.hook_mlp_out`) and every attention head. The codebooks are spliced in through the site layer: the model's code is never edited.

# %%
import torch
import torch.nn.functional as F
import nbfeatures as nbf
from nbfeatures.data import TokFSM
from nbfeatures.course import ch3_codebook as ch3
from nbfeatures.widgets import CourseProgress

cb = nbf.load_codebook_model("tokfsm-codebook")
fsm = TokFSM()
MLP = [f"blocks.{i}.hook_mlp_out" for i in range(4)]
CourseProgress(ch3.chapter)

# %% [markdown]
# ## 3.1 Cosine similarity with every code
# > **Goal:** return the cosine similarity [N, C] of each token's LayerNorm(x) with each code.
#
# **Difficulty** ●○○ · **about 10 minutes**
#
# The layer first normalises its input with a LayerNorm without learned parameters, `xn = F.layer_norm(x, (E,))` (subtract each token's mean, divide by its standard deviation), then compares `xn` with every code c by cos(xn, c) = xn · c / (|xn| |c|). Codes are not unit vectors (their norms are learned), so both sides must be normalised.

# %% tags=["stub"]
def code_similarities(x_NE, codebook_CE):
    """cos(LayerNorm(x_n), c) for every token n and code c: [N, C]."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `F.normalize(v, dim=-1)` divides each row by its norm. Then one matrix product: `F.normalize(xn, dim=-1) @ F.normalize(codebook_CE, dim=-1).T`.

# %% tags=["solution"]
def code_similarities(x_NE, codebook_CE):
    """cos(LayerNorm(x_n), c) for every token n and code c: [N, C]."""
    xn_NE = F.layer_norm(x_NE, (x_NE.shape[-1],))
    return F.normalize(xn_NE, dim=-1) @ F.normalize(codebook_CE, dim=-1).T


# %% tags=["check"]
ch3.check_code_similarities(code_similarities)

# %% [markdown]
# ## 3.2 The snap, with a straight-through gradient
# > **Goal:** replace each token by the sum of its k most similar codes, with gradients to the input (straight through) and to the chosen codes.
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# Choosing the top k is not differentiable: the chosen ids have no gradient. The straight-through estimator pretends, on the way back, that the snap was the identity on `xn`: the output's value is the codes' sum, its gradient flows to `xn` unchanged (and on through the LayerNorm to `x`). The trick is one line, `out = codes_sum + (xn - xn.detach())`, whose second term is zero in value and the identity in gradient. The codes themselves get their gradient through the lookup, so only the chosen codes learn. The library's `CodebookLayer` (nbfeatures/codebook/layer.py) does exactly this; the checker compares your output and both gradients with it.

# %% tags=["stub"]
def codebook_snap(x_NE, codebook_CE, k):
    """Sum of the k codes most cosine-similar to LayerNorm(x), [N, E]; gradient straight through to LayerNorm(x)."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `ids_NK = code_similarities(x_NE, codebook_CE).topk(k, dim=-1).indices`; `codebook_CE[ids_NK]` is [N, K, E], sum over K. Add `xn - xn.detach()` with `xn = F.layer_norm(x_NE, (E,))`. Do not detach the codebook in the lookup.

# %% tags=["solution"]
def codebook_snap(x_NE, codebook_CE, k):
    """Sum of the k codes most cosine-similar to LayerNorm(x), [N, E]; gradient straight through to LayerNorm(x)."""
    xn_NE = F.layer_norm(x_NE, (x_NE.shape[-1],))
    ids_NK = code_similarities(x_NE, codebook_CE).topk(k, dim=-1).indices
    codes_NE = codebook_CE[ids_NK].sum(-2)
    return codes_NE + (xn_NE - xn_NE.detach())  # value: the codes; gradient: straight through to xn


# %% tags=["check"]
ch3.check_codebook_snap(codebook_snap)

# %% [markdown]
# The library's layer on real inputs: run the model on a trajectory and read what each MLP codebook chose. `cb.run(ids).outputs[site]` is the site's `CodebookOutput` (codes, cosine similarities, the normalised input); `nbf.codebook.collect_codes` collects the codes of every site over many sequences, [B, T, K] (attention sites: [B, T, heads, K]).

# %%
ids = fsm.sample(24, seed=123)  # 24 trajectories of 128 tokens
codes = nbf.codebook.collect_codes(cb, ids)
first = ids[0, :9].tolist()
print("tokens:            ", ["BOS" if t == fsm.special_id else t for t in first])
for site in MLP:
    print(f"{site}:", codes[site][0, :9, 0].tolist())

# %% [markdown]
# ## 3.3 Which token completes a state?
# > **Goal:** label every token that completes an FSM state with that state (0..99), and every other token with −1.
#
# **Difficulty** ●○○ · **about 10 minutes**
#
# A sequence is `BOS d d d d ...`: position 0 is BOS, and state j is written by the digits at positions 2j + 1 and 2j + 2. The model only knows which state it is in once it has read the second digit, so that is where a *state code* should fire. `fsm.decode(ids_BT)` turns token ids into the states [B, S] (dropping BOS and a final half state).

# %% tags=["stub"]
def state_labels(ids_BT, fsm):
    """Labels [B, T]: state j on its second digit (position 2j + 2), -1 on every other token."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `states_BS = fsm.decode(ids_BT)`; start from `torch.full(ids_BT.shape, -1)` and write `labels[:, 2 : 2 + 2 * S : 2] = states_BS`.

# %% tags=["solution"]
def state_labels(ids_BT, fsm):
    """Labels [B, T]: state j on its second digit (position 2j + 2), -1 on every other token."""
    states_BS = fsm.decode(ids_BT)
    labels_BT = torch.full(ids_BT.shape, -1, dtype=torch.long)
    labels_BT[:, 2 : 2 + 2 * states_BS.shape[1] : 2] = states_BS
    return labels_BT


# %% tags=["check"]
ch3.check_state_labels(state_labels)

# %% [markdown]
# ## 3.4 State codes
# > **Goal:** for every state, the code (at one site) that best detects it: the highest F1 of precision and recall.
#
# **Difficulty** ●●○ · **about 20 minutes**
#
# A code *detects* state s when it fires on the tokens labelled s and nowhere else. For each state s and code c, with hits = the tokens labelled s on which c fired:
#
#     precision = hits / (tokens where c fired, anywhere)       recall = hits / (tokens labelled s)
#     F1 = 2 · precision · recall / (precision + recall)
#
# A code that fires on every token has perfect recall and a code that fired once, on s, perfect precision; F1 asks for both. Return one code id per state, [S]. (If two codes tie, either passes.)

# %% tags=["stub"]
def best_state_codes(codes_BTK, labels_BT, n_codes, n_states):
    """The code of best F1 for each state, [n_states]; codes_BTK [B, T, K] from one codebook, labels_BT from 3.3."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# Make a one-hot `fires_NC = torch.zeros(N, n_codes).scatter_(1, codes_BTK.reshape(N, -1), 1.0)`. Then `hits_SC = torch.zeros(n_states, n_codes).index_add_(0, labels[on], fires_NC[on])` with `on = labels >= 0`, `fires_C = fires_NC.sum(0)` over *all* tokens, and `count_S = torch.bincount(labels[on], minlength=n_states)`. Guard the divisions with `.clamp_min(1)` and take `argmax(1)` of F1.

# %% tags=["solution"]
def best_state_codes(codes_BTK, labels_BT, n_codes, n_states):
    """The code of best F1 for each state, [n_states]; codes_BTK [B, T, K] from one codebook, labels_BT from 3.3."""
    labels_N = labels_BT.reshape(-1)
    fires_NC = torch.zeros(len(labels_N), n_codes).scatter_(1, codes_BTK.reshape(len(labels_N), -1), 1.0)
    on = labels_N >= 0
    hits_SC = torch.zeros(n_states, n_codes).index_add_(0, labels_N[on], fires_NC[on])
    precision_SC = hits_SC / fires_NC.sum(0).clamp_min(1)  # over every token the code fired on
    recall_SC = hits_SC / torch.bincount(labels_N[on], minlength=n_states).clamp_min(1)[:, None]
    f1_SC = 2 * precision_SC * recall_SC / (precision_SC + recall_SC).clamp_min(1e-12)
    return f1_SC.argmax(1)


# %% tags=["check"]
ch3.check_best_state_codes(best_state_codes)

# %% [markdown]
# The library's answer for every MLP codebook (`nbf.codebook.best_code_per_label`, which also reports each code's precision and recall): layer 0's codebook uses about ten codes in all, too few to name 100 states; by layer 2 most states have a code of precision above 0.9, and the codes' mean recall is above 0.9 too. The paper reports state codes of 97% mean precision against 70% for the best single neuron at the same recall (notebooks/01_codebook_fsm.py measures that baseline).

# %%
labels = ch3.ref_state_labels(ids, fsm)
tables = {site: nbf.codebook.best_code_per_label(codes[site], labels, 1000, n_labels=fsm.n_states) for site in MLP}
summary = {site: t[["precision", "recall"]].mean().round(3).to_dict() for site, t in tables.items()}
summary

# %% [markdown]
# ## 3.5 Force a code, watch the next state move
# > **Goal:** force codes on a state's second digit and return the model's distribution over the next state, [S].
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# If a code stands for a state, writing it in should make the model behave as if it were in that state. The library's edit `nbf.ForceCodes(site, cb.layer(site), (code,), positions=[2])` makes one codebook output `code` at position 2 (the state's second digit) of every sequence; `cb.run(ids, edits)` runs the model with it (and the other codebooks as usual).
#
# The next state is two tokens, so its distribution takes two positions: run the 10 sequences `BOS s₁ s₂ a`, one per first digit a. Position 2 gives p(a | BOS s), position 3 gives p(b | BOS s a), over the whole vocabulary (digits and BOS); the next state ab = 10a + b has probability p(a) p(b | a).

# %% tags=["stub"]
def forced_next_states(cb, state, forced):
    """P(next state) [S] for a context ending in `state`, with forced = {site: code} forced on its second digit."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `prefix = [fsm.special_id, *fsm.encode([state]).tolist()]`; `batch = torch.cat([torch.tensor(prefix).repeat(10, 1), torch.arange(10)[:, None]], 1)`. `probs = cb.run(batch, edits).logits[:, -2:].softmax(-1)[..., :10]` is [10, 2, 10]: `probs[0, 0]` is p(a), `probs[:, 1]` is p(b | a) with a along the rows. Multiply, flatten (row a, column b gives state 10a + b).

# %% tags=["solution"]
def forced_next_states(cb, state, forced):
    """P(next state) [S] for a context ending in `state`, with forced = {site: code} forced on its second digit."""
    prefix = torch.tensor([fsm.special_id, *fsm.encode([state]).tolist()])
    batch = torch.cat([prefix.repeat(10, 1), torch.arange(10)[:, None]], 1)  # BOS s1 s2 a, for each first digit a
    edits = [nbf.ForceCodes(site, cb.layer(site), (code,), positions=[2]) for site, code in forced.items()]
    with torch.no_grad():
        probs = cb.run(batch, edits).logits[:, -2:].softmax(-1)[..., :10]  # [a, position, digit]
    p_ab = probs[0, 0][:, None] * probs[:, 1]  # p(a) p(b | a), [10, 10]
    return p_ab.reshape(100)[: fsm.n_states]


# %% tags=["check"]
ch3.check_forced_next_states(forced_next_states)

# %% [markdown]
# The expected picture, drawn by the reference: a context ending in state 40, whose second digit's code in every MLP codebook is replaced by the code state 47 fires there. Before (grey), the model puts its mass on 40's out-edges (▼); after (orange), much of it moves to 47's (◆). The first digit `4` is shared, so the forced codes tell the model the whole state; forcing a state with another first digit moves less (the unforced first digit still points elsewhere). Once your check passes, `ch3.forcing_figure(next_states_fn=forced_next_states)` draws it from your function.

# %%
fig = ch3.forcing_figure(40, 47)
fig

# %% [markdown]
# What this chapter showed, checked (with or without your solutions):

# %%
before, after = (torch.tensor(trace.y) for trace in fig.data[:2])
mass = lambda p, s: float(p[fsm.edges[s]].sum())  # noqa: E731
assert mass(before, 40) > 0.9 and mass(after, 40) < 0.4 * mass(before, 40)
assert mass(after, 47) > 4 * mass(before, 47)
assert summary[MLP[2]]["precision"] > 0.85 and summary[MLP[0]]["precision"] < 0.2
assert codes[MLP[2]].shape == (24, 128, 1)
ch3.chapter
