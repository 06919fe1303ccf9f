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
# # Chapter 2: TopK sparse autoencoders
# > Write the TopK encoder, one training step, the dead-latent count and the AuxK loss of Gao et al. (2024), and check each against the library on activations harvested from the shipped stories model.

# %% [markdown]
# Each exercise states its goal, a difficulty (●○○ easy to ●●● hard) and a time. Replace the `raise NotImplementedError` of its stub with your code and run the check cell under it. A check prints one line when your function gives the library's answer, or raises `CheckFailed` naming the mistake it recognised and how to fix it; until you have written the function it prints `not implemented yet`. Hints and solutions are folded under each stub. The panel below ticks each exercise as its check passes.
#
# A sparse autoencoder (SAE) rewrites an activation `x` [D] as a sparse combination of F learned directions, the rows of its decoder. A **TopK** SAE gets its sparsity by construction: each token keeps exactly its k largest latents.
#
#     pre     = (x − b_dec) W_enc + b_enc         [F]
#     latents = ReLU(TopK_k(pre))                [F], at most k nonzero
#     x_hat   = latents W_dec + b_dec            [D]
#
# The parameters follow SAELens' layout: `W_enc` [D, F], `b_enc` [F], `W_dec` [F, D] (row f is latent f's direction, kept at unit norm), `b_dec` [D]. The site is the residual stream entering block 1 of `stories` (D = 128), where the shipped TopK SAE `local_k8` (F = 512, k = 8) reads.

# %%
import torch
import nbfeatures as nbf
from nbfeatures.sae import TopKConfig, TopKObjective, TopKSAE
from nbfeatures.course import ch2_topk as ch2
from nbfeatures.widgets import CourseProgress

model = nbf.load_model("stories")
SITE = ch2.SITE  # "blocks.1.hook_resid_pre"
shipped = nbf.sae.load_sae(nbf.zoo.saes("stories")["local_k8"])
CourseProgress(ch2.chapter)

# %% [markdown]
# ## 2.1 The TopK encoder
# > **Goal:** encode activations `x_ND` into dense TopK latents [N, F], with at most k nonzero per token.
#
# **Difficulty** ●○○ · **about 10 minutes**
#
# Subtract the decoder bias before encoding (Gao et al. and SAELens do: `b_dec` centres the data, the decoder adds it back), keep each token's k largest pre-activations, and put them through a ReLU: a latent that makes the top k with a negative pre-activation still reads 0. Return the latents dense, [N, F], zeros everywhere else.

# %% tags=["stub"]
def topk_encode(x_ND, W_enc_DF, b_enc_F, b_dec_D, k):
    """Dense latents [N, F]: relu of each token's k largest pre-activations (x - b_dec) W_enc + b_enc, 0 elsewhere."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `pre_NF.topk(k, dim=-1)` gives `.values` and `.indices` [N, k] per token (dim -1 runs over the latents; dim 0 would run over the tokens). `torch.zeros_like(pre_NF).scatter(-1, indices, values)` puts them back in place.

# %% tags=["solution"]
def topk_encode(x_ND, W_enc_DF, b_enc_F, b_dec_D, k):
    """Dense latents [N, F]: relu of each token's k largest pre-activations (x - b_dec) W_enc + b_enc, 0 elsewhere."""
    pre_NF = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F
    top = pre_NF.topk(k, dim=-1)
    return torch.zeros_like(pre_NF).scatter(-1, top.indices, top.values.relu())


# %% tags=["check"]
ch2.check_topk_encode(topk_encode)

# %% [markdown]
# The library's `TopKSAE` does the same (`sae.encode(x)` gives dense latents; `sae(x)` returns the values and indices of the k winners and the reconstruction). Harvest activations to work with: `nbf.harvest` runs token windows through the model once, stopping after the site, and keeps every real token but each window's first. The windows are stories the model never saw.

# %%
windows = ch2.story_windows(n_stories=40)  # token ids [B, 64]
acts = nbf.harvest(model, windows, SITE, batch_size=32, progress=False)[SITE]
with torch.no_grad():
    out = shipped(acts)
print(f"{acts.shape[0]} tokens of width {acts.shape[1]}; {SITE}")
print("latents per token:", (out.latents > 0).sum(-1).float().mean().item(), "  FVU:", nbf.metrics.fvu(out.x_hat, acts))

