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
# # Codebook features in a language model
# > Find topic and concept codes in the `stories-codebook` model automatically, compare them with the best neurons, and steer generations by forcing topic codes (Tamkin et al. 2023, §4-5, at toy scale).

# %% [markdown]
# `stories-codebook` is the shipped 4-layer `stories` GPT-2, finetuned with its codebooks in (600 steps of 16 stories on one CPU thread; its card has the numbers: validation loss 0.56 against the base model's 0.52) with one codebook per attention head on every layer (`blocks.{i}.attn.hook_z`, `C = 1000`, `k = 8`: each head's output is the sum of 8 codes). The story corpus plants ground truth: each story has one of 10 topics (dragon, fire, ..., snow) whose words fill it, and tokens carry concept labels (months, colours, names, emotions, pronouns...). Because the model's activations are sums of discrete codes, "which codes fire here" is a finite list we can search.

# %%
import time
import numpy as np, pandas as pd, torch, plotly.express as px, plotly.graph_objects as go
from nbfeatures import zoo
from nbfeatures.data import StoryCorpus
from nbfeatures.codebook import ForceCodes, NeuronBaseline, best_code_per_label, load_codebook_model, regex_targets

t0 = time.perf_counter()
torch.manual_seed(0)
cb = load_codebook_model("stories-codebook")
SITES = cb.sites
C = cb.layer(SITES[0]).cfg.n_codes
H = cb.layer(SITES[0]).cfg.n_groups
corpus = StoryCorpus(seed=1)                    # held-out stories (the model was trained on seed 0)
stories = corpus.generate(96)
rows = corpus.encode(stories)
T = max(map(len, rows))
ids = torch.zeros(len(rows), T, dtype=torch.long)
valid = torch.zeros(len(rows), T, dtype=torch.bool)
for b, r in enumerate(rows):
    ids[b, : len(r)], valid[b, : len(r)] = torch.tensor(r), True
valid[:, 0] = False                            # BOS
topic_B = torch.tensor([s.topic for s in stories])
print(zoo.card("stories-codebook")["metrics"])

# %% [markdown]
# One pass over the stories reads every head's codes at every layer (stacked as one grouped codebook: group = layer * heads + head) and, for the neuron baseline below, each head's output before its codebook and each MLP's hidden neurons.

# %%
code_parts, neuron_parts = [], []
with torch.no_grad():
    for i in range(0, len(ids), 48):
        run = cb.run(ids[i : i + 48], read=[f"blocks.{l}.mlp.hook_post" for l in range(len(SITES))])
        code_parts.append(torch.cat([run.outputs[s].codes for s in SITES], 2))                   # [b, T, L*H, K]
        neuron_parts.append(torch.cat([run.outputs[s].target.flatten(-2) for s in SITES]
                                      + [run.acts[f"blocks.{l}.mlp.hook_post"] for l in range(len(SITES))], -1))
all_codes = torch.cat(code_parts)
G = all_codes.shape[2]
def where(g): return f"L{g // H} h{g % H}"
all_codes.shape

# %% [markdown]
# ## 1. Topic codes, found automatically
#
# For every code, the share of a story's tokens it fires on. A topic code fires on a large share of its topic's stories and rarely elsewhere: we rank codes per topic by (mean share in the topic's stories) minus (largest mean share in any other topic's stories).

# %%
B = len(ids)
flat = (all_codes + (torch.arange(G) * C)[None, None, :, None]).reshape(B, -1)          # one id space
fired = torch.zeros(B, G * C)
for b in range(B):
    toks = all_codes[b][valid[b]]                                                        # [n, G, K]
    uniq = (toks + (torch.arange(G) * C)[None, :, None]).reshape(len(toks), -1)
    fired[b] = torch.zeros(G * C).index_add_(0, uniq.flatten(), torch.ones(uniq.numel())) / len(toks)
