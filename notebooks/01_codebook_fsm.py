# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# # Codebook features on a finite-state machine
# > Reproduce, at small scale, the TokFSM results of Tamkin, Taufeeque & Goodman (2023): codebooks keep the model accurate, single codes stand for FSM states, and patching codes moves the model to another state.

# %% [markdown]
# **The task.** TokFSM is a random finite-state machine with 100 states, each with 10 out-edges. A state is written as two digit tokens, so a sequence is `BOS 4 7 0 3 9 1 ...`. The shipped `tokfsm` model (4-layer GPT-NeoX) predicts valid next states.
#
# **Codebooks.** A codebook layer replaces an activation `a` by the sum of the `k` codes (out of `C`) most cosine-similar to `LayerNorm(a)`:
#
#     ids = topk_k cos(LN(a), c_j)        out = sum_{j in ids} c_j
#
# with a straight-through gradient. The zoo's codebook models were finetuned from `tokfsm` with codebooks inserted through the site layer (the model's code is never edited): one codebook per attention head on `blocks.{i}.attn.hook_z` and one on each MLP output `blocks.{i}.hook_mlp_out`, `C = 1000`. Since a layer's output *is* one of its codes when `k = 1`, every activation the model passes on is a discrete, nameable code.

# %%
import time
import numpy as np, pandas as pd, torch, plotly.express as px, plotly.graph_objects as go
from nbfeatures import FSMPanel, sites, zoo
from nbfeatures.data import TokFSM, first_transition_accuracy, transition_accuracy
from nbfeatures.codebook import NeuronBaseline, PatchCodes, best_code_per_label, codes_frame, collect_codes, load_codebook_model

t0 = time.perf_counter()
torch.manual_seed(0)
fsm = TokFSM()
base = zoo.load_model("tokfsm")
VARIANTS = ["tokfsm-codebook-attn", "tokfsm-codebook", "tokfsm-codebook-k4"]
cbs = {name: load_codebook_model(name) for name in VARIANTS}   # one call: finetuned model + codebooks
cb = cbs["tokfsm-codebook"]
L = sites.unwrap(base).config.num_hidden_layers
MLP = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
ATTN = [f"blocks.{i}.attn.hook_z" for i in range(L)]
print(cb.sites)


# %% [markdown]
# ## 1. Accuracy with and without codebooks
#
# Transition accuracy: continue real prefixes by sampling 8 new states; the fraction of valid transitions, measured live on 32 held-out prefixes (256 transitions) next to the card's value (256 prefixes, measured by the training script on the shipped folder). First-transition accuracy: for each state, the overlap of the model's top-10 next states with its true out-edges. The rows follow the paper's Table 1: the base model; attention codebooks only, k = 1 (paper: 96.4% vs 96.8% without codebooks); attention + MLP codebooks at k = 1 (paper: 63.7%) and k = 4 (paper: 80.7%). Ours are finetunes of the trained `tokfsm` with the same budget (600 steps of 32 sequences each), not models trained from scratch. Each codebook model is also measured with its codebooks switched off (from its card): its finetuned weights have come to rely on them.

# %%
def logits_fn(m):
    def run(ids):
        with torch.no_grad():
            return m.run(ids).logits.float()
    return run

# Live, on held-out prefixes: transition accuracy of 32 prefixes x 8 sampled states (256 transitions; the cards
# hold the same measure on 256 prefixes), and first-transition accuracy (100 states x their top-10 next states).
live = lambda run: transition_accuracy(run, fsm, n=32, seed=20_000)  # noqa: E731
rows = [{"model": "tokfsm", "codebooks": "none", "k": None, "finetune steps": 0,
         "transition acc": live(sites.unwrap(base)),
         "transition acc (card)": zoo.card("tokfsm")["metrics"]["transition_accuracy"],
         "first-transition acc": first_transition_accuracy(sites.unwrap(base), fsm)}]
for name, m in cbs.items():
    card = zoo.card(name)
    r = card["recipe"]
    rows.append({"model": name, "codebooks": "attn + MLP" if r["mlp"] else "attn only", "k": r["k"], "finetune steps": r["steps"],
                 "transition acc": live(logits_fn(m)),
                 "transition acc (card)": card["metrics"]["transition_accuracy"],
                 "first-transition acc": first_transition_accuracy(logits_fn(m), fsm),
                 "first-transition acc, codebooks off (card)": card["metrics"]["no_codebooks_first_transition_accuracy"]})
