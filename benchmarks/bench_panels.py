"""Panel costs: LiveCurves' overhead on a notebook-scale training run, and FeatureGallery's compute time.

    python benchmarks/bench_panels.py [--steps 300] [--features 4096] [--tokens 100000] [--reps 3]

1. LiveCurves: the same TopK SAE run (d_in 128, d_sae 2048, k 16, batch 512, the notebook's settings)
   with no callback, with LiveCurves (FigureWidget, every 10 steps as in the notebook) and with
   LiveCurves forced to draw on every call (no throttle). Target: under 5% overhead.
2. FeatureGallery: `summarize_features` (everything the list and the cards need, for every feature)
   for 4096 features over 100k tokens of TopK latents (k=32), against the reference cost of computing
   those latents with the SAE; plus one card and the panel's construction.
"""

from __future__ import annotations

import argparse
import time

import torch

from nbfeatures.features import summarize_features
from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from nbfeatures.train import TrainConfig, train_sae
from nbfeatures.widgets import FeatureGallery, LiveCurves
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    live_curves_table(a.steps, a.reps)
    gallery_table(a.features, a.tokens, a.reps)


if __name__ == "__main__":
    main()
