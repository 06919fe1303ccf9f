"""SAE training-step throughput and memory: nbfeatures TopK against the TopK floor, SAELens, eai-sparsify and its own
dense path, and our other sparse SAEs (BatchTopK, JumpReLU, Matryoshka) against our TopK.

    python benchmarks/bench_sae.py [--d-in 256] [--d-sae 32768] [--k 32] [--batch 4096] [--reps 3] [--threads N]
                                   [--block-size B] [--sweep 4096,...|""]

All rows train on the same synthetic activations in the same run, each rep timing every row once (a machine whose
load drifts slows every row alike, so the ratios hold). A step is zero_grad, forward, loss (with AuxK where the SAE
has it), backward and an Adam update, with the same fused Adam for every row (torch's unfused Adam allocates two
[F, D] temporaries per step and takes ~7x longer, whoever's SAE it steps). The floor is what any TopK that scores
every latent must at least do: the forward GEMM x @ W_enc and torch.topk on its result (no backward, no update).
Targets at d_in=256, d_sae=32768, k=32, batch 4096 on 2 threads: our TopK step <= 1.3x the floor, >= 5x SAELens's
TopKTrainingSAE and >= 2x eai-sparsify's SparseCoder (optional rows: installed or skipped), and the peak extra
memory of a step <= 25% of the dense [batch, d_sae] pre-activation matrix; BatchTopK and JumpReLU steps within 1.5x
of the TopK step. JumpReLU is timed where training spends its time, with about k latents on per token (its
thresholds set to the batch's k*N-th pre-activation), not at initialisation, where half the latents are on.

Peak extra memory is measured with torch.profiler's memory events (the CPU allocator reports every allocation and
free while profiling): the peak, during one step, of the bytes allocated in that step and not yet freed, its new
gradients included, over what is held before it (parameters, Adam state). The second table is step time against
d_sae at fixed k (`--sweep ""` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the profiler's "block allocated before profiling" notes

import torch

from nbfeatures.sae import (BatchTopKConfig, BatchTopKObjective, BatchTopKSAE, JumpReLUConfig, JumpReLUSAE, MatryoshkaConfig,
                            MatryoshkaObjective, MatryoshkaSAE)
from nbfeatures.sae.topk import BLOCK_SIZE, TopKConfig, TopKObjective, TopKSAE
from _timing import timed  # benchmarks/_timing.py (scripts run from benchmarks/ on sys.path)


def adam(params, **kw) -> torch.optim.Adam:
    """The same Adam for every row: fused where this torch has it for the device."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, **kw)


def ours(d_in: int, d_sae: int, k: int, x: torch.Tensor, kind: str = "topk", block_size: int | None = BLOCK_SIZE):
    if kind == "topk":
        sae = TopKSAE(TopKConfig(d_in, d_sae, k))
        obj = TopKObjective(sae, dead_tokens=len(x) * 2, block_size=block_size)  # latents die after two steps: AuxK runs
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
    opt = adam(sae.parameters(), lr=1e-4, eps=6.25e-10)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = obj(x)
        torch.autograd.backward(loss)
        sae.before_step_()
        opt.step()
        sae.after_step_()

    return step


def floor(d_in: int, d_sae: int, k: int, x: torch.Tensor):
    W = torch.randn(d_in, d_sae)

    def step():
        with torch.no_grad():
            (x @ W).topk(k, dim=1)

    return step


def saelens(d_in: int, d_sae: int, k: int, x: torch.Tensor, sparse: bool):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu", use_sparse_activations=sparse)
    sae = TopKTrainingSAE(cfg)
    opt = adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 2] = True  # AuxK runs, as in ours

    def step():
        opt.zero_grad(set_to_none=True)
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        torch.autograd.backward(out.loss)  # the same call for every row (nnsight patches Tensor.backward)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # as SAELens's trainer does
        opt.step()

    return step


