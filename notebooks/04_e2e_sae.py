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
# # End-to-end sparse dictionaries
# > Local, e2e and e2e+ds TopK SAEs on the shipped `stories` model: what each costs the model's predictions at the same sparsity, what they do to later layers, and how their decoders are arranged.

# %% [markdown]
# A *local* SAE is trained to reconstruct the activation at its site: MSE (here FVU) plus a sparsity term. Braun et al. (2024, "Identifying Functionally Important Features with End-to-End Sparse Dictionary Learning") train it *end to end* instead: the SAE's output is spliced into the frozen model and the loss is the KL divergence between the clean model's next-token distribution and the spliced one,
#
# $$\mathrm{KL}(P_\text{clean} \,\|\, P_\text{spliced}) = \sum_v P_\text{clean}(v) \,(\log P_\text{clean}(v) - \log P_\text{spliced}(v)),$$
#
# the clean model being the target. *e2e+ds* adds the MSE between spliced and clean residual streams at every later layer (weight $\beta / L_\text{ds}$), so the SAE's output also keeps the later computation on its usual track. With TopK SAEs the sparsity is fixed by $k$, so runs with the same $k$ are compared at the same L0.

# %% [markdown]
# The sweep (k = 4, 8, 16, 32 local; k = 4, 8, 16 e2e and e2e+ds, each warm-started from the local SAE with the same k; one local SAE briefly finetuned on KL + MSE, the cheap recipe) was trained once by `python -m nbfeatures.recipes.train_saes` and ships with the package. Each folder carries a card with its recipe; the numbers below are measured here, on stories the model never saw.

# %%
import time
t_start = time.perf_counter()
import numpy as np, pandas as pd, torch, plotly.express as px, plotly.graph_objects as go
import nbfeatures as nbf
from nbfeatures import LiveCurves, TokenSource, TrainConfig, evaluate_sae, train_sae, zoo
from nbfeatures.data import story_windows
from nbfeatures.sae import E2EObjective, TopKSAE, downstream_sites, load_sae, nearest_neighbour_cosine, warm_start_

SAE_DIR = zoo.path("stories") / "saes"  # the shipped dictionaries, each with a card.json naming its site and recipe
E2E_SITE = zoo.card(SAE_DIR / "local_k8")["site"]
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny model: one thread is as fast, and far faster on a busy machine
model = nbf.load_model("stories")
held_out = story_windows(seed=1, n_stories=120)[:32]  # the model and the SAEs were trained on seed 0
DS = downstream_sites(model, E2E_SITE)
cards = {run: zoo.card(folder) for run, folder in zoo.saes("stories").items()}
cards = {r: c for r, c in cards.items() if c["recipe"]["kind"] in ("local", "e2e", "e2e+ds", "kl+mse")}  # not the BAEs
runs = list(cards)
pd.DataFrame([{"run": r, "kind": c["recipe"]["kind"], "k": c["recipe"]["dictionary"]["k"], "steps": c["recipe"]["train"]["steps"],
               "warm start": c["recipe"].get("warm_start", "")} for r, c in cards.items()]).set_index("run")

# %% [markdown]
# Evaluate every SAE spliced at `blocks.1.hook_resid_pre` on 32 held-out windows of 128 tokens: CE-loss increase over the clean model, KL, FVU, L0, alive latents (fired at least once over these tokens), the L2 ratio ||x_hat|| / ||x||, the downstream MSE at each later residual stream, and the mean nearest-neighbour cosine similarity of the decoder directions.

# %%
rows, saes = [], {}
for run in runs:
    sae = saes[run] = load_sae(SAE_DIR / run)
    r = evaluate_sae(model, sae, E2E_SITE, held_out, batch_size=32, downstream=DS)
    rows.append({"run": run, "kind": cards[run]["recipe"]["kind"], "k": sae.cfg.k, **{k: v for k, v in r.items() if k != "density"},
                 "nn_cos": nearest_neighbour_cosine(sae.W_dec).mean().item()})
table = pd.DataFrame(rows).set_index("run")
cols = ["kind", "l0", "ce_increase", "ce_recovered", "kl", "fvu", "l2_ratio", "alive", *[f"ds_mse/{d}" for d in DS], "nn_cos"]
table[cols].round(4)

# %% [markdown]
# The Pareto front: L0 against CE-loss increase for each kind (lower left is better).

# %%
front = table[table.kind.isin(["local", "e2e", "e2e+ds"])].sort_values("l0")
fig = px.line(front, x="l0", y="ce_increase", color="kind", markers=True, log_x=True, log_y=True,
              labels={"l0": "L0 (active latents per token)", "ce_increase": "CE-loss increase (nats)"},
              title="Sparsity vs what splicing costs the model")
cheap = table.loc[["klmse_k8"]]
fig.add_trace(go.Scatter(x=cheap.l0, y=cheap.ce_increase, mode="markers", marker_symbol="x", marker_size=12, name="local + KL/MSE finetune"))
fig.show()


# %% [markdown]
# **At matched L0** (same k): the CE-loss increase of e2e and e2e+ds as a fraction of local's, and the downstream reconstruction error each leaves in the later layers, relative to local's.

# %%
def at(kind, k):
    return table[(table.kind == kind) & (table.k == k)].iloc[0]

matched = pd.DataFrame([{"k": k, "kind": kind, "ce_increase": at(kind, k).ce_increase,
                         "ce_vs_local": at(kind, k).ce_increase / at("local", k).ce_increase,
                         **{f"ds_vs_local/{d}": at(kind, k)[f"ds_mse/{d}"] / at("local", k)[f"ds_mse/{d}"] for d in DS}}
                        for k in (4, 8, 16) for kind in ("e2e", "e2e+ds")])
