import sys; sys.path.insert(0, __import__("os").path.dirname(__file__)); from mk import build
build(__import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "notebooks", "03_topk_sae.ipynb"), [
("md", """
# TopK sparse autoencoders
> Harvest activations from the shipped `stories` model, train a TopK SAE while watching it learn, measure it, find the planted concepts among its latents, and steer with one.
"""),
("md", "The `stories` model is a 4-layer GPT-2 trained on a synthetic corpus whose tokens carry ground-truth concept labels (months, colours, names, emotions, topics...). We read the residual stream after block 2, packing held-out stories into 128-token windows."),
("code", """
import torch, plotly.express as px, pandas as pd
import nbfeatures as nbf
from nbfeatures import metrics
from nbfeatures.data import StoryCorpus
from nbfeatures.harvest import harvest
from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from nbfeatures.train import TrainConfig, train_sae
from nbfeatures.evals import evaluate_sae
from nbfeatures.features import summarize_features
from nbfeatures.steering import steering_fn, token_strings
from nbfeatures.widgets import FeatureGallery, LiveCurves, SteeringPanel

torch.manual_seed(0)
model = nbf.load_model("stories")
SITE = "blocks.2.hook_resid_post"
corpus = StoryCorpus(seed=1)  # the model was trained on seed 0: these stories are new to it
stream = torch.tensor([t for ids in corpus.encode(corpus.generate(3000)) for t in ids[:-1]])
windows = stream[: len(stream) // 128 * 128].view(-1, 128)
train_tokens, eval_tokens = windows[:-40], windows[-40:]
print(f"{len(windows)} windows of 128 tokens; site {SITE}")
"""),
("md", "Harvest the activations once (one forward pass per batch, stopped after block 2; the first position of each window is dropped)."),
("code", """
acts = harvest(model, train_tokens, SITE, batch_size=64, progress=False)[SITE]
acts.shape
"""),
("md", "Train a TopK SAE with 2048 latents and k = 16, watching the loss terms, L0 and the dead fraction live."),
("code", """
curves = LiveCurves({"loss": ["fvu", "aux_loss"], "sparsity": ["l0"], "dead latents": ["dead_fraction"]})
curves
"""),
("code", """
sae = TopKSAE(TopKConfig(d_in=acts.shape[1], d_sae=2048, k=16))
sae.init_b_dec_(acts[:4096])
cfg = TrainConfig(steps=600, batch_size=1024, lr=2e-3, log_every=10)
history = train_sae(sae, acts, cfg, objective=TopKObjective(sae, dead_tokens=100_000), callbacks=[curves], progress=False)
curves.finish()
history.tail(3)
"""),
("md", "Dead latents with and without AuxK: the same run with the auxiliary loss switched off."),
("code", """
def dead_after(aux_coef, seed=0):
    s = TopKSAE(TopKConfig(acts.shape[1], 2048, 16), seed=seed)
    s.init_b_dec_(acts[:4096])
    train_sae(s, acts, cfg, objective=TopKObjective(s, aux_coef=aux_coef, dead_tokens=100_000), progress=False)
    with torch.no_grad():
        return metrics.dead_fraction(metrics.feature_density(s(acts[:50_000]).latents))

dead = {"AuxK 1/32": dead_after(1 / 32), "no AuxK": dead_after(0.0)}
dead
"""),
("md", "How well does it reconstruct, and what does splicing it into the model cost? `evaluate_sae` runs held-out windows clean, with the SAE's reconstruction spliced in, and with the site zero-ablated."),
("code", """
report = evaluate_sae(model, sae, SITE, eval_tokens, batch_size=20)
{k: round(v, 4) for k, v in report.items() if k != "density"}
"""),
("md", "A small sweep over width and k, with a power law fitted to the normalised MSE."),
("code", """
rows = []
for d_sae, k in [(256, 16), (512, 16), (1024, 16), (2048, 16), (1024, 4), (1024, 8), (1024, 32)]:
    s = TopKSAE(TopKConfig(acts.shape[1], d_sae, k))
    s.init_b_dec_(acts[:4096])
    train_sae(s, acts, TrainConfig(steps=300, batch_size=1024, lr=2e-3), progress=False)
    with torch.no_grad():
        x = acts[-20_000:]
        rows.append({"d_sae": d_sae, "k": k, "nmse": metrics.nmse(s(x).x_hat, x)})
sweep = pd.DataFrame(rows)
fit = metrics.fit_power_law(sweep.nmse, d_sae=sweep.d_sae, k=sweep.k)
px.scatter(sweep, x="d_sae", y="nmse", color="k", log_x=True, log_y=True,
           title=f"NMSE ~ {fit['c']:.2f} d_sae^{fit['d_sae']:.2f} k^{fit['k']:.2f}  (R^2 {fit['r2']:.2f})").show()
fit
"""),
("md", "Which latents track the planted concepts? For every concept, the latent with the best F1 as a detector of it, with its precision and recall over held-out tokens."),
("code", """
with torch.no_grad():
    held = eval_tokens[:, 1:]
    lat = sae(nbf.read_acts(model, eval_tokens, SITE)[SITE][:, 1:]).latents
labels = corpus.concept_labels(held)
fires = (lat > 0).reshape(-1, lat.shape[-1])
concept_rows = []
for name, lab in labels.items():
    if lab.sum() < 5:
        continue
    p, r = metrics.precision_recall(fires, lab.reshape(-1, 1))
    f1 = 2 * p * r / (p + r).clamp_min(1e-9)
    best = int(f1[:, 0].argmax())
    concept_rows.append({"concept": name, "latent": best, "precision": p[best, 0].item(), "recall": r[best, 0].item(), "f1": f1[best, 0].item()})
concepts = pd.DataFrame(concept_rows).sort_values("f1", ascending=False)
concepts
"""),
("md", "Browse the latents: sort by density or activation, search a concept or a token, open a card with top contexts, quantile samples, the activation histogram and the tokens its decoder direction promotes."),
("code", """
tok = nbf.sites.tokenizer_of(model)
vocab = token_strings(model)
label_ids = torch.stack([labels[c] for c in labels], -1).reshape(-1, len(labels))
summary = summarize_features(lat.reshape(-1, lat.shape[-1]), held, vocab, W_dec=sae.W_dec.detach(),
                             W_U=nbf.unwrap(model).lm_head.weight.detach().T, labels=label_ids, label_names=list(labels))
gallery = FeatureGallery(summary)
gallery
"""),
("md", "Steer generation with a latent: its decoder direction is added from the last prompt token on, at every generated token."),
("code", """
month = int(concepts.set_index("concept").loc["month", "latent"])
steer = steering_fn(model, SITE, sae.W_dec.detach(), max_new_tokens=12)
names = {i: str(summary.table.loc[i, "best_label"]) if "best_label" in summary.table else "" for i in summary.table.index}
panel = SteeringPanel(steer, vocab, names, prompt=corpus.topic_prompt(0), feature=month, strength=8.0)
panel.generate_button.click()
panel
"""),
("md", "What this notebook showed, checked:"),
("code", """
assert report["ce_recovered"] > 0.8 and report["fvu"] < 0.3, report
assert dead["AuxK 1/32"] <= dead["no AuxK"], dead
assert fit["d_sae"] < 0 and fit["k"] < 0 and fit["r2"] > 0.8, fit
assert concepts.set_index("concept").loc["month", "precision"] > 0.8
assert gallery.cards.value and len(curves.history["fvu"]) == len(history)
"""),
])
