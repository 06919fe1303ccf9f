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
# # Chapter 4: End-to-end SAEs and binary autoencoders
# > Write the KL objective that trains an SAE through the spliced model, then the two pieces of a binary autoencoder: a 1-bit step with a straight-through gradient, and the entropy of a minibatch of bits.

# %% [markdown]
# Each exercise states its goal, a difficulty (●○○ easy to ●●● hard) and a time. Replace the `raise NotImplementedError` of its stub with your code and run the check cell under it. A check prints one line when your function gives the library's answer on fixed inputs and edge cases, or raises `CheckFailed` naming the mistake it recognised and how to fix it; until you have written the function it prints `not implemented yet`. Hints and solutions are folded under each stub. The panel below ticks each exercise as its check passes.
#
# The model is `stories`, the 4-layer GPT-2 (D = 128) of chapter 1. Its dictionaries ship with the package: TopK SAEs at `blocks.1.hook_resid_pre` trained locally (MSE), end to end (KL) and end to end with downstream terms (e2e+ds), and a binary autoencoder per residual stream. Nothing is downloaded.

# %%
import torch
import nbfeatures as nbf
from nbfeatures.course import ch4_e2e_bae as ch4
from nbfeatures.widgets import CourseProgress

torch.set_num_threads(1)  # a tiny model: one thread is as fast, and far faster on a busy machine
model = nbf.load_model("stories")
CourseProgress(ch4.chapter)

# %% [markdown]
# ## 4.1 The KL objective
# > **Goal:** return KL(P_clean ‖ P_spliced), summed over the vocabulary and averaged over every token, from clean and spliced logits [B, T, V].
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# A *local* SAE is trained to reconstruct its activation (MSE). Braun et al. (2024) train it *end to end* instead: the SAE's output x̂ replaces the activation inside the frozen model (it is *spliced* in) and the loss is how far the model's next-token distribution moves, KL(P_clean ‖ P_spliced) = Σ_v P_clean(v) (log P_clean(v) − log P_spliced(v)) at each token. The clean model is the target, so its probabilities weight the sum. The SAE then keeps what the model uses, not what is merely large. The loss trains the SAE, so it must carry a gradient back to the spliced logits.

# %% tags=["stub"]
def kl_clean_to_spliced(logits_clean_BTV, logits_spliced_BTV):
    """KL(P_clean || P_spliced): sum over the vocabulary, mean over batch and position; a scalar tensor."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `lp = logits_clean_BTV.log_softmax(-1)` and `lq = logits_spliced_BTV.log_softmax(-1)` are the log-probabilities; `(lp.exp() * (lp - lq)).sum(-1)` is the KL at each token [B, T]; `.mean()` averages over tokens. Take `log_softmax`, not `softmax().log()`: a probability that underflows to 0 would give log 0 = −inf. If you use `F.kl_div(input, target)`: input is the spliced log-probabilities, target the clean probabilities, and its reductions average over the wrong things on [B, T, V].

# %% tags=["solution"]
def kl_clean_to_spliced(logits_clean_BTV, logits_spliced_BTV):
    """KL(P_clean || P_spliced): sum over the vocabulary, mean over batch and position; a scalar tensor."""
    lp_BTV = logits_clean_BTV.float().log_softmax(-1)
    lq_BTV = logits_spliced_BTV.float().log_softmax(-1)
    return (lp_BTV.exp() * (lp_BTV - lq_BTV)).sum(-1).mean()


# %% tags=["check"]
ch4.check_kl_clean_to_spliced(kl_clean_to_spliced)

# %% [markdown]
# ## 4.2 The e2e loss through the spliced model
# > **Goal:** splice an SAE in at `site`, run the model, and return the KL its splice costs, over every position but the first.
#
# **Difficulty** ●●○ · **about 20 minutes**
#
# The library splices with an edit: `nbf.run(model, ids, [nbf.Splice(site, sae)])` runs the model with the activation at `site` replaced by `sae(activation).x_hat`, and returns `.logits`. (By hand it is a forward pre-hook on block L for `blocks.L.hook_resid_pre`, which is the block's input.) Run the clean model once, without gradients, and the spliced model once, with them: the gradient of the loss reaches the SAE's parameters through the frozen model. As in the library (`E2EObjective`), leave out the first position: its activation norm dwarfs the rest.

# %% tags=["stub"]
def e2e_loss(model, sae, ids_BT, site):
    """KL(P_clean || P_spliced) with `sae` spliced in at `site`, averaged over positions 1: of ids_BT [B, T]."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `with torch.no_grad(): clean_BTV = nbf.run(model, ids_BT).logits`, then `spliced_BTV = nbf.run(model, ids_BT, [nbf.Splice(site, sae)]).logits` outside the `no_grad` block; return your `kl_clean_to_spliced` of `clean_BTV[:, 1:]` and `spliced_BTV[:, 1:]`.

# %% tags=["solution"]
def e2e_loss(model, sae, ids_BT, site):
    """KL(P_clean || P_spliced) with `sae` spliced in at `site`, averaged over positions 1: of ids_BT [B, T]."""
    with torch.no_grad():  # the clean run is the target: no gradient needed
        clean_BTV = nbf.run(model, ids_BT).logits
    spliced_BTV = nbf.run(model, ids_BT, [nbf.Splice(site, sae)]).logits
    return kl_clean_to_spliced(clean_BTV[:, 1:], spliced_BTV[:, 1:])


