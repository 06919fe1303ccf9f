"""TopK SAE training-step throughput: nbfeatures vs SAELens vs the dense-encoder floor.

    python benchmarks/bench_sae.py [--d-in 256] [--d-sae 32768] [--k 32] [--batch 4096] [--reps 3]

All rows train on the same synthetic activations in the same run. A step is forward, loss
(with AuxK), backward and an Adam update. The floor is the dense encoder matmul x @ W_enc,
forward and backward to W_enc, alone: what any TopK SAE must at least do if it computes every
pre-activation. Targets at d_in=256, d_sae=32768, k=32: at least 3x SAELens's throughput and
within 1.5x of the floor. The second table is step time against d_sae at fixed k.
"""

from __future__ import annotations

import argparse

import torch

from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from _timing import timed  # benchmarks/_timing.py (scripts run from benchmarks/ on sys.path)


def ours(d_in: int, d_sae: int, k: int, x: torch.Tensor):
    sae = TopKSAE(TopKConfig(d_in, d_sae, k))
    obj = TopKObjective(sae, dead_tokens=len(x) * 2)  # latents die after two steps, so AuxK runs
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)

    def step():
        loss, _ = obj(x)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        sae.before_step_()
        opt.step()
        sae.after_step_()

    return step


def floor(d_in: int, d_sae: int, x: torch.Tensor):
    W = torch.randn(d_in, d_sae, requires_grad=True)

    def step():
        pre = x @ W
        torch.autograd.backward(pre, torch.ones_like(pre))
        W.grad = None

    return step


def saelens(d_in: int, d_sae: int, k: int, x: torch.Tensor, sparse: bool):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu", use_sparse_activations=sparse)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 2] = True  # AuxK runs, as in ours

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(out.loss)  # the same call for every row (nnsight patches Tensor.backward)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # as SAELens's trainer does
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sweep", type=str, default="4096,8192,16384,32768,65536", help="d_sae values for the second table")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    print(f"TopK training step, d_in={args.d_in} d_sae={args.d_sae} k={args.k}, batch {args.batch} tokens, "
          f"CPU threads {torch.get_num_threads()}, median of {args.reps}")
    rows = [("nbfeatures TopKSAE", ours(args.d_in, args.d_sae, args.k, x)),
            ("dense encoder floor (x @ W_enc fwd+bwd)", floor(args.d_in, args.d_sae, x))]
    try:
        rows += [("SAELens TopKTrainingSAE", saelens(args.d_in, args.d_sae, args.k, x, sparse=False)),
                 ("SAELens TopKTrainingSAE, sparse acts", saelens(args.d_in, args.d_sae, args.k, x, sparse=True))]
    except ImportError:
        print("(sae-lens not installed: `pip install -e .[saelens]` for its rows)")
    times = {}
    for label, fn in rows:
        try:
            times[label] = timed(fn, args.reps)
        except Exception as e:  # report a broken configuration instead of losing the table
            print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
    t_ours = times["nbfeatures TopKSAE"]
    print(f"{'implementation':<42} {'step ms':>9} {'tokens/s':>10} {'ours is x faster':>17}")
    for label, t in times.items():
        print(f"{label:<42} {t * 1e3:>9.1f} {args.batch / t:>10.0f} {t / t_ours:>17.2f}")
    sl = [t for label, t in times.items() if label.startswith("SAELens")]  # the best SAELens mode that runs
    if sl:
        print(f"throughput vs best SAELens: {min(sl) / t_ours:.2f}x (target >= 3); "
              f"step time vs floor: {t_ours / times['dense encoder floor (x @ W_enc fwd+bwd)']:.2f}x (target <= 1.5)")

    print(f"\nstep time against d_sae at k={args.k}")
    print(f"{'d_sae':>7} {'nbfeatures ms':>14} {'floor ms':>9} {'ratio':>6}")
    for d_sae in (int(v) for v in args.sweep.split(",")):
        t_o = timed(ours(args.d_in, d_sae, args.k, x), args.reps)
        t_f = timed(floor(args.d_in, d_sae, x), args.reps)
        print(f"{d_sae:>7} {t_o * 1e3:>14.1f} {t_f * 1e3:>9.1f} {t_o / t_f:>6.2f}")


if __name__ == "__main__":
    main()
