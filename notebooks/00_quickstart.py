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
# # Quickstart
# > Load the shipped `stories` model through nnsight, read activations at two sites, steer it, and see every generated token change.

# %% [markdown]
# `nbf.load_model` takes a zoo name, a local folder or a Hugging Face id and returns an nnsight model with its tokenizer. The `stories` model is a 4-layer GPT-2 trained on a synthetic story corpus shipped with the package, so nothing is downloaded.

# %%
import torch
import plotly.graph_objects as go
import nbfeatures as nbf
from nbfeatures import SteeringPanel, steering_fn, token_strings

model = nbf.load_model("stories")
tok = nbf.sites.tokenizer_of(model)
nbf.site_names(model)[:6]

# %% [markdown]
# Sites use TransformerLens hook names. `read_acts` reads several in one forward pass and stops after the deepest.

# %%
prompt = "Mia was a little girl who loved the sea ."
acts = nbf.read_acts(model, prompt, ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z"])
{name: tuple(a.shape) for name, a in acts.items()}

# %% [markdown]
# Steering adds a vector at a site. Here we push the last position along the unembedding direction of `dragon` and compare the next-token distributions.

# %%
W_U = nbf.unwrap(model).lm_head.weight.detach()
dragon = tok.convert_tokens_to_ids("dragon")
direction = W_U[dragon] / W_U[dragon].norm()
steer = nbf.Steer("blocks.3.hook_resid_post", direction, coef=12.0, positions=-1)
clean = nbf.run(model, prompt).logits[0, -1].softmax(-1)
steered = nbf.run(model, prompt, [steer]).logits[0, -1].softmax(-1)
top = (clean + steered).topk(12).indices
words = [tok.decode([int(i)]) for i in top]
fig = go.Figure([go.Bar(name="clean", x=words, y=clean[top].tolist()), go.Bar(name="steered", x=words, y=steered[top].tolist())])
fig.update_layout(title="Next-token distribution after the prompt", barmode="group", height=320)
fig.show()

# %% [markdown]
# During generation an edit applies at every forward pass: `positions=slice(-1, None)` means the last prompt token and every token generated after it.

# %%
steer_all = nbf.Steer("blocks.2.hook_resid_post", 6.0 * direction, positions=slice(-1, None))
base = nbf.generate(model, prompt, max_new_tokens=16)
out = nbf.generate(model, prompt, [steer_all], max_new_tokens=16)
print("clean:  ", tok.decode(base.tokens[0, base.prompt_len:]))
print("steered:", tok.decode(out.tokens[0, out.prompt_len:]))

# %% [markdown]
# The same in a panel: type a prompt, pick a direction, drag the strength and press Generate. Here the directions are the unembeddings of a few topic words.

# %%
topics = ["dragon", "ocean", "flower", "rocket"]
directions = torch.stack([W_U[tok.convert_tokens_to_ids(w)] / W_U[tok.convert_tokens_to_ids(w)].norm() for w in topics])
panel = SteeringPanel(steering_fn(model, "blocks.2.hook_resid_post", directions, max_new_tokens=16), token_strings(model),
                      topics, prompt=prompt, feature=0, strength=6.0)
panel.generate_button.click()
panel

# %% [markdown]
# What this notebook showed, checked:

# %%
assert acts["blocks.2.attn.hook_z"].shape[-2:] == (4, 32)
assert steered[dragon] > 10 * clean[dragon]
generated = tok.convert_ids_to_tokens(out.tokens[0, out.prompt_len:].tolist())
assert sum(w in {"dragon", "dragons"} for w in generated) > sum(w in {"dragon", "dragons"} for w in tok.convert_ids_to_tokens(base.tokens[0].tolist()))
# The corpus's ground truth says which words belong to the dragon topic (dragon, cave, knight, scales ...).
from nbfeatures.data import StoryCorpus
corpus = StoryCorpus()
dragon_topic = corpus.token_topics == corpus.topics.index("dragon")
def dragon_words(result):  # how many of a panel generation's new tokens are dragon-topic words
    return sum(bool(dragon_topic[tok.convert_tokens_to_ids(t)]) for t in result.tokens)
assert dragon_words(panel.steered) > dragon_words(panel.baseline)
assert dragon_words(panel.steered) >= len(panel.steered.tokens) / 2  # the story turns to dragons, not one stray word