share_KC = torch.stack([fired[topic_B == k].mean(0) for k in range(len(corpus.topics))])  # [topics, codes]
other = torch.stack([torch.cat([share_KC[:k], share_KC[k + 1:]]).max(0).values for k in range(len(corpus.topics))])
score = share_KC - other
top = score.topk(3, dim=1)
topic_codes = pd.DataFrame([{"topic": corpus.topics[k], "rank": r, "where": where(int(i) // C), "code": int(i) % C,
                             "share in topic": float(share_KC[k, i]), "max share elsewhere": float(other[k, i])}
                            for k in range(len(corpus.topics)) for r, i in enumerate(top.indices[k].tolist())])
best = topic_codes[topic_codes["rank"] == 0]
best

# %%
fig = go.Figure([go.Bar(x=best.topic, y=best["share in topic"], name="share of the topic's story tokens"),
                 go.Bar(x=best.topic, y=best["max share elsewhere"], name="largest share in another topic")])
fig.update_layout(barmode="group", title="the best topic code of each topic", yaxis_title="share of tokens it fires on",
                  height=320, template="plotly_white")
fig

# %% [markdown]
# ## 2. Concept codes vs the best neurons
#
# Ground-truth token labels (a month, a colour, a name, ...) or a regex over the text pick the target tokens; every code is scored as a detector (precision = P(concept | code fires), recall = P(code fires | concept)) and the best by F1 is kept. The baseline is the best single neuron (any head-output dimension before its codebook, or any MLP neuron, either sign) thresholded to the same recall.

# %%
labels = corpus.concept_labels(ids)
labels = {c: m & valid for c, m in labels.items()}
# a regex finds the same kind of target from text alone: the word after "In" that opens a sentence (a month)
words = [[" " + w for w in corpus.tokenizer().convert_ids_to_tokens(r)] for r in ids.tolist()]
labels["regex: ' In (\\w+) ,'"] = regex_targets(words, r" In( \w+) ,") & valid
baseline = NeuronBaseline(torch.cat(neuron_parts)[valid])            # [N tokens, 4 x 128 head dims + 4 x 512 MLP neurons]
rows_ = []
for concept, mask in labels.items():
    if mask.sum() < 5:
        continue
    best_code = best_code_per_label(all_codes[valid][None], torch.where(mask[valid], 0, -1)[None], C, n_labels=1).iloc[0]
    neuron = baseline(mask[valid], float(max(best_code.recall, 1e-3))).iloc[0]
    rows_.append({"concept": concept, "tokens": int(mask.sum()), "code": f"{where(int(best_code.group))} #{int(best_code.code)}",
                  "code precision": best_code.precision, "code recall": best_code.recall, "best neuron precision": neuron.precision})
concepts = pd.DataFrame(rows_).set_index("concept")
concepts.round(3)

# %%
fig = go.Figure([go.Bar(x=concepts.index, y=concepts["code precision"], name="best code"),
                 go.Bar(x=concepts.index, y=concepts["best neuron precision"], name="best neuron at the same recall")])
fig.update_layout(barmode="group", title="concept detectors: codes vs neurons (precision)", height=340, template="plotly_white")
fig

# %% [markdown]
# ## 3. Steering with topic codes
#
# Prompt: an opening that stops right before the hero's favourite thing, so the model must pick a topic. Baseline: sampled continuations. Steered: the same, with each layer's best code for a topic forced into all k slots of its head (the head then outputs k times that code) on the last prompt token and every generated token. We count the continuations that contain at least one of the topic's own words (Table 3 of the paper does the same on TinyStories).

# %%
PROMPT = "Once upon a time , there was a little girl named Mia . She loved"
N_GEN, NEW = 16, 12
K = cb.layer(SITES[0]).cfg.k
token_topics = corpus.token_topics

def topic_rates(out):
    gen = out.tokens[:, out.prompt_len:]
    return np.array([float((token_topics[gen] == k).any(1).float().mean()) for k in range(len(corpus.topics))])

def steer_edits(k):
    picks = topic_codes[(topic_codes.topic == corpus.topics[k])]
    edits, used = [], set()
    for _, r in picks.iterrows():                    # one edit per site: the best-ranked code of this topic there
        layer = int(r["where"][1:].split()[0]); site = SITES[layer]
        if site in used:
            continue
        used.add(site)
        edits.append(ForceCodes(site, cb.layer(site), (int(r.code),) * K, positions=slice(-1, None), mode="all", group=int(r["where"].split("h")[1])))
    return edits

torch.manual_seed(1)
baseline = topic_rates(cb.generate([PROMPT] * N_GEN, max_new_tokens=NEW, do_sample=True))
steered = []
for k in range(len(corpus.topics)):
    torch.manual_seed(1)
    steered.append(topic_rates(cb.generate([PROMPT] * N_GEN, steer_edits(k), max_new_tokens=NEW, do_sample=True))[k])
steering = pd.DataFrame({"baseline": baseline, "steered": steered}, index=list(corpus.topics))
steering.round(3)

# %%
fig = go.Figure([go.Bar(x=steering.index, y=steering.baseline, name="baseline"), go.Bar(x=steering.index, y=steering.steered, name="topic codes forced")])
fig.update_layout(barmode="group", title=f"continuations containing the topic's words ({N_GEN} per bar)", yaxis_title="rate",
                  height=320, template="plotly_white")
fig

# %% [markdown]
# Forcing a code into all k slots of a head is a strong push: most topics then appear in nearly every continuation, but the text turns into a string of topic words rather than a story. Example continuations, steered towards the first topic:

# %%
torch.manual_seed(2)
out = cb.generate([PROMPT] * 3, steer_edits(0), max_new_tokens=NEW, do_sample=True)
tok = corpus.tokenizer()
for row in out.tokens[:, out.prompt_len:].tolist():
    print(tok.decode(row))

# %% [markdown]
# ## Checks
# The numbers above, asserted (thresholds measured on the shipped model, with margin).

# %%
print(best.to_string()); print(concepts.round(3).to_string()); print(steering.round(3).to_string()); print(f"{time.perf_counter() - t0:.0f} s")
assert (best["share in topic"] - best["max share elsewhere"]).min() >= 0.15
assert concepts["code precision"].mean() >= 0.45
assert (concepts["code precision"] > concepts["best neuron precision"]).sum() >= 5
# steering (measured: 9 of 10 topics up, mean rate 0.11 -> 0.91; the paper's Table 3: e.g. dragon 2.5% -> 65%)
assert (steering.steered > steering.baseline).sum() >= 8
assert steering.steered.mean() - steering.baseline.mean() >= 0.6
