"""SAE training-step throughput: nbfeatures TopK vs SAELens vs the dense-encoder floor, and our other sparse SAEs
(BatchTopK, JumpReLU, Matryoshka) against our TopK.

    python benchmarks/bench_sae.py [--d-in 256] [--d-sae 32768] [--k 32] [--batch 4096] [--reps 3] [--sweep 4096,...|""]
                                   [--threads N]

All rows train on the same synthetic activations in the same run. A step is forward, loss
(with AuxK where the SAE has it), backward and an Adam update. The floor is the dense encoder matmul x @ W_enc,
forward and backward to W_enc, alone: what any TopK SAE must at least do if it computes every
pre-activation. Targets at d_in=256, d_sae=32768, k=32: at least 3x SAELens's throughput and
within 1.5x of the floor; BatchTopK and JumpReLU steps within 1.5x of the TopK step. JumpReLU is timed where
training spends its time, with about k latents on per token (its thresholds set to the batch's k*N-th
pre-activation), not at initialisation, where half the latents are on and it takes its dense path.
The second table is step time against d_sae at fixed k (`--sweep ""` skips it).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from nbfeatures.sae import (BatchTopKConfig, BatchTopKObjective, BatchTopKSAE, JumpReLUConfig, JumpReLUSAE, MatryoshkaConfig,
                            MatryoshkaObjective, MatryoshkaSAE)
from nbfeatures.sae.topk import TopKConfig, TopKObjective, TopKSAE
from _timing import timed  # benchmarks/_timing.py (scripts run from benchmarks/ on sys.path)


def ours(d_in: int, d_sae: int, k: int, x: torch.Tensor, kind: str = "topk"):
    if kind == "topk":
        sae = TopKSAE(TopKConfig(d_in, d_sae, k))
        obj = TopKObjective(sae, dead_tokens=len(x) * 2)  # latents die after two steps, so AuxK runs
    elif kind == "batchtopk":
        sae = BatchTopKSAE(BatchTopKConfig(d_in, d_sae, k))
        obj = BatchTopKObjective(sae, dead_tokens=len(x) * 2)
    elif kind == "matryoshka":
        sae = MatryoshkaSAE(MatryoshkaConfig(d_in, d_sae, k))
        obj = MatryoshkaObjective(sae, dead_tokens=len(x) * 2)
    else:
        sae = JumpReLUSAE(JumpReLUConfig(d_in, d_sae))
        with torch.no_grad():  # about k on per token, as in training after the start
            pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc).flatten()
            sae.threshold.fill_(pre.topk(k * len(x), sorted=False).values.min().item())
        obj = sae.default_objective()
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    print(f"TopK training step, d_in={args.d_in} d_sae={args.d_sae} k={args.k}, batch {args.batch} tokens, "
          f"CPU threads {torch.get_num_threads()}, median of {args.reps}")
    others = {"nbfeatures BatchTopKSAE": "batchtopk", "nbfeatures JumpReLUSAE (~k on)": "jumprelu",
              "nbfeatures MatryoshkaSAE (4 prefixes)": "matryoshka"}
    rows = [("nbfeatures TopKSAE", ours(args.d_in, args.d_sae, args.k, x)),
            ("dense encoder floor (x @ W_enc fwd+bwd)", floor(args.d_in, args.d_sae, x))]
    rows += [(label, ours(args.d_in, args.d_sae, args.k, x, kind)) for label, kind in others.items()]
    try:
        rows += [("SAELens TopKTrainingSAE", saelens(args.d_in, args.d_sae, args.k, x, sparse=False)),
                 ("SAELens TopKTrainingSAE, sparse acts", saelens(args.d_in, args.d_sae, args.k, x, sparse=True))]
    except ImportError:
        print("(sae-lens not installed: `pip install -e .[saelens]` for its rows)")
    working = []
    for label, fn in rows:
        try:
            fn()  # warm-up (and the check that it runs at all)
            working.append((label, fn))
        except Exception as e:  # report a broken configuration instead of losing the table
            print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
    # one rep of every row per round: a machine whose load drifts slows every row alike, so the ratios hold
    rounds = [{label: timed(fn, 1, warmup=0) for label, fn in working} for _ in range(args.reps)]
    times = {label: statistics.median(r[label] for r in rounds) for label, _ in working}
    t_ours = times["nbfeatures TopKSAE"]
    print(f"{'implementation':<42} {'step ms':>9} {'tokens/s':>10} {'ours is x faster':>17}")
    for label, t in times.items():
        print(f"{label:<42} {t * 1e3:>9.1f} {args.batch / t:>10.0f} {t / t_ours:>17.2f}")
    sl = [t for label, t in times.items() if label.startswith("SAELens")]  # the best SAELens mode that runs
    if sl:
        print(f"throughput vs best SAELens: {min(sl) / t_ours:.2f}x (target >= 3); "
              f"step time vs floor: {t_ours / times['dense encoder floor (x @ W_enc fwd+bwd)']:.2f}x (target <= 1.5)")
    for label in others:
        if label in times:
            target = " (target <= 1.5)" if "Matryoshka" not in label else ""
            print(f"{label} step / TopKSAE step: {times[label] / t_ours:.2f}x{target}")

    if not args.sweep:
        return
    print(f"\nstep time against d_sae at k={args.k}")
    print(f"{'d_sae':>7} {'nbfeatures ms':>14} {'floor ms':>9} {'ratio':>6}")
    for d_sae in (int(v) for v in args.sweep.split(",")):
        t_o = timed(ours(args.d_in, d_sae, args.k, x), args.reps)
        t_f = timed(floor(args.d_in, d_sae, x), args.reps)
        print(f"{d_sae:>7} {t_o * 1e3:>14.1f} {t_f * 1e3:>9.1f} {t_o / t_f:>6.2f}")


if __name__ == "__main__":
    main()