# %% [markdown]
# ## 2.2 One training step
# > **Goal:** take one optimisation step of a TopK SAE on a batch `x_ND` and return the loss before the step.
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# The loss is the fraction of variance unexplained, FVU = Σ(x_hat − x)² / Σ(x − x̄)² with x̄ the batch mean of each dimension: the MSE divided by the batch's variance, so it does not depend on the activations' scale (0 is perfect, 1 is no better than predicting the mean). A step is: zero the gradients, compute the loss, backpropagate, let the optimizer step. Then put each decoder row back on the unit sphere: a latent's activation is only meaningful relative to the norm of its direction, and without the constraint the SAE can shrink its latents and grow its rows.
#
# The checker runs your function for 20 steps on its own harvest with an optimizer that records what it applies: the gradient must be the FVU's at the parameters before the step, and the rows must be unit norm after it.

# %% tags=["stub"]
def train_step(sae, optimizer, x_ND):
    """One optimisation step of the FVU of sae(x_ND).x_hat; W_dec's rows renormalised after it. Returns the loss (float)."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `optimizer.zero_grad()`, then `loss = ((x_hat - x_ND) ** 2).sum() / ((x_ND - x_ND.mean(0)) ** 2).sum()`, `loss.backward()`, `optimizer.step()`. Edit the decoder in place without recording it: `with torch.no_grad(): sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)`. Return `loss.item()`.

# %% tags=["solution"]
def train_step(sae, optimizer, x_ND):
    """One optimisation step of the FVU of sae(x_ND).x_hat; W_dec's rows renormalised after it. Returns the loss (float)."""
    optimizer.zero_grad()
    x_hat = sae(x_ND).x_hat
    loss = ((x_hat - x_ND) ** 2).sum() / ((x_ND - x_ND.mean(0)) ** 2).sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)  # rows are the latents' directions
    return loss.item()


# %% tags=["check"]
ch2.check_train_step(train_step)

# %% [markdown]
# The library's `nbf.train_sae` runs this loop (with Adam's small ε of Gao et al., the gradient's component along each decoder row removed before the step, and logging). Here it trains a 512-latent SAE with k = 8 on the harvest for 100 steps, with `TopKObjective`: FVU plus the AuxK loss of 2.4, counting a latent dead once it has not fired for 2,000 tokens.

# %%
sae = TopKSAE(TopKConfig(d_in=acts.shape[1], d_sae=512, k=8))
sae.init_b_dec_(acts[:2048])  # b_dec starts at the geometric median of the activations
history = nbf.train_sae(sae, acts, nbf.TrainConfig(steps=100, batch_size=256, lr=2e-3, log_every=5),
                        objective=TopKObjective(sae, dead_tokens=2_000), progress=False)
nbf.plots.training_curves(history, {"reconstruction": ["fvu"], "dead latents": ["dead_fraction"], "AuxK": ["aux_loss"]})

# %% [markdown]
# ## 2.3 Dead latents
# > **Goal:** return the fraction of the SAE's latents that fired on no token of the window `x_ND`, encoding it `batch_size` tokens at a time.
#
# **Difficulty** ●○○ · **about 10 minutes**
#
# A latent that never wins a top-k slot gets no gradient and stays where it is: it is *dead*. Whether a latent is dead depends on the window you look at: one that fires once in a thousand tokens is silent in most batches of 256. So a latent is dead for a window when it fired on none of the window's tokens, and the window is usually bigger than a batch (the library's training loop uses 10 million tokens by default). Firing means being among the k winners with a positive value, after TopK.

