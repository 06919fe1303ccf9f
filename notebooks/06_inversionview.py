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
# # InversionView
# > Read what an activation encodes by sampling the inputs that produce it: a conditional decoder proposes inputs, the probed model checks them.

# %% [markdown]
# InversionView (Huang et al. 2024) defines the information in an activation `z` at a site as its **ε-preimage**: the inputs `x`
# whose activation at that site lies within ε of `z`,
#
#     D(f(x), z) = min over positions t of ||f(x)_t - z|| / ||z||        preimage = {x : D(f(x), z) <= ε}
#
# The set cannot be enumerated, so a small **decoder** `p(x | z, site)` is trained to write whole inputs given an activation
# (z and a learned site embedding go through residual MLP blocks and become one extra attended key/value slot in every
# decoder layer). Sampling draws candidates at several temperatures, **re-runs every candidate through the probed model** to get
# its true distance, and splits them into inside / outside ε. What the inside samples share is what `z` encodes; what varies
# among them is what it forgets. Each token is coloured by `log p(token | z) - log p(token | z_BOS)`: how much the query made
# the decoder choose it.
#
# The decoders used here ship in the zoo (`nbfeatures/zoo/<model>/inversion/`, trained on CPU by
# `python -m nbfeatures.recipes.train_inversion <model>`; see their cards below). Training draws a site per pair; with
# `rebalance` (the reference's intended scheme, which its release never applies) every few hundred steps the decoder's
# in-ε fraction is measured per site and sites it inverts badly get more pairs. A site can also be a **feature site**: a
# dictionary (an SAE, a codebook) read at a site, one latent at a time, so the decoder answers "which inputs make this
# feature fire like this?" by sampling rather than by searching a dataset.

# %%
import time
import numpy as np, pandas as pd, torch, plotly.graph_objects as go
import nbfeatures as nbf
from nbfeatures import InversionPanel, zoo
from nbfeatures.data import Counting, TokFSM
from nbfeatures.inversion import FeatureSite, load_decoder, panel_callables, read_sites, sample

torch.manual_seed(0)
task = Counting()
model = nbf.load_model("counting")
decoder = load_decoder(zoo.path("counting") / "inversion")
card = zoo.card(zoo.path("counting") / "inversion")
print("probed model:", zoo.card("counting")["metrics"], "| decoder:", card["pairs_seen"], "pairs in",
      card["wall_time_s_total"], "s of CPU training in two runs:")
for c in (card["warm_start"], card):
    print(f"  {c['train_config']['steps']} steps x {c['train_config']['batch_size']} pairs, {c['hardware']['torch_threads']} thread(s), "
          f"{c['wall_time_s_this_run']} s: {c['command']}")
print("decoder sites:", decoder.cfg.sites)

# %% [markdown]
# ## Counting: the count survives, the letter does not
#
# The probed model is a 2-layer, 1-head GPT-2 (d = 64) trained to read `letters|c:` and write how often `c` occurs.
# We query the output of the **second layer's attention at `:`**, the position where the model must answer, and sample 24
# candidates (8 each at temperatures 0.5, 1 and 2).

# %%
SITE, EPS = "blocks.1.hook_attn_out", 0.1
ids, colon, count = task.sample(1, seed=2026)
query, pos = ids[0, : int(colon[0]) + 2], int(colon[0])
t0 = time.perf_counter()
out = sample(decoder, model, SITE, query=query, position=pos, temperatures=(0.5, 1.0, 2.0), n_per_temperature=8, epsilon=EPS, seed=0)
print(f"query {task.text(query)!r} at position {pos} (':'); {out.inside_fraction:.0%} of 24 samples inside ε = {EPS} "
      f"({time.perf_counter() - t0:.1f} s including their re-runs through the model)")
show = [task.vocab[t] for t in range(task.vocab_size)]
nbf.plots.inversion_samples([[show[t] for t in row] for row in out.tokens[:20]], out.distance[:20].tolist(),
                  [c.tolist() for c in out.colour[:20]], out.position[:20].tolist(), EPS,
                  title=f"closest 20 of 24 samples for {task.text(query)!r} at ':' ({SITE})")


