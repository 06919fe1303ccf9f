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
# # Chapter 5: InversionView
# > Read what an activation encodes by sampling the inputs that produce it: measure the ε-distance, sample from the shipped counting decoder and re-run the samples through the model, then read what layer 1's attention keeps.

# %% [markdown]
# Each exercise states its goal, a difficulty (●○○ easy to ●●● hard) and a time. Replace the `raise NotImplementedError` of its stub with your code and run the check cell under it. A check prints one line when your function gives the library's answer on fixed inputs and edge cases, or raises `CheckFailed` naming the mistake it recognised and how to fix it; until you have written the function it prints `not implemented yet`. Hints and solutions are folded under each stub. The panel below ticks each exercise as its check passes.
#
# InversionView (Huang et al. 2024) defines the information in an activation z at a site as its **ε-preimage**: the inputs x whose activation at that site comes within ε of z. The set cannot be enumerated, so a small decoder p(x | z, site) is trained to write inputs given an activation; its samples are re-run through the probed model, which decides which of them are inside. What the inside samples share is what z encodes; what varies among them, z has forgotten.
#
# The probed model is `counting`, a 2-layer, 1-head GPT-2 (d = 64) that reads `letters|c:` and writes how often the letter c occurs (`<s>abbacb|b:3`). Its decoder ships with the package; nothing is downloaded.

# %%
import torch
import nbfeatures as nbf
from nbfeatures.course import ch5_inversion as ch5
from nbfeatures.widgets import CourseProgress

torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster on a busy machine
task, model = ch5.task, nbf.load_model("counting")  # task: nbf.data.Counting(), the ground truth (sample, parse, text)
decoder = nbf.inversion.load_decoder(nbf.zoo.path("counting") / "inversion")
CourseProgress(ch5.chapter)

# %% [markdown]
# ## 5.1 The ε-distance
# > **Goal:** return, for each sample, how near its activations come to the query's: min over its positions t of ‖a_t − z‖ / ‖z‖.
#
# **Difficulty** ●○○ · **about 10 minutes**
#
# The distance is normalised by the *query's* norm, so that ε = 0.1 means "within 10% of the query's size" at every site. A sample may encode the queried information at any of its positions, so the minimum over positions counts. Samples have different lengths: `mask_BT` is True at the positions a sample has and False at its padding, which must never count.

# %% tags=["stub"]
def inversion_distance(z_D, acts_BTD, mask_BT):
    """Per sample [B]: min over the positions where mask_BT is True of ||acts_BTD[b, t] - z_D|| / ||z_D||."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `(acts_BTD - z_D).norm(dim=-1) / z_D.norm()` is [B, T]; `.masked_fill(~mask_BT, float("inf"))` hides the padding; `.min(dim=-1).values` takes the nearest position.

# %% tags=["solution"]
def inversion_distance(z_D, acts_BTD, mask_BT):
    """Per sample [B]: min over the positions where mask_BT is True of ||acts_BTD[b, t] - z_D|| / ||z_D||."""
    d_BT = (acts_BTD - z_D).norm(dim=-1) / z_D.norm()
    return d_BT.masked_fill(~mask_BT, float("inf")).min(dim=-1).values


# %% tags=["check"]
ch5.check_inversion_distance(inversion_distance)

# %% [markdown]
# ## 5.2 Sample, re-run, measure
# > **Goal:** draw n inputs from the decoder for the activation at (query, site, position) and return each one's ε-distance, measured in the probed model.
#
# **Difficulty** ●●○ · **about 20 minutes**
#
# Four library calls from `nbf.inversion` make the loop: `query_activation(model, query_T, site, position)` is z; `generate(decoder, z, site, n, temperature, generator)` draws n inputs [n, T] (BOS first, padded with EOS after each one's end), and with `generator=torch.Generator().manual_seed(seed)` they are the same inputs every time; `read_sites(model, ids, [site])[site]` re-runs them through the probed model; `real_positions(ids, decoder.cfg.eos_id)` is the mask of 5.1. A low temperature draws the decoder's likeliest inputs, a high one strays further.

# %% tags=["stub"]
def sample_distances(decoder, model, site, query_T, position, temperature, n, seed):
    """The epsilon-distance [n] of n inputs drawn from the decoder for the activation at (query_T, site, position)."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `z = nbf.inversion.query_activation(model, query_T, site, position)`, then `ids = nbf.inversion.generate(decoder, z, site, n, temperature, torch.Generator().manual_seed(seed))`; the activations are `nbf.inversion.read_sites(model, ids, [site])[site]` and the mask `nbf.inversion.real_positions(ids, decoder.cfg.eos_id)`; finish with your `inversion_distance`. (`nbf.inversion.sample` does all of this, and sorts the samples by distance.)

