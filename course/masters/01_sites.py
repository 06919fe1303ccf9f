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
# # Chapter 1: Sites and steering
# > Read activations at a site with a raw torch hook, compute attention patterns from queries and keys, then steer the shipped stories model and measure what the steering did.

# %% [markdown]
# Each exercise states its goal, a difficulty (●○○ easy to ●●● hard) and a time. Replace the `raise NotImplementedError` of its stub with your code and run the check cell under it. A check prints one line when your function gives the library's answer on fixed inputs and edge cases, or raises `CheckFailed` naming the mistake it recognised and how to fix it; until you have written the function it prints `not implemented yet`. Hints and solutions are folded under each stub. The panel below ticks each exercise as its check passes.
#
# The model is `stories`, a 4-layer GPT-2 (D = 128, 4 heads of 32 dims) trained on a synthetic story corpus shipped with the package: nothing is downloaded.

# %%
import torch
import plotly.graph_objects as go
from plotly.subplots import make_subplots
import nbfeatures as nbf
from nbfeatures.course import ch1_sites as ch1
from nbfeatures.widgets import CourseProgress

model = nbf.load_model("stories")
tok = nbf.tokenizer_of(model)
CourseProgress(ch1.chapter)

# %% [markdown]
# ## 1.1 Read the residual stream with a raw hook
# > **Goal:** return the output of block `layer` (the site `blocks.{layer}.hook_resid_post`), read with a plain torch forward hook.
#
# **Difficulty** ●○○ · **about 10 minutes**
#
# A *site* is a named activation. `nbf.read_acts` reads sites through nnsight, but underneath every site is some module's input or output, and torch hands you any module's output through `register_forward_hook`. The stories model is a Hugging Face GPT-2: `nbf.unwrap(model)` is the torch module, its blocks are `.transformer.h[0]` to `.transformer.h[3]`, and block `layer`'s output is the residual stream after that block.

# %% tags=["stub"]
def read_resid(model, ids_BT, layer):
    """The output of block `layer`, [B, T, D], on token ids [B, T], read with a forward hook on transformer.h[layer]."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# A forward hook is called as `hook(module, input, output)` after the module has run (and one that returns anything but `None` replaces the output): store `output` in a dict made outside the hook, run `nbf.unwrap(model)(ids_BT)`, then take the hook off with the handle `register_forward_hook` returned, in a `finally:` block so that an error cannot leave it behind. In transformers 5 a GPT-2 block returns its hidden states as a tensor (older versions returned a tuple whose element 0 they were).

# %% tags=["solution"]
def read_resid(model, ids_BT, layer):
    """The output of block `layer`, [B, T, D], on token ids [B, T], read with a forward hook on transformer.h[layer]."""
    seen = {}

    def keep(module, inputs, output):
        seen["resid"] = output[0] if isinstance(output, tuple) else output  # transformers < 5 returned a tuple

    handle = nbf.unwrap(model).transformer.h[layer].register_forward_hook(keep)
    try:
        with torch.no_grad():
            nbf.unwrap(model)(ids_BT)
    finally:
        handle.remove()
    return seen["resid"]


# %% tags=["check"]
ch1.check_read_resid(read_resid)

# %% [markdown]
# The library reads the same site in one call, and several sites in one forward pass that stops after the deepest. Here is the size of the residual stream at each position, before and after block 1:

# %%
ids = tok("Mia was a little girl who loved the sea .", return_tensors="pt").input_ids
acts = nbf.read_acts(model, ids, ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"])
words = nbf.plots.unique_labels(tok.convert_ids_to_tokens(ids[0].tolist()))
go.Figure([go.Bar(name=name, x=words, y=a[0].norm(dim=-1).tolist()) for name, a in acts.items()]).update_layout(
    title="Norm of the residual stream per position", barmode="group", height=300)

# %% [markdown]
# ## 1.2 Attention patterns from queries and keys
# > **Goal:** compute attention probabilities, softmax(q kᵀ / √E) under the causal mask, from queries and keys of shape [B, H, T, E].
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# Each head scores every (query, key) pair by a dot product scaled by 1/√E, hides the keys that come after the query (a token cannot read the future) and normalises each query's row with a softmax. `pattern[b, h, t, s]` is how much position t reads from position s; TransformerLens calls it `attn.hook_pattern`.

# %% tags=["stub"]
def attention_pattern(q_BHTE, k_BHTE):
    """Attention probabilities [B, H, T, S] (rows: queries, columns: keys) from queries and keys [B, H, T, E]."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `q_BHTE @ k_BHTE.transpose(-1, -2)` is [B, H, T, S]. `torch.ones(T, T, dtype=torch.bool).triu(1)` is True exactly above the diagonal, where the key comes after the query; `scores.masked_fill(mask, float("-inf"))` hides those before `.softmax(dim=-1)`. Use torch's softmax rather than `exp() / sum`: it stays finite on large scores.