matched.round(3)

# %% [markdown]
# At every L0 of the sweep e2e costs the model far less than local: 0.12x local's CE-loss increase at k = 4, 0.30x at k = 8, 0.23x at k = 16 (the paper: under 45%), and e2e+ds 0.19x to 0.42x. These are 1000-step warm-started runs on 1M tokens (the paper trains from scratch on 400M); with 300 steps the k = 16 run had not yet beaten its local start (1.04x). Downstream, e2e leaves larger errors than local at every k and e2e+ds slightly smaller ones:

# %%
ds_long = pd.DataFrame([{"kind": kind, "k": k, "layer": d, "ds_mse": at(kind, k)[f"ds_mse/{d}"]}
                        for k in (4, 8, 16) for kind in ("local", "e2e", "e2e+ds") for d in DS])
px.bar(ds_long, x="layer", y="ds_mse", color="kind", barmode="group", facet_col="k",
       title="Downstream MSE: e2e drifts from the clean residual stream, e2e+ds stays near local").show()

# %% [markdown]
# **At matched CE-loss increase**: how many active latents each kind needs to cost the model as much as the local SAE with k = 8 does, read off its Pareto curve (log-log interpolation between the measured runs).

# %%
target = at("local", 8).ce_increase

def l0_at_ce(kind, ce):
    f = front[front.kind == kind].sort_values("l0")
    # CE increase falls with L0: interpolate log L0 against log CE along the curve
    return float(np.exp(np.interp(np.log(ce), np.log(f.ce_increase[::-1]), np.log(f.l0[::-1]))))

matched_ce = pd.Series({kind: l0_at_ce(kind, target) for kind in ("local", "e2e", "e2e+ds")}, name=f"L0 at CE increase {target:.4f}")
matched_ce.round(2)

# %% [markdown]
# Geometry: for each decoder direction, the cosine similarity with its nearest neighbour in the same SAE. The paper finds local SAEs the least orthogonal; here e2e and e2e+ds start from the local SAE (a short warm-started run), so their decoders move only a little.

# %%
geo = pd.concat([pd.DataFrame({"run": r, "kind": table.loc[r, "kind"], "nn_cos": nearest_neighbour_cosine(saes[r].W_dec).numpy()})
                 for r in ("local_k8", "e2e_k8", "e2eds_k8")])
px.histogram(geo, x="nn_cos", color="kind", barmode="overlay", nbins=60, histnorm="probability",
             title="Nearest-neighbour cosine similarity of decoder directions (k = 8)").show()
table.pivot_table(index="k", columns="kind", values="nn_cos").round(4)

# %% [markdown]
# Train one small run live: an e2e SAE warm-started from the local k = 4 SAE, 40 steps of 8 windows, watching the KL fall.

# %%
curves = LiveCurves({"KL(P_clean || P_spliced)": ["kl"], "MSE at the site": ["mse"]})
curves

# %%
train_windows = story_windows(seed=0, n_stories=400)
live = warm_start_(TopKSAE(saes["local_k4"].cfg), saes["local_k4"])
objective = E2EObjective(model, live, E2E_SITE, "e2e")
history = train_sae(live, TokenSource(train_windows, 8), TrainConfig(steps=40, batch_size=8, lr=1e-3, log_every=2),
                    objective=objective, callbacks=[curves], progress=False)
curves.finish()
live_report = evaluate_sae(model, live, E2E_SITE, held_out, batch_size=32)
{"local_k4 KL": at("local", 4).kl, "after 40 e2e steps": live_report["kl"]}

# %% [markdown]
# What this notebook showed, checked (thresholds sit below the measured values with margin):

# %%
l4, l8 = at("local", 4), at("local", 8)
# the headline: at equal L0, e2e costs the model under 45% of local's CE increase at every k (measured 0.12x, 0.30x, 0.23x
# at k = 4, 8, 16), and e2e+ds clearly less too (0.19x, 0.21x, 0.42x)
for k in (4, 8, 16):
    assert at("e2e", k).ce_increase < 0.45 * at("local", k).ce_increase, matched
    assert at("e2e+ds", k).ce_increase < 0.6 * at("local", k).ce_increase, matched
# ... while e2e leaves larger errors downstream (measured 1.55-2.08x local) and e2e+ds stays near local (0.76-0.90x)
for k in (4, 8, 16):
    for d in DS:
        assert at("e2e", k)[f"ds_mse/{d}"] > 1.15 * at("local", k)[f"ds_mse/{d}"], (k, d)
        assert at("e2e+ds", k)[f"ds_mse/{d}"] < 1.2 * at("local", k)[f"ds_mse/{d}"], (k, d)
        assert at("e2e", k)[f"ds_mse/{d}"] > at("e2e+ds", k)[f"ds_mse/{d}"], (k, d)
# at matched CE-loss increase, e2e needs fewer active latents than local (measured: e2e 4 or fewer, since its k = 4 run already costs less; e2e+ds 4.6; local 8)
assert matched_ce["e2e"] < 0.85 * matched_ce["local"] and matched_ce["e2e+ds"] < 0.85 * matched_ce["local"], matched_ce
# the cheap recipe: a short KL + MSE finetune lowers the local SAE's KL (measured 0.009 vs 0.014)
assert table.loc["klmse_k8", "kl"] < 0.85 * l8.kl
# geometry: local decoders are the least orthogonal at every k (small gaps here: warm-started runs)
assert all(at("local", k).nn_cos > at("e2e", k).nn_cos for k in (4, 8, 16))
# every SAE keeps most latents alive, and the live run lowered the KL it started from
assert (table.alive > 0.9 * 512).all()
assert live_report["kl"] < 0.85 * l4.kl and len(curves.history["kl"]) == len(history)
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s")