# %% tags=["solution"]
def sample_distances(decoder, model, site, query_T, position, temperature, n, seed):
    """The epsilon-distance [n] of n inputs drawn from the decoder for the activation at (query_T, site, position)."""
    z_D = nbf.inversion.query_activation(model, query_T, site, position)
    ids_NT = nbf.inversion.generate(decoder, z_D, site, n, temperature, torch.Generator().manual_seed(seed))
    acts_NTD = nbf.inversion.read_sites(model, ids_NT, [site])[site]  # the probed model decides, not the decoder
    return inversion_distance(z_D, acts_NTD, nbf.inversion.real_positions(ids_NT, decoder.cfg.eos_id))


# %% tags=["check"]
ch5.check_sample_distances(sample_distances)

# %% [markdown]
# The expected picture, drawn by the library's `sample` (24 samples at temperatures 0.5, 1 and 2): the closest samples for a query, queried at the output of layer 1's attention at `:`. Each token is coloured by how much the query made the decoder choose it, the matched position is boxed, and the bars on the right are the distances, with the ε = 0.1 line. Look at what the inside samples share.

# %%
ch5.samples_figure()

# %% [markdown]
# ## 5.3 What layer 1's attention keeps
# > **Goal:** among the well-formed samples inside ε, return the fraction that keep the query's count and the fraction that keep its letter, `[same count, same letter]`.
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# `task.parse(ids)` reads a sample into its parts, `{"letters": "bbbdd", "target": "b", "count": 3, "true_count": 3, "colon": 8}`, or returns `None` when the decoder wrote something ill-formed. `target` is the letter after `|`, `count` the digit the sample wrote after `:`, `true_count` how often the target occurs in its letters: what the sample's activation actually encodes. `tokens` is a list of samples (lists of ids) and `inside_N` marks those within ε. Ill-formed samples are left out; with no well-formed sample inside, both fractions are undefined (NaN).

# %% tags=["stub"]
def kept_fractions(task, query_T, tokens, inside_N):
    """[same count, same letter] [2]: fractions of the well-formed in-epsilon samples sharing the query's count, letter."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `want = task.parse(query_T)`; `ok = [p for t, k in zip(tokens, inside_N.tolist()) if k and (p := task.parse(t)) is not None]`; then the means of `p["true_count"] == want["true_count"]` and `p["target"] == want["target"]` over `ok`, as a tensor.

# %% tags=["solution"]
def kept_fractions(task, query_T, tokens, inside_N):
    """[same count, same letter] [2]: fractions of the well-formed in-epsilon samples sharing the query's count, letter."""
    want = task.parse(query_T)
    ok = [p for t, k in zip(tokens, inside_N.tolist()) if k and (p := task.parse(t)) is not None]
    if not ok:
        return torch.full((2,), float("nan"))
    same_count = sum(p["true_count"] == want["true_count"] for p in ok)
    same_letter = sum(p["target"] == want["target"] for p in ok)
    return torch.tensor([same_count, same_letter], dtype=torch.float) / len(ok)


# %% tags=["check"]
ch5.check_kept_fractions(kept_fractions)

# %% [markdown]
# The expected picture, drawn by the reference over held-out queries: the samples inside ε almost all keep the query's count, and keep its letter hardly more often than chance (1 in 9 for a count, 1 in 12 for a letter). The activation at `:` after layer 1's attention holds *how many*, not *of what*.

# %%
kept_fig = ch5.kept_figure()
kept_fig

# %% [markdown]
# Why: layer 1's single head, at `:`, reads almost only the position of the letter being counted, where layer 0 has already computed the count (Huang et al. found it there). The head copies the count over; the letter's identity does not come along. Here is the head's attention from `:`, read by the library at `blocks.1.attn.hook_pattern`:

# %%
attention_fig = ch5.attention_figure()
attention_fig

# %% [markdown]
# What this chapter showed, checked (with or without your solutions):

# %%
same_count, same_letter = kept_fig.data[0].y
assert same_count >= 0.6 and same_count > 2 * same_letter, kept_fig.data[0].y
weights = attention_fig.data[0].y
assert weights[-2] > 0.9 and abs(sum(weights) - 1) < 1e-4  # ':' reads the letter just before it, the one being counted
ch5.chapter