# %% tags=["stub"]
def dead_fraction(sae, x_ND, batch_size):
    """Fraction of the latents that fired (latents > 0) on no token of x_ND, encoded batch_size tokens at a time."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# Keep one bool mask `fired_F`, all False; for each `batch in x_ND.split(batch_size)`, `fired_F |= (sae(batch).latents > 0).any(0)` (under `torch.no_grad()`). Only after the last batch: `(~fired_F).float().mean().item()`.

# %% tags=["solution"]
def dead_fraction(sae, x_ND, batch_size):
    """Fraction of the latents that fired (latents > 0) on no token of x_ND, encoded batch_size tokens at a time."""
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for batch in x_ND.split(batch_size):
            fired_F |= (sae(batch).latents > 0).any(0)
    return (~fired_F).float().mean().item()


# %% tags=["check"]
ch2.check_dead_fraction(dead_fraction)

# %% [markdown]
# The expected picture, drawn by the reference: the shipped SAE's dead fraction when the window is one batch of n tokens. In a batch of 64 tokens most latents look dead; over the whole harvest almost none are. Counting per batch instead of over the window reports a dead fraction that is really the window's size talking.

# %%
window_fig = ch2.dead_by_window_figure()
window_fig

# %% [markdown]
# ## 2.4 The AuxK loss
# > **Goal:** return AuxK: 1/32 × the FVU with which the top `k_aux` dead latents reconstruct the residual `x − x_hat`.
#
# **Difficulty** ●●● · **about 20 minutes**
#
# Gao et al. revive dead latents with an auxiliary loss. The residual e = x − x_hat is what the live latents missed; the dead latents are asked to explain it. Among the dead latents only (the live ones masked to −∞), take each token's `k_aux` largest pre-activations, ReLU them and decode without the bias: e_hat = ReLU(TopK_{k_aux}(pre over the dead)) W_dec. The loss is (1/32) · Σ(e_hat − e)² / Σ(e − ē)², the same FVU as the main loss so the two are on one scale.
#
# Detach the residual: AuxK is there to move the dead latents, and a gradient through `x_hat` would move the live ones too. With no dead latent, AuxK is 0. The checker compares the value and the gradient with the library's `TopKObjective` term.

# %% tags=["stub"]
def auxk_loss(x_ND, x_hat_ND, pre_NF, dead_F, W_dec_FD, k_aux):
    """1/32 * FVU of the detached residual x - x_hat against its decode from each token's top k_aux dead latents."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `e_ND = (x_ND - x_hat_ND).detach()`; `k = min(k_aux, int(dead_F.sum()))`; `top = pre_NF.masked_fill(~dead_F, float("-inf")).topk(k, dim=-1)`; `e_hat_ND = torch.zeros_like(pre_NF).scatter(-1, top.indices, top.values.relu()) @ W_dec_FD`. Return `pre_NF.sum() * 0` when `k` is 0 (a zero that keeps the graph).

# %% tags=["solution"]
def auxk_loss(x_ND, x_hat_ND, pre_NF, dead_F, W_dec_FD, k_aux):
    """1/32 * FVU of the detached residual x - x_hat against its decode from each token's top k_aux dead latents."""
    k = min(k_aux, int(dead_F.sum()))
    if k == 0:
        return pre_NF.sum() * 0.0
    e_ND = (x_ND - x_hat_ND).detach()  # AuxK moves the dead latents only
    top = pre_NF.masked_fill(~dead_F, float("-inf")).topk(k, dim=-1)
    e_hat_ND = torch.zeros_like(pre_NF).scatter(-1, top.indices, top.values.relu()) @ W_dec_FD  # no b_dec: e has none
    return (1 / 32) * ((e_hat_ND - e_ND) ** 2).sum() / ((e_ND - e_ND.mean(0)) ** 2).sum()


# %% tags=["check"]
ch2.check_auxk_loss(auxk_loss)

# %% [markdown]
# In the training run of 2.2 the AuxK term (logged without its 1/32 as `aux_loss`, an FVU) appears once latents start to die: from then on the dead latents explain part of what the live ones miss (its FVU stays below 1), and `TopKObjective` adds 1/32 of it to the loss. Whether that revives latents at this small scale is a measurement, not a given: notebooks/03_topk_sae.py trains with and without AuxK and finds more dead latents *with* it here; Gao et al. report its benefit at millions of latents.

# %%
history[["step", "fvu", "dead_fraction", "aux_loss"]].iloc[::4]

# %% [markdown]
# What this chapter showed, checked (with or without your solutions):

# %%
assert (out.latents > 0).sum(-1).max() <= shipped.cfg.k
assert history.fvu.iloc[-1] < 0.5 * history.fvu.iloc[0], history.fvu
assert abs(sae.W_dec.norm(dim=1) - 1).max() < 1e-4  # unit decoder rows after training
assert history.dead_fraction.iloc[-1] > 0 and history.aux_loss.dropna().iloc[-1] < 1  # AuxK explains part of the residual
dead_by_window = window_fig.data[0].y
assert all(a > b for a, b in zip(dead_by_window, dead_by_window[1:])) and dead_by_window[0] > 0.3 > dead_by_window[-1]
ch2.chapter