# %% [markdown]
# Over held-out queries: how many samples land inside ε and, among those, how many have the query's count (counted in the
# sample's letters), how many the query's letter, and how many make the probed model give the query's answer.

# %%
def model_answer(tokens):
    parts = task.parse(tokens)
    if parts is None:
        return None
    logits = nbf.run(model, torch.tensor([tokens])).logits[0, parts["colon"]]
    return int(logits.argmax()) - task.digit_id(0)

def study(site, n_queries=10, seed=7):
    ids, colon, count = task.sample(n_queries, seed=seed)
    rows = []
    for b in range(n_queries):
        q, p = ids[b, : int(colon[b]) + 2], int(colon[b])
        letter = task.parse(ids[b])["target"]
        s = sample(decoder, model, site, query=q, position=p, temperatures=(0.5, 1.0, 2.0), n_per_temperature=16, epsilon=EPS, seed=b)
        parsed = [task.parse(t) for t, k in zip(s.tokens, s.inside.tolist()) if k]
        ok = [x for x in parsed if x is not None]
        answers = [model_answer(t) for t, k in zip(s.tokens, s.inside.tolist()) if k and task.parse(t)]
        near = [x for x in map(task.parse, s.tokens[:8]) if x is not None]  # the 8 closest, whatever ε
        query_answer = model_answer(ids[b].tolist())
        rows.append({"query": task.text(ids[b]), "count": int(count[b]), "inside ε": s.inside_fraction,
                     **{f"inside ε, T={t}": float(s.inside[s.temperature == t].float().mean()) for t in (0.5, 1.0, 2.0)},
                     "same count": np.mean([x["true_count"] == count[b] for x in ok]) if ok else np.nan,
                     "same letter": np.mean([x["target"] == letter for x in ok]) if ok else np.nan,
                     "same model answer": np.mean([a == query_answer for a in answers]) if ok else np.nan,
                     "closest 8: same count": np.mean([x["true_count"] == count[b] for x in near]),
                     "closest 8: same letter": np.mean([x["target"] == letter for x in near])})
    return pd.DataFrame(rows)

counting = study(SITE)
counting

# %%
summary = counting.drop(columns=["query", "count"]).mean()
print(f"inside ε = {EPS}: {summary['inside ε']:.0%} of all samples; at temperature 0.5 / 1 / 2: "
      f"{summary['inside ε, T=0.5']:.0%} / {summary['inside ε, T=1.0']:.0%} / {summary['inside ε, T=2.0']:.0%}")
print(f"of the in-ε samples, {summary['same count']:.0%} keep the query's count "
      f"and {summary['same letter']:.0%} its letter (a random letter would match 1 in {task.n_letters}, a random count 1 in 9)")
print(f"the 8 closest samples of each query: {summary['closest 8: same count']:.0%} same count, {summary['closest 8: same letter']:.0%} same letter")

# %% [markdown]
# **Against the target.** The issue asks for at least 50% of samples inside ε = 0.1 on held-out queries. At temperature 1
# (the reference's own test metric) this decoder puts 45% of its samples inside on these 10 queries (39% +- 3% on 60 other
# held-out queries, 32 samples each: `benchmarks/inversion_in_eps.py`); over the three temperatures 36% (printed above). **The target is not met.** The decoder has seen 4.6 M (activation, input) pairs in two CPU runs
# (about 2.6 hours on one and two threads), against the reference's 100 M: 1 M uniform pairs gave 16.5% inside (8.5% at
# 512 k), and the second run's 3.6 M rebalanced pairs, most of them at the layer-1 sites, brought it to 36%. More
# decoder training is what is missing; the code does not change. What the reference found is clearly there: inside ε,
# 95% of the samples keep the query's count and 17% its letter; of the 8 samples closest to each query,
# 96% share its count (chance 1 in 9) and 24% its letter (chance 1 in 12).