acc = pd.DataFrame(rows).set_index("model")
acc

# %% [markdown]
# Attention-only codebooks at k = 1 cost nothing measurable, as in the paper. Attention + MLP codebooks at k = 1 cost a few points, far fewer than the paper's drop to 63.7%: finetuning a trained model is gentler than training from scratch with the bottleneck. At equal finetuning, k = 4 lands where k = 1 does (within a point), so the paper's recovery with larger k has no room to show at this scale: we measured both and report them, the recovery is not reproduced.

# %%
fig = px.bar(acc.reset_index(), x="model", y=["transition acc", "first-transition acc"], barmode="group",
             title="TokFSM accuracy with and without codebooks", range_y=[0, 1.05])
fig.update_layout(height=330, template="plotly_white", legend_title_text="")
fig

# %% [markdown]
# ## 2. State codes
#
# Which code fires on each state's second digit? We collect the codes of the attention+MLP `k = 1` model on held-out trajectories, label every token that is the second digit of state `s` with `s`, and for each of the 100 states take the MLP code that detects it best (by F1 of precision and recall, over all MLP layers). The per-token codes are also available as a DataFrame:

# %%
ids = fsm.sample(48, seed=123)
codes = collect_codes(cb, ids)                      # site -> [B, T, (G,) K]
toks = [[fsm.text([t]) if t != fsm.special_id else "⟨bos⟩" for t in row] for row in ids[:1].tolist()]
codes_frame({s: codes[s][:1, :9] for s in MLP}, tokens=[r[:9] for r in toks]).pivot(index=["pos", "token"], columns="site", values="code")

# %%
T = ids.shape[1]
pos = torch.arange(T)
labels = torch.full(ids.shape, -1)                # state s on its second digit (positions 2, 4, ...), -1 elsewhere
second = (pos >= 2) & (pos % 2 == 0)
labels[:, second] = fsm.decode(ids)[:, : int(second.sum())]
mlp_codes = torch.stack([codes[s] for s in MLP], 2)  # layers as groups: [B, T, L, K]
state_codes = best_code_per_label(mlp_codes, labels, cb.layer(MLP[0]).cfg.n_codes, n_labels=fsm.n_states).rename(columns={"group": "layer"})
state_codes.head()

# %% [markdown]
# The neuron baseline: every MLP hidden neuron and every MLP output dimension of every layer (either sign), thresholded so that it fires on the same fraction of the state's tokens as its code does; the best precision among them.

# %%
with torch.no_grad():
    run = cb.run(ids, read=[f"blocks.{i}.mlp.hook_post" for i in range(L)])
neurons = torch.cat([run.acts[f"blocks.{i}.mlp.hook_post"] for i in range(L)] + [run.outputs[s].target for s in MLP], -1)
baseline = NeuronBaseline(neurons.reshape(-1, neurons.shape[-1]))   # [tokens, 4 x 512 hidden + 4 x 128 outputs]
flat = labels.reshape(-1)
best_neuron = [baseline(flat == s, float(max(rec, 1e-3))).precision.iloc[0] for s, rec in zip(state_codes.label, state_codes.recall)]
state_codes["best neuron precision"] = best_neuron
summary = {"code precision": state_codes.precision.mean(), "code recall": state_codes.recall.mean(),
           "best neuron precision at matched recall": np.mean(best_neuron)}
print({k: round(float(v), 3) for k, v in summary.items()})

# %%
fig = go.Figure([go.Histogram(x=state_codes.precision, name="state code", opacity=0.7, xbins=dict(size=0.05)),
                 go.Histogram(x=state_codes["best neuron precision"], name="best neuron, same recall", opacity=0.7, xbins=dict(size=0.05))])
fig.update_layout(barmode="overlay", title="precision of the 100 state codes vs the best neuron", xaxis_title="precision",
                  yaxis_title="states", height=320, template="plotly_white")
fig


