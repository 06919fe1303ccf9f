"""Panel costs: LiveCurves' overhead on a notebook-scale training run, and FeatureGallery's compute time.

    python benchmarks/bench_panels.py [--steps 300] [--features 4096] [--tokens 100000] [--reps 3]

1. LiveCurves: the same TopK SAE run (d_in 128, d_sae 2048, k 16, batch 512, the notebook's settings)
   with no callback, with LiveCurves (FigureWidget, every 10 steps as in the notebook) and with
   LiveCurves forced to draw on every call (no throttle). Target: under 5% overhead.
2. FeatureGallery: `summarize_features` (everything the list and the cards need, for every feature)
   for 4096 features over 100k tokens of TopK latents (k=32), against the reference cost of computing
   those latents with the SAE; plus one card and the panel's construction.
3. Responsiveness: every control's callback of FeatureGallery (sort_by, search, feature change, next button)
   and PromptView (prompt change + Run, token selection, feature click) on the shipped `stories` model and
   its shipped dictionaries (TopK SAE, binary AE, codebook), median over reps, against a 150 ms target.
   Cards are computed fresh for every call (the summary's card cache is cleared first): the worst case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

import nbfeatures as nbf
from nbfeatures import zoo
from nbfeatures.data import StoryCorpus
from nbfeatures.features import summarize_features
from nbfeatures.prompt_features import prompt_features_fn
from nbfeatures.sae import deviation_acts, load_sae
from nbfeatures.steering import token_strings
from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from nbfeatures.train import TrainConfig, train_sae
from nbfeatures.widgets import FeatureGallery, LiveCurves, PromptView
from _timing import timed


def live_curves_table(steps: int, reps: int) -> None:
    torch.manual_seed(0)
    # low-rank-plus-noise activations: something an SAE can learn, like a residual stream
    acts = torch.randn(60_000, 32) @ torch.randn(32, 128) / 4 + 0.1 * torch.randn(60_000, 128)
    cfg = TrainConfig(steps=steps, batch_size=512, lr=2e-3, log_every=10)

    def run(make_cb):
        def go():
            sae = TopKSAE(TopKConfig(128, 2048, 16))
            cb = make_cb()
            train_sae(sae, acts, cfg, objective=TopKObjective(sae, dead_tokens=50_000),
                      callbacks=[cb] if cb else (), progress=False)
            return cb
        return go

    rows = [("no callback", run(lambda: None)),
            ("LiveCurves (throttled, default)", run(lambda: LiveCurves(total=steps))),
            ("LiveCurves drawing every call", run(lambda: LiveCurves(total=steps, every_s=0.0, max_overhead=1.0)))]
    base = None
    print(f"\nLiveCurves overhead: TopK 128 -> 2048, k 16, batch 512, {steps} steps, callback every 10 steps; "
          f"median of {reps}, {torch.get_num_threads()} threads")
    print("(whole-run ratios carry the machine's noise; 'draw share' is the time LiveCurves spent redrawing")
    print(" as a fraction of that run's wall time: its overhead, measured directly)")
    print(f"{'run':34s} {'s':>8s} {'ratio':>7s} {'draws':>6s} {'draw s':>8s} {'draw share':>10s}")
    for name, fn in rows:
        t = timed(fn, reps)
        base = base or t
        t0 = time.perf_counter()
        cb = fn()
        wall = time.perf_counter() - t0
        draws, draw_s = (cb.n_draws, cb.draw_s) if cb is not None else (0, 0.0)
        print(f"{name:34s} {t:8.3f} {t / base:7.3f} {draws:6d} {draw_s:8.3f} {draw_s / wall:10.2%}")


def gallery_table(n_features: int, n_tokens: int, reps: int) -> None:
    torch.manual_seed(0)
    d_in, k, T, V = 128, 32, 128, 600
    n_tokens = n_tokens // T * T
    sae = TopKSAE(TopKConfig(d_in, n_features, k))
    x = torch.randn(n_tokens, d_in)
    tokens = torch.randint(0, V, (n_tokens // T, T))
    labels = torch.randint(-1, 8, (tokens.numel(),))
    vocab = [f"t{i}" for i in range(V)]
    W_U = torch.randn(d_in, V)

    def latents():
        with torch.no_grad():
            return sae(x).latents

    lat = latents()

    def summary():
        return summarize_features(lat, tokens, vocab, W_dec=sae.W_dec.detach(), W_U=W_U, labels=labels,
                                  label_names=[f"label{i}" for i in range(8)])

    s = summary()
    t_lat, t_sum = timed(latents, reps), timed(summary, reps)
    t_card = timed(lambda: s.card(int(s.table.index[0])), reps)
    t_panel = timed(lambda: FeatureGallery(s), reps)
    print(f"\nFeatureGallery data: {n_features} features over {n_tokens} tokens (TopK k={k}); median of {reps}")
    print(f"{'step':40s} {'s':>8s} {'ratio':>7s}")
    for name, t in [("reference: SAE latents for the tokens", t_lat), ("summarize_features (all features)", t_sum),
                    ("one card", t_card), ("FeatureGallery(summary)", t_panel)]:
        print(f"{name:40s} {t:8.3f} {t / t_lat:7.2f}")


TARGET_MS = 150.0
PROMPTS = ["Once upon a time , a little girl saw a red dragon .", "The boy was happy because the sun was warm .",
           "In May , Tom and his dog went to the sea to play .", "She was sad , but her friend gave her a blue ball ."]


def callback_ms(actions: list[Callable[[], object]], before: Callable[[], object] = lambda: None,
                warmup: bool = True) -> list[float]:
    """Milliseconds of each action (each a different input); with warmup the first is run untimed, the rest timed."""
    if warmup:
        before()
        actions[0]()
        actions = actions[1:]
    out = []
    for act in actions:
        before()  # outside the timing: e.g. clear the card cache, so every card is computed fresh
        t0 = time.perf_counter()
        act()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def shipped(n_windows: int):
    """The shipped stories model, three of its dictionaries at their sites, and a gallery summary for each."""
    model = nbf.load_model("stories")
    corpus = StoryCorpus(seed=1)  # held out: the model and its dictionaries were trained on seed 0
    stream = torch.tensor([t for ids in corpus.encode(corpus.generate(10 * n_windows)) for t in ids[:-1]])
    windows = stream[: len(stream) // 128 * 128].view(-1, 128)[:n_windows]
    labels = corpus.concept_labels(windows)
    label_ids = torch.stack([labels[c] for c in labels], -1).reshape(-1, len(labels))
    vocab = token_strings(model)
    W_U = nbf.unwrap(model).lm_head.weight.detach().T
    site = "blocks.1.hook_resid_pre"
    acts = nbf.read_acts(model, windows, site)[site]
    sae, bae = load_sae(zoo.saes("stories")["local_k8"]), load_sae(zoo.saes("stories")[f"bae_{site}"])
    with torch.no_grad():
        latents, bits = sae(acts).latents, bae(acts).latents.reshape(-1, bae.cfg.d_sae)
    usual = bits.mean(0)
    cb = nbf.load_codebook_model("stories-codebook")
    z_site = "blocks.1.attn.hook_z"
    layer = cb.layer(z_site)
    C, G = layer.cfg.n_codes, layer.cfg.n_groups
    with torch.no_grad():
        codes = cb.run(windows).outputs[z_site].codes.reshape(-1, G, layer.cfg.k)  # [N, G, K]
    flat = (codes + torch.arange(G)[None, :, None] * C).reshape(len(codes), -1)
    rows = torch.arange(len(codes)).repeat_interleave(flat.shape[1])
    code_acts = torch.sparse_coo_tensor(torch.stack([rows, flat.reshape(-1)]), torch.ones(flat.numel()), (len(codes), G * C),
                                        check_invariants=False)
    common = dict(labels=label_ids, label_names=list(labels))
    out = {
        "TopK SAE local_k8": (model, site, sae, None, summarize_features(latents, windows, vocab, W_dec=sae.W_dec.detach(), W_U=W_U, **common)),
        "binary AE (deviation)": (model, site, bae, usual, summarize_features(deviation_acts(bits, usual), windows, vocab,
                                                                              W_dec=bae.W_dec.detach(), W_U=W_U, **common)),
        "codebook stories-codebook": (cb, z_site, None, None, summarize_features(code_acts, windows, vocab, **common)),
    }
    return out, windows.numel()


def gallery_rows(name: str, summary, reps: int) -> list[tuple]:
    g = FeatureGallery(summary)
    fresh = summary.card.cache_clear
    sorts = [v for _, v in g.sort_by.options]
    terms = ["girl", "", "#12", "", "happy", "", "dragon", ""]
    ids = [int(f) for f in summary.table.index[1:: max(1, len(summary.table) // (reps + 2))][: reps + 1]]
    n = reps + 1  # the first call of each is an untimed warm-up
    rows = [("sort_by", callback_ms([lambda v=sorts[(i + 1) % len(sorts)]: setattr(g.sort_by, "value", v) for i in range(n)], fresh)),
            ("search", callback_ms([lambda v=terms[i % len(terms)]: setattr(g.search, "value", v) for i in range(n)], fresh))]
    g.sort_by.value, g.search.value = "density", ""
    rows.append(("feature change", callback_ms([lambda f=f: setattr(g.feature, "value", f) for f in ids], fresh)))
    rows.append(("next button", callback_ms([g.next_button.click] * n, fresh)))
    return [("FeatureGallery", name, control, ms) for control, ms in rows]


def prompt_rows(name: str, model, site: str, dictionary, usual, summary, reps: int) -> list[tuple]:
    fn = prompt_features_fn(model, site, dictionary, k=8, usual=usual)
    view = PromptView(fn, card=summary, prompt=PROMPTS[0])
    fresh = summary.card.cache_clear

    def run(prompt: str) -> None:
        view.prompt.value = prompt
        view.compute_button.click()

    rows = [("prompt change + Run", callback_ms([lambda p=PROMPTS[(i + 1) % len(PROMPTS)] + " " * (i // len(PROMPTS)): run(p)
                                                 for i in range(reps + 1)], fresh))]
    run(PROMPTS[0])
    T = len(view.result.tokens)
    rows.append(("token selection", callback_ms([lambda t=(view.token.value + 1 + i) % T: setattr(view.token, "value", t)
                                                 for i in range(reps + 1)], fresh)))
    picks = [(t, int(f)) for t in range(T) for f in view.result.ids[t, 1:] if f >= 0]  # not the token's strongest
    picks = picks[:: max(1, len(picks) // (reps + 1))][:reps]

    def prepare(t: int, f: int) -> None:  # outside the timing: select the token, so f is in the list but not shown
        view.token.value = t
        if view.feature.value == f:
            view.feature.value = int(view.result.ids[t, 0])
        fresh()

    times = []
    for t, f in picks:
        times += callback_ms([lambda f=f: setattr(view.feature, "value", f)], lambda t=t, f=f: prepare(t, f), warmup=False)
    rows.append(("feature click", times))
    return [("PromptView", name, control, ms) for control, ms in rows]


def responsiveness_table(reps: int, n_windows: int) -> None:
    dictionaries, n_tokens = shipped(n_windows)
    rows = []
    for name, (model, site, dictionary, usual, summary) in dictionaries.items():
        rows += gallery_rows(name, summary, reps)
        rows += prompt_rows(name, model, site, dictionary, usual, summary, reps)
    print(f"\nControl callbacks on the shipped models (stories; galleries over {n_tokens} held-out tokens); "
          f"median of {reps} calls, each a different input, cards computed fresh; {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'panel':15s} {'dictionary':27s} {'control':21s} {'median ms':>9s} {'max ms':>8s} {'target ms':>9s} {'pass':>5s}")
    failed = 0
    for panel, name, control, ms in rows:
        med = statistics.median(ms)
        ok = med <= TARGET_MS
        failed += not ok
        print(f"{panel:15s} {name:27s} {control:21s} {med:9.1f} {max(ms):8.1f} {TARGET_MS:9.0f} {'pass' if ok else 'FAIL':>5s}")
    print(f"{len(rows) - failed} of {len(rows)} controls within {TARGET_MS:.0f} ms (median)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--control-reps", type=int, default=15, help="calls per control in the responsiveness table")
    p.add_argument("--windows", type=int, default=100, help="128-token windows the responsiveness galleries summarise")
    p.add_argument("--only", choices=["live", "gallery", "controls"], help="print only this table")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own); on a loaded machine 1 avoids "
                                                "oversubscription, which makes tiny forward passes 50x slower")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.only in (None, "live"):
        live_curves_table(a.steps, a.reps)
    if a.only in (None, "gallery"):
        gallery_table(a.features, a.tokens, a.reps)
    if a.only in (None, "controls"):
        responsiveness_table(a.control_reps, a.windows)


if __name__ == "__main__":
    main()