# %% tags=["solution"]
def attention_pattern(q_BHTE, k_BHTE):
    """Attention probabilities [B, H, T, S] (rows: queries, columns: keys) from queries and keys [B, H, T, E]."""
    E, T = q_BHTE.shape[-1], q_BHTE.shape[-2]
    scores_BHTS = q_BHTE @ k_BHTE.transpose(-1, -2) / E**0.5
    future_TS = torch.ones(T, T, dtype=torch.bool, device=scores_BHTS.device).triu(1)
    return scores_BHTS.masked_fill(future_TS, float("-inf")).softmax(dim=-1)


# %% tags=["check"]
ch1.check_attention_pattern(attention_pattern)

# %% [markdown]
# ## 1.3 One head's pattern inside the model
# > **Goal:** return head `head` of block `layer`'s attention pattern, [B, T, S], on the stories model.
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# GPT-2 makes queries, keys and values with one linear map, `attn.c_attn`, whose output [B, T, 3D] is `[q | k | v]` along the last dim; each splits into H heads of E = D / H consecutive channels. `read_acts` takes a raw module path as a site and returns that module's output. Compute the pattern from q and k with your `attention_pattern`, or read the site `blocks.{layer}.attn.hook_pattern`; then try the other way and see that they agree.

# %% tags=["stub"]
def head_pattern(model, ids_BT, layer, head):
    """Head `head` of block `layer`: attention probabilities [B, T, S] on token ids [B, T]."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `site = f"transformer.h.{layer}.attn.c_attn"`; `q, k, v = nbf.read_acts(model, ids_BT, site)[site].chunk(3, dim=-1)`; then `q.unflatten(-1, (H, E)).transpose(1, 2)` is [B, H, T, E], with H = `nbf.unwrap(model).config.n_head`.

# %% tags=["solution"]
def head_pattern(model, ids_BT, layer, head):
    """Head `head` of block `layer`: attention probabilities [B, T, S] on token ids [B, T]."""
    site = f"transformer.h.{layer}.attn.c_attn"  # a raw module path means that module's output: [B, T, 3D]
    q, k, v = nbf.read_acts(model, ids_BT, site)[site].chunk(3, dim=-1)
    H = nbf.unwrap(model).config.n_head
    q_BHTE, k_BHTE = (t.unflatten(-1, (H, -1)).transpose(1, 2) for t in (q, k))
    return attention_pattern(q_BHTE, k_BHTE)[:, head]


# %% tags=["check"]
ch1.check_head_pattern(head_pattern)

# %% [markdown]
# The expected picture: the four heads of block 1 on a story that repeats a name, read by the library at `blocks.1.attn.hook_pattern`. Every row sums to 1 and everything above the diagonal is 0; much of each row goes to the first token, as in larger models.

# %%
story = "Mia was a little girl who loved the sea . Mia went to the sea"
ids = tok(story, return_tensors="pt").input_ids
pattern_HTS = nbf.read_acts(model, ids, "blocks.1.attn.hook_pattern")["blocks.1.attn.hook_pattern"][0]
words = nbf.plots.unique_labels(tok.convert_ids_to_tokens(ids[0].tolist()))
fig = make_subplots(rows=1, cols=4, subplot_titles=[f"head {h}" for h in range(4)], shared_yaxes=True)
for h in range(4):
    fig.add_trace(go.Heatmap(z=pattern_HTS[h].tolist(), x=words, y=words, coloraxis="coloraxis"), row=1, col=h + 1)
fig.update_yaxes(autorange="reversed").update_layout(title="Block 1 attention: rows are queries, columns keys", height=380,
                                                     coloraxis={"colorscale": "Blues"})

# %% [markdown]
# ## 1.4 Steer with a hook
# > **Goal:** add `coef * direction_D` to block `layer`'s output at the last position and return the logits [B, T, V].
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# Steering edits a site during the forward pass. A forward hook that returns a value replaces the module's output with it. The library's `nbf.Steer(site, direction, coef=..., positions=-1)` does this through nnsight (and during generation at every new token); here you write it by hand. Take the hook off when you are done: a hook left on the model steers every later run.

# %% tags=["stub"]
def steered_logits(model, ids_BT, layer, direction_D, coef):
    """Logits [B, T, V] with coef * direction_D added to block `layer`'s output at the last position."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# Inside the hook: `hidden = output.clone(); hidden[:, -1] += coef * direction_D; return hidden`. Run `nbf.unwrap(model)(ids_BT).logits` while the hook is registered, and `handle.remove()` in a `finally:` block.