# %% [markdown]
# ## 3. Patching codes moves the model to another state
#
# For random pairs (a, b): run a context ending in state `a`, and at its last position replace the codes of some codebooks by those that a context ending in state `b` chose there. The Jensen-Shannon divergence between the patched next-token distribution and `b`'s own, divided by the unpatched divergence, is 1 with no patch and 0 if the patch fully turns the model into state `b`.

# %%
def jsd(p, q):
    m = (p + q) / 2
    kl = lambda x, y: (x * (x.clamp_min(1e-12).log() - y.clamp_min(1e-12).log())).sum(-1)
    return (kl(p, m) + kl(q, m)) / 2

ctx = fsm.sample(128, seed=321)[:, : 1 + 2 * 8]      # BOS + 8 states; the last state is a
a_ids = ctx
b_ids = ctx.roll(1, 0)                               # another row's context, ending in another state b
with torch.no_grad():
    a_run, b_run = cb.run(a_ids), cb.run(b_ids)
p_b = b_run.logits[:, -1].softmax(-1)
a_states, b_states = fsm.decode(a_ids)[:, -1], fsm.decode(b_ids)[:, -1]
keep = a_states != b_states
patch_sets = {"none": [], **{f"MLP layer {i}": MLP[i:i + 1] for i in range(L)}, "all attention": ATTN, "all MLP": MLP,
              "all attention + MLP": ATTN + MLP}
base_jsd = jsd(a_run.logits[:, -1].softmax(-1), p_b)[keep].mean()
norm_jsd = {}
for label, patch in patch_sets.items():
    edits = [PatchCodes(s, cb.layer(s), b_run.outputs[s].codes[:, -1], positions=[-1]) for s in patch]
    with torch.no_grad():
        p = cb.run(a_ids, edits).logits[:, -1].softmax(-1)
    norm_jsd[label] = float(jsd(p, p_b)[keep].mean() / base_jsd)
print({k: round(v, 3) for k, v in norm_jsd.items()})
fig = px.bar(x=list(norm_jsd), y=list(norm_jsd.values()), labels={"x": "codes patched at the last position", "y": "normalised JSD"},
             title=f"patching state b's codes into a context ending in a ({int(keep.sum())} pairs)")
fig.update_layout(height=320, template="plotly_white")
fig


# %% [markdown]
# ## 4. Probe it yourself
#
# Pick a state: the table lists the codes its two digits fire, per codebook. Pick a code to force on the state's second digit at one MLP layer (or copy another state's code at that layer, or choose "all sites" to force that state's codes at every MLP layer): the bars show the next-state distribution before (grey) and after (orange), the true out-edges of the state (▼) and of the state whose codes were copied (◆).

# %%
def state_codes_of(s):
    with torch.no_grad():
        out = cb.run(torch.tensor([[fsm.special_id, *fsm.encode([s]).tolist()]])).outputs
    table = {}
    for site in cb.sites:
        c = out[site].codes[0, 1:3, ..., 0]              # [2 digits, (G)]
        if c.dim() == 2:
            table.update({f"L{site.split('.')[1]} attn h{h}": (int(c[0, h]), int(c[1, h])) for h in range(c.shape[1])})
        else:
            table[f"L{site.split('.')[1]} MLP"] = (int(c[0]), int(c[1]))
    return table

LABELS = list(state_codes_of(0))                     # "L0 attn h0", ..., "L3 MLP": every codebook (heads one by one)

def site_of(label):
    layer, kind = int(label[1]), label.split()[1]
    return (ATTN if kind == "attn" else MLP)[layer], (int(label.split("h")[-1]) if kind == "attn" else None)

def next_states(s, forced):
    prefix = torch.tensor([fsm.special_id, *fsm.encode([s]).tolist()])
    batch = torch.cat([prefix.repeat(10, 1), torch.arange(10)[:, None]], 1)   # BOS s1 s2 a, for each first digit a
    with torch.no_grad():
        natural = cb.run(batch).outputs
        edits = {}
        for label, code in forced.items():                                  # one edit per site: the natural codes, some replaced
            site, head = site_of(label)
            ids = edits[site].codes if site in edits else natural[site].codes[:, 2].clone()
            if head is None:
                ids[:, 0] = code            # MLP: [rows, k]
            else:
                ids[:, head, 0] = code      # attention: [rows, heads, k]
            edits[site] = PatchCodes(site, cb.layer(site), ids, positions=[2])
        probs = cb.run(batch, list(edits.values())).logits[:, -2:].softmax(-1)
    p = probs[:, 0, :10][0][:, None] * probs[:, 1, :10]                        # p(a) p(b | a)
    return p.reshape(100)[: fsm.n_states].numpy()