# %% [markdown]
# How the decoder got there: its second run measured each site's in-ε fraction (16-32 held-out queries per site at the
# training positions, the target letter and `:`, temperature 1) every 500 steps and drew sites from
# softmax((mean - own) x 6), so the layer-1 sites, the hard ones, got most of the pairs.

# %%
curve = card["inside_curve"]
fig = go.Figure([go.Scatter(x=[s for s, _ in curve], y=[r[site] for _, r in curve], name=site, mode="lines+markers")
                 for site in decoder.cfg.sites])
fig.update_layout(title="in-ε fraction by site during the rebalanced run", xaxis_title="step", yaxis_title="inside ε = 0.1",
                  height=360, width=820)
fig.show()
weights = pd.DataFrame([w for _, w in card["site_weights_curve"]], columns=decoder.cfg.sites,
                       index=[s for s, _ in card["site_weights_curve"]])
weights.iloc[[0, len(weights) // 2, -1]].round(3)

# %% [markdown]
# ## TokFSM: the state survives, the history does not
#
# The shipped `tokfsm` model reads random walks on a 100-state machine written as 2-digit states. Its decoder was trained on
# the residual stream (before layer 0 and after every layer) of walks cut to BOS + 12 states, and on one feature site (below).
# We query the residual stream after the last layer at the second digit of the 6th state, mid-sequence.

# %%
fsm = TokFSM()
tmodel = nbf.load_model("tokfsm")
tdecoder = load_decoder(zoo.path("tokfsm") / "inversion")
tcard = zoo.card(zoo.path("tokfsm") / "inversion")
print("decoder:", tcard["pairs_seen"], "pairs in", tcard["wall_time_s_total"], "s of CPU training; sites:", tdecoder.cfg.sites)
TSITE, TPOS = "blocks.3.hook_resid_post", 12  # BOS, then state j at tokens 2j+1, 2j+2: position 12 ends state 5

def state_at(tokens, p):  # the state whose second digit is at position p
    return int(tokens[p - 1]) * 10 + int(tokens[p]) if p >= 2 and p % 2 == 0 else -1

trows = []
for b, q in enumerate(fsm.sample(6, seed=2026)[:, :25]):
    s = sample(tdecoder, tmodel, TSITE, query=q, position=TPOS, temperatures=(0.5, 1.0), n_per_temperature=16, epsilon=EPS, seed=b)
    inside = [(t, p) for t, p, k in zip(s.tokens, s.position.tolist(), s.inside.tolist()) if k]
    trows.append({"state": state_at(q, TPOS), "previous state": state_at(q, TPOS - 2), "inside ε": s.inside_fraction,
                  "same state": np.mean([state_at(t, p) == state_at(q, TPOS) for t, p in inside]) if inside else np.nan,
                  "same previous state": np.mean([state_at(t, p - 2) == state_at(q, TPOS - 2) for t, p in inside]) if inside else np.nan,
                  "same position": np.mean([p == TPOS for _, p in inside]) if inside else np.nan})
tokfsm = pd.DataFrame(trows)
tokfsm

# %%
tsummary = tokfsm[["inside ε", "same state", "same previous state", "same position"]].mean()
print(f"inside ε: {tsummary['inside ε']:.0%}; of those, {tsummary['same state']:.0%} end in the query's state, "
      f"{tsummary['same previous state']:.0%} come from its previous state, {tsummary['same position']:.0%} sit at its position")

# %% [markdown]
# ## Which inputs make the model choose this code?
#
# The TokFSM decoder has one more site: a **codebook** of 200 k-means codes read off the last residual stream (k = 1: every
# token's activation snaps to its one nearest code; the model itself is unchanged). As a feature site, z is the code's vector;
# a sample is inside ε when the code is chosen somewhere in it. The decoder never searched a dataset: it writes walks that
# make the residual stream land on that code. We check them against the FSM's ground truth: does the code's position in the
# sample hold the query's state?

# %%
folder = zoo.path("tokfsm") / "inversion"
layer = nbf.codebook.load_codebook_layer(folder / "codebook")  # fitted once by the recipe, saved with the decoder
TOKFSM_FEATURE_SITE = layer.meta["site"]
codebook = FeatureSite.from_codebook(layer, TOKFSM_FEATURE_SITE)
walks = fsm.sample(512, seed=2027)[:, :25]  # unconditioned baseline: how often does a random walk choose the code?
chosen = codebook.latents(read_sites(tmodel, walks, [TOKFSM_FEATURE_SITE])[TOKFSM_FEATURE_SITE])[:, 1:] > 0  # [N, T, C]
frows = []
for b, q in enumerate(fsm.sample(8, seed=2028)[:, :25]):
    s = sample(tdecoder, tmodel, codebook, query=q, position=TPOS, temperatures=(1.0,), n_per_temperature=32, seed=b)
    code = int(codebook.latents(read_sites(tmodel, q[None], [TOKFSM_FEATURE_SITE])[TOKFSM_FEATURE_SITE])[0, TPOS].argmax())
    inside = [(t, p) for t, p, k in zip(s.tokens, s.position.tolist(), s.inside.tolist()) if k]
    frows.append({"code": code, "query state": state_at(q, TPOS), "chosen in samples": s.inside_fraction,
                  "chosen in random walks": float(chosen[:, :, code].any(1).float().mean()),
                  "same state there": np.mean([state_at(t, p) == state_at(q, TPOS) for t, p in inside]) if inside else np.nan})
features = pd.DataFrame(frows)
features

# %%
fsummary = features.drop(columns=["code", "query state"]).mean()
print(f"the queried code is chosen in {fsummary['chosen in samples']:.0%} of the decoder's samples vs {fsummary['chosen in random walks']:.0%} "
      f"of random walks; where it is chosen, {fsummary['same state there']:.0%} of the samples hold the query's state there")

# %% [markdown]
# ## The panel
#
# Pick a query (letters, `|`, the letter to count, `:`), a site and a position (the queried token is highlighted), a temperature
# and ε. Samples are sorted by their true distance, with the ε line; the summary lists the tokens every in-ε sample shares,
# aligned at its matched position. Moving ε only redraws; the other controls sample again.

# %%
tok = task.tokenizer()
sample_fn, tokenize = panel_callables(decoder, model, task.vocab, lambda s: tok(s)["input_ids"], n_per_temperature=24)
panel = InversionPanel(sample_fn, tokenize, list(decoder.cfg.sites), query="abcbcbac|b:", site=SITE)
panel.run()
panel

# %% [markdown]
# What this notebook claims, checked:

# %%
print(summary.round(3).to_dict(), tsummary.round(3).to_dict(), fsummary.round(3).to_dict())
assert summary["inside ε, T=1.0"] >= 0.35              # measured 0.45 at temperature 1 (the target, 0.5, is NOT met)
assert summary["inside ε"] >= 0.3                     # measured 0.36 over temperatures 0.5 / 1 / 2 (16.5% after the first run)
assert summary["inside ε, T=0.5"] >= summary["inside ε, T=2.0"]       # hotter samples stray further
assert summary["closest 8: same count"] >= 0.6         # measured 0.96: the count is kept far more than chance (1/9) ...
assert summary["closest 8: same letter"] <= 0.3        # measured 0.24: ... the letter hardly (chance 1/12)
assert summary["same count"] >= 0.7 and summary["same count"] > 2 * summary["same letter"]  # measured 0.95 vs 0.17 inside ε
assert tsummary["inside ε"] >= 0.1 and tsummary["same state"] >= 0.9   # measured 0.219 and 1.0: TokFSM keeps the current state ...
assert tsummary["same previous state"] <= 0.4          # measured 0.189: ... and forgets the history
assert fsummary["chosen in samples"] >= 1.2 * fsummary["chosen in random walks"]  # measured 0.277 vs 0.183: the code steers the samples
assert fsummary["same state there"] >= 0.6             # measured 0.71: where the code is chosen, mostly in the query's state
assert "inside" in panel.status.value and len(panel.fig.data[1].x) == 24
