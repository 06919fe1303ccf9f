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
# # The embedded world
# > TokFSM and the story corpus: synthetic data whose ground truth is known, and the two tiny models shipped trained on it.

# %% [markdown]
# **TokFSM** (from the codebook-features paper): 100 states, each with 10 random out-edges; a state is written as two digits, and a sequence is BOS followed by a random walk of 64 transitions.

# %%
import torch, pandas as pd, plotly.graph_objects as go
import nbfeatures as nbf
from nbfeatures.data import StoryCorpus, TokFSM, first_transition_accuracy, transition_accuracy

fsm = TokFSM()
seq = fsm.sample(1, seed=0)[0]
print("state 42 can go to", fsm.edges[42].tolist())
print("a sequence:", fsm.text(seq[:25]), "...")

# %% [markdown]
# The shipped `tokfsm` model (GPT-NeoX, 4 layers, d=128) learned the machine: sampled continuations stay on valid edges, and its next-state distribution after each state puts its top 10 on the true out-edges.

# %%
tokfsm = nbf.load_model("tokfsm")
ta = transition_accuracy(tokfsm, n=32, seed=1)
fta = first_transition_accuracy(tokfsm)
card = nbf.zoo.card("tokfsm")
print(f"transition accuracy {ta:.3f}, first-transition accuracy {fta:.3f}  (model card: {card['metrics']})")

# %% [markdown]
# Its next-state distribution after state 42, with the true out-edges marked:

# %%
from nbfeatures.data.tokfsm import as_logits_fn
logits = as_logits_fn(tokfsm)
ids = torch.tensor([[fsm.special_id, 4, 2]])
p1 = logits(ids)[0, -1, :10].softmax(-1)
p2 = torch.stack([logits(torch.tensor([[fsm.special_id, 4, 2, d]]))[0, -1, :10].softmax(-1) for d in range(10)])
p_next = (p1[:, None] * p2).reshape(100)
colors = ["crimson" if s in set(fsm.edges[42].tolist()) else "lightgrey" for s in range(100)]
go.Figure(go.Bar(x=list(range(100)), y=p_next.tolist(), marker_color=colors)).update_layout(
    title="P(next state | state 42): true out-edges in red", height=300).show()

# %% [markdown]
# **Stories**: a grammar writes short stories, each on one of several topics with its own vocabulary, and labels every token with planted concepts: months, colours, numbers, names, positive and negative emotions, pronouns agreeing with the hero, names repeated later in the story, topic words.

# %%
corpus = StoryCorpus(seed=1)
story = corpus.generate(1)[0]
print(story.text)
ids = torch.tensor(corpus.encode([story]))
labels = corpus.concept_labels(ids)
words = nbf.sites.tokenizer_of(nbf.load_model("stories")).convert_ids_to_tokens(ids[0].tolist())
table = pd.DataFrame({"token": words, **{c: labels[c][0].tolist() for c in labels}})
table[table.drop(columns="token").any(axis=1)].head(15)

# %% [markdown]
# The shipped `stories` model (GPT-2, 4 layers, d=128) continues a topic's opening on that topic. Its card records the validation loss against a bigram model and the topic-stay rate.

# %%
stories = nbf.load_model("stories")
tok = nbf.sites.tokenizer_of(stories)
prompt = corpus.topic_prompt(corpus.topics.index("dragon"), seed=3)
out = nbf.generate(stories, prompt, max_new_tokens=30, do_sample=True, temperature=0.8)
print(prompt, "|", tok.decode(out.tokens[0, out.prompt_len:]))
stories_card = nbf.zoo.card("stories")
stories_card["metrics"]

# %% [markdown]
# What this notebook showed, checked:

# %%
assert fsm.edges.shape == (100, 10)
assert ta >= 0.95 and fta >= 0.95, (ta, fta)
assert p_next[fsm.edges[42]].sum() > 0.9
assert labels["month"].sum() + labels["name"].sum() > 0
assert stories_card["metrics"]["val_loss"] < 0.7 * stories_card["metrics"]["bigram_val_loss"]
assert stories_card["metrics"]["topic_stay_rate"] >= 0.8