# %% tags=["solution"]
def steered_logits(model, ids_BT, layer, direction_D, coef):
    """Logits [B, T, V] with coef * direction_D added to block `layer`'s output at the last position."""
    def steer(module, inputs, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, -1] += coef * direction_D
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = nbf.unwrap(model).transformer.h[layer].register_forward_hook(steer)
    try:
        with torch.no_grad():
            return nbf.unwrap(model)(ids_BT).logits
    finally:
        handle.remove()


# %% tags=["check"]
ch1.check_steered_logits(steered_logits)

# %% [markdown]
# The same edit through the library, on a prompt whose next word is open: the unit unembedding of `dragon` added at block 2 turns the likeliest next words to the dragon story's.

# %%
dragon = ch1.unembedding("dragon")  # W_U[dragon] / |W_U[dragon]|
ids = tok("Tom went to the", return_tensors="pt").input_ids
clean = nbf.run(model, ids).logits[0, -1]
steered = nbf.run(model, ids, [nbf.Steer("blocks.2.hook_resid_post", dragon, coef=6.0, positions=-1)]).logits[0, -1]
print("clean:  ", tok.convert_ids_to_tokens(clean.topk(6).indices.tolist()))
print("steered:", tok.convert_ids_to_tokens(steered.topk(6).indices.tolist()))

# %% [markdown]
# ## 1.5 Measure the effect
# > **Goal:** return, per prompt, how much steering raised the log-probability that the next token is one of a topic's words.
#
# **Difficulty** ●●○ · **about 15 minutes**
#
# The story corpus knows which words belong to which topic (the ground truth: dragon has dragon, cave, knight, scales ...; `ch1.topic_words("dragon")` gives their ids). The probability that the next token is one of them is Σ_w p(w); compare it in log space, steered minus clean, at the last position: shift = log Σ_w p_steered(w) − log Σ_w p_clean(w).

# %% tags=["stub"]
def topic_logprob_shift(model, ids_BT, layer, direction_D, coef, topic_ids_W):
    """Per prompt, [B]: log sum_w p_steered(w) - log sum_w p_clean(w) over the topic's words, at the last position."""
    raise NotImplementedError


# %% [markdown] tags=["hint"]
# `logits.log_softmax(-1)` gives log-probabilities, and `logp[:, topic_ids_W].logsumexp(-1)` is log Σ_w p(w), computed stably. Your `steered_logits` gives the steered run; with `coef=0.0` it gives the clean one.

# %% tags=["solution"]
def topic_logprob_shift(model, ids_BT, layer, direction_D, coef, topic_ids_W):
    """Per prompt, [B]: log sum_w p_steered(w) - log sum_w p_clean(w) over the topic's words, at the last position."""
    logp_steered = steered_logits(model, ids_BT, layer, direction_D, coef)[:, -1].log_softmax(-1)
    logp_clean = steered_logits(model, ids_BT, layer, direction_D, 0.0)[:, -1].log_softmax(-1)
    return logp_steered[:, topic_ids_W].logsumexp(-1) - logp_clean[:, topic_ids_W].logsumexp(-1)


# %% tags=["check"]
ch1.check_topic_logprob_shift(topic_logprob_shift)

# %% [markdown]
# The expected picture, drawn by the reference: steering along `dragon` raises the dragon words until they hold nearly all of the next token's probability (the curve levels off at −log p_clean(dragon words)) and pushes the other topics' words down. Once your check passes, `ch1.topic_shift_figure(topic_logprob_shift)` draws it from your function.

# %%
fig = ch1.topic_shift_figure()
fig

# %% [markdown]
# What this chapter showed, checked (with or without your solutions):

# %%
assert torch.allclose(pattern_HTS.sum(-1), torch.ones(()), atol=1e-5) and pattern_HTS.triu(1).max() == 0
assert not torch.allclose(acts["blocks.1.hook_resid_pre"], acts["blocks.1.hook_resid_post"])
assert steered.argmax() in ch1.topic_words("dragon") and clean.argmax() not in ch1.topic_words("dragon")
shift = {trace.name: trace.y for trace in fig.data}
assert shift["dragon words"][-1] > 4 and shift["ocean words"][-1] < -4 and shift["space words"][-1] < -4
ch1.chapter