def sparsify(d_in: int, d_sae: int, k: int, x: torch.Tensor):
    """eai-sparsify's SparseCoder as its Trainer steps it with Adam and AuxK (auxk_alpha 1/32, as ours)."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # "Triton not installed, using eager implementation ..."
        from sparsify import SparseCoder, SparseCoderConfig
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device="cpu", dtype=torch.float32)
    opt = adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 2] = True  # AuxK runs, as in ours

    def step():
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        torch.autograd.backward(out.fvu + out.auxk_loss / 32)
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()

    return step


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints profiler_start / profiler_stop lines on fd 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_extra_memory(step) -> int:
    """Peak bytes of the tensors one call of `step` allocates and has not yet freed (torch.profiler memory events,
    paired by address, so a free of memory allocated before the call is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    live, total, peak = {}, 0, 0
    for e in sorted(events, key=lambda e: e["ts"]):
        nbytes, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if nbytes > 0:
            live[addr] = live.get(addr, 0) + nbytes
            total += nbytes
        elif addr in live:
            total -= live.pop(addr)
        peak = max(peak, total)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="TopKObjective's latents per encoder tile")
    parser.add_argument("--sweep", type=str, default="4096,8192,16384,32768,65536", help="d_sae values for the second table")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    d, f, k, bs = args.d_in, args.d_sae, args.k, args.block_size
    print(f"TopK training step, d_in={d} d_sae={f} k={k}, batch {args.batch} tokens, block_size {bs}, "
          f"CPU threads {torch.get_num_threads()}, median of {args.reps}")
    OURS, DENSE, FLOOR = "nbfeatures TopKSAE", "nbfeatures TopKSAE, dense pre-acts", "TopK floor (x @ W_enc + topk, fwd)"
    others = {"nbfeatures BatchTopKSAE": "batchtopk", "nbfeatures JumpReLUSAE (~k on)": "jumprelu",
              "nbfeatures MatryoshkaSAE (4 prefixes)": "matryoshka"}
    rows = [(OURS, lambda: ours(d, f, k, x, block_size=bs)), (DENSE, lambda: ours(d, f, k, x, block_size=None)),
            (FLOOR, lambda: floor(d, f, k, x))]
    rows += [(label, lambda kind=kind: ours(d, f, k, x, kind)) for label, kind in others.items()]
    rows += [("SAELens TopKTrainingSAE", lambda: saelens(d, f, k, x, sparse=False)),
             ("SAELens TopKTrainingSAE, sparse acts", lambda: saelens(d, f, k, x, sparse=True)),
             ("eai-sparsify SparseCoder", lambda: sparsify(d, f, k, x))]
    working = {}
    for label, make in rows:
        try:
            fn = make()
            fn()  # warm-up (and the check that it runs at all)
            working[label] = fn
        except ImportError as e:
            print(f"{label}: skipped ({e.name} not installed: `pip install sae-lens eai-sparsify` for these rows)")
        except Exception as e:  # report a broken configuration instead of losing the table
            print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
    rounds = [{label: timed(fn, 1, warmup=0) for label, fn in working.items()} for _ in range(args.reps)]
    times = {label: statistics.median(r[label] for r in rounds) for label in working}
    t_ours = times[OURS]
    print(f"{'implementation':<42} {'step ms':>9} {'tokens/s':>10} {'ours is x faster':>17}")
    for label, t in times.items():
        print(f"{label:<42} {t * 1e3:>9.1f} {args.batch / t:>10.0f} {t / t_ours:>17.2f}")
    print(f"step time vs floor: {t_ours / times[FLOOR]:.2f}x (target <= 1.3); dense path vs floor: "
          f"{times[DENSE] / times[FLOOR]:.2f}x")
    sl = [t for label, t in times.items() if label.startswith("SAELens")]  # the best SAELens mode that runs
    if sl:
        print(f"throughput vs best SAELens: {min(sl) / t_ours:.2f}x (target >= 5)")
    if "eai-sparsify SparseCoder" in times:
        print(f"throughput vs eai-sparsify: {times['eai-sparsify SparseCoder'] / t_ours:.2f}x (target >= 2)")
    for label in others:
        if label in times:
            target = " (target <= 1.5)" if "Matryoshka" not in label else ""
            print(f"{label} step / TopKSAE step: {times[label] / t_ours:.2f}x{target}")
    dense_pre = args.batch * f * x.element_size()
    for label in (OURS, DENSE, *others):
        if label in working:
            peak = peak_extra_memory(working[label])
            print(f"peak extra memory of a {label} step: {peak / 2**20:.0f} MiB = {peak / dense_pre:.0%} of the dense "
                  f"[batch, d_sae] pre-activations ({dense_pre / 2**20:.0f} MiB)" + (" (target <= 25%)" if label == OURS else ""))

    if not args.sweep:
        return
    print(f"\nstep time against d_sae at k={k}")
    print(f"{'d_sae':>7} {'nbfeatures ms':>14} {'floor ms':>9} {'ratio':>6}")
    for d_sae in (int(v) for v in args.sweep.split(",")):
        t_o = timed(ours(d, d_sae, k, x, block_size=bs), args.reps)
        t_f = timed(floor(d, d_sae, k, x), args.reps)
        print(f"{d_sae:>7} {t_o * 1e3:>14.1f} {t_f * 1e3:>9.1f} {t_o / t_f:>6.2f}")


if __name__ == "__main__":
    main()