# %% tags=["check"]
ch4.check_e2e_loss(e2e_loss)

# %% [markdown]
# The expected picture, drawn by the library: what splicing each shipped SAE costs the model on 16 held-out stories. At every k (the same sparsity, L0 = k) the SAEs trained through the KL cost the model less than the local ones, which were trained only to reconstruct: about a fifth of the local KL at k = 4, two thirds at k = 16. (Notebook 04 measures the rest: CE loss, downstream errors, geometry.)

# %%
kl_fig = ch4.kl_figure()
kl_fig

# %% [markdown]
# ## 4.3 The 1-bit estimator
# > **Goal:** binarise pre-activations, 1[z > 0] in the forward pass, with the gradient s(z)(1 − s(z)) (s the sigmoid) in the backward pass.
#
# **Difficulty** ●●● · **about 20 minutes**
#
# A binary autoencoder (Cho et al. 2025) codes an activation as bits, h = 1[W_encᵀ x + b_enc > 0], and decodes x̂ = W_decᵀ h + b_dec. The step's gradient is 0 almost everywhere, so nothing would train; a *straight-through estimator* keeps the step in the forward pass and lets a surrogate carry the gradient backward. The shipped BAEs (`estimator="sigmoid_ste"`) use the sigmoid's slope at the pre-activation: grad_z = grad_out · s(z)(1 − s(z)), largest for bits near their threshold. Return floats (0.0 and 1.0) that carry that gradient.

# %% tags=["stub"]
def binary_step(z):
    """1[z > 0] as floats; backward: grad_out * sigmoid(z) * (1 - sigmoid(z))."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `hard = (z > 0).float()` has no gradient. With `soft = torch.sigmoid(z)`, the expression `hard + soft - soft.detach()` has the value of `hard` (the last two terms cancel) and the gradient of `soft`, which is s(z)(1 − s(z)). A `torch.autograd.Function` with your own `backward` works too.

# %% tags=["solution"]
def binary_step(z):
    """1[z > 0] as floats; backward: grad_out * sigmoid(z) * (1 - sigmoid(z))."""
    hard = (z > 0).to(z.dtype)
    soft = torch.sigmoid(z)
    return hard + soft - soft.detach()  # the value of hard, the gradient of soft


# %% tags=["check"]
ch4.check_binary_step(binary_step)

# %% [markdown]
# The expected picture, drawn by the library's `binary_step`: the forward step, and the gradient each estimator passes back for an upstream gradient of 1. The plain straight-through estimator passes it everywhere; the sigmoid one mostly near the threshold.

# %%
step_fig = ch4.step_figure()
step_fig

# %% [markdown]
# ## 4.4 Feature-set entropy
# > **Goal:** return the minibatch entropy of a BAE's bits [N, F]: each bit's firing rate over the minibatch, its binary entropy in bits, summed over the bits.
#
# **Difficulty** ●○○ · **about 10 minutes**
#
# Bit j fires on a fraction p_j of the N tokens. As a Bernoulli variable its entropy is Hb(p) = −p log₂ p − (1 − p) log₂(1 − p) bits: 0 for a bit that never or always fires, 1 for a bit on half the time. The BAE adds Σ_j Hb(p_j) to its loss, which pushes bits towards firing rarely; with independent bits, the same sum over a set of activations estimates that set's entropy (*feature-set entropy*). A bit that never fires has p = 0, and 0 · log 0 must count as 0, not NaN.

# %% tags=["stub"]
def minibatch_entropy(bits_NF):
    """Sum over bits of the binary entropy (in bits) of each bit's firing rate over the N tokens; a scalar tensor."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `p_F = bits_NF.float().mean(0)`; then `-(p_F * torch.log2(p_F + eps) + (1 - p_F) * torch.log2(1 - p_F + eps)).sum()` with `eps = 1e-10`, as the library does.

# %% tags=["solution"]
def minibatch_entropy(bits_NF):
    """Sum over bits of the binary entropy (in bits) of each bit's firing rate over the N tokens; a scalar tensor."""
    p_F = bits_NF.float().mean(0)
    eps = 1e-10  # 0 log 0 = 0: without it a dead (or always-on) bit gives NaN
    return -(p_F * torch.log2(p_F + eps) + (1 - p_F) * torch.log2(1 - p_F + eps)).sum()


# %% tags=["check"]
ch4.check_minibatch_entropy(minibatch_entropy)

# %% [markdown]
# The expected picture, drawn by the library's `feature_set_entropy`: each shipped BAE estimates the entropy of the same 16 held-out stories at its depth. Deeper residual streams hold more information about the context, so more of their bits vary from token to token.

# %%
entropy_fig = ch4.entropy_figure()
entropy_fig

# %% [markdown]
# What this chapter showed, checked (with or without your solutions):

# %%
kl = {trace.name.split(" ")[0]: trace.y for trace in kl_fig.data}
assert all(e < 0.8 * l and d < 0.8 * l for l, e, d in zip(kl["local"], kl["e2e"], kl["e2e+ds"])), kl  # measured 0.22-0.68x local
forward, sigmoid_grad, ste_grad = (trace.y for trace in step_fig.data)
assert set(forward) == {0.0, 1.0} and abs(max(sigmoid_grad) - 0.25) < 1e-6 and min(ste_grad) == 1.0
entropy = entropy_fig.data[0].y
assert all(a < b for a, b in zip(entropy, entropy[1:])) and entropy[-1] > 3 * entropy[0], entropy
ch4.chapter