panel = FSMPanel(state_codes_of, next_states, fsm.edges, LABELS, n_codes=cb.layer(MLP[0]).cfg.n_codes, state=40)
panel.source.value = 7
panel.site.value = "all sites"     # state 07's codes in every codebook; pick one codebook to force a single code
panel.force()
panel


# %% [markdown]
# Where the next-state mass goes when state 07's codes are forced into state 40's second digit: in every codebook, in all MLP codebooks, in one MLP layer at a time. The first digit `4` still sits one position earlier, unforced, and the second digit of the next state is read from both positions, so forcing takes the mass off 40's out-edges but only part of it lands on 07's: the rest goes to states that are neither. Compare section 3: there every codebook (every head's too) gets the exact codes another context chose at that position, and the patched model follows that context almost exactly; here each codebook gets one code picked by its label, a blunter tool.

# %%
def mass(p, s): return float(p[fsm.edges[s]].sum())
seven = state_codes_of(7)
forcing = {"none": next_states(40, {}), "every codebook": panel.after}
forcing |= {"all MLP layers": next_states(40, {l: seven[l][1] for l in LABELS if "MLP" in l})}
forcing |= {label: next_states(40, {label: seven[label][1]}) for label in LABELS if "MLP" in label}
forcing = pd.DataFrame({"P(out-edge of 40)": {k: mass(p, 40) for k, p in forcing.items()},
                        "P(out-edge of 07)": {k: mass(p, 7) for k, p in forcing.items()}})
forcing.round(3)

# %% [markdown]
# ## Checks
# The numbers above, asserted (thresholds measured on these shipped models, with margin).

# %%
print(acc.round(3).to_string()); print(summary); print(norm_jsd); print(forcing.round(3).to_string()); print(f"{time.perf_counter() - t0:.0f} s")
# Table 1 at small scale (measured live: base 1.000, attn-only k=1 0.992, attn+MLP k=1 0.953, k=4 0.95)
ta = acc["transition acc"]
assert ta["tokfsm"] >= 0.97 and acc.loc["tokfsm", "first-transition acc"] >= 0.95
assert ta["tokfsm-codebook-attn"] >= ta["tokfsm"] - 0.03  # attention codebooks: as accurate as the base model
assert ta["tokfsm-codebook"] < ta["tokfsm-codebook-attn"] and ta["tokfsm-codebook"] >= 0.90  # + MLP: drops more
assert abs(ta["tokfsm-codebook-k4"] - ta["tokfsm-codebook"]) <= 0.04 and acc.loc["tokfsm-codebook-k4", "first-transition acc"] >= 0.90
assert (acc["transition acc"] - acc["transition acc (card)"]).abs().max() <= 0.05  # live and card agree
assert summary["code precision"] >= 0.90
assert summary["code precision"] - summary["best neuron precision at matched recall"] >= 0.15
assert norm_jsd["none"] == 1.0
assert norm_jsd["all MLP"] <= 0.40 and norm_jsd["all MLP"] < norm_jsd["MLP layer 1"]
assert norm_jsd["all attention + MLP"] <= norm_jsd["all MLP"] + 0.05
# forcing 07's state codes takes the mass off 40's out-edges (measured 0.96 -> 0.10 in every codebook, 0.20 in the
# MLP codebooks) and about doubles 07's (0.10 -> 0.20): the unforced first digit still points elsewhere
assert forcing.loc["every codebook", "P(out-edge of 40)"] < 0.3 * forcing.loc["none", "P(out-edge of 40)"]
assert forcing.loc["all MLP layers", "P(out-edge of 40)"] < 0.4 * forcing.loc["none", "P(out-edge of 40)"]
assert forcing.loc["every codebook", "P(out-edge of 07)"] > 1.5 * forcing.loc["none", "P(out-edge of 07)"]
