"""Site-layer overhead: nbfeatures (nnsight) against raw torch forward hooks doing the same work.

    python benchmarks/bench_sites.py [--model stories] [--batch 32] [--seq 128] [--reps 30]

Each row times one operation both ways in the same run (median of --reps after warm-up) and
prints the ratio nbfeatures / reference. Targets: reading and editing at most 1.1x raw hooks at batch 32x128;
the pattern row's reference is transformers' own `output_attentions=True` on the eager path; the last row is the
interactive case, one short prompt against a raw forward, reported as measured.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import nbfeatures as nbf
from _timing import timed  # benchmarks/_timing.py (scripts run from benchmarks/ on sys.path)


class _Stop(Exception):
    pass


def tiny_gpt2() -> tuple[nn.Module, None]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=256, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a zoo name or model folder; default: a random 4-layer GPT-2, d=128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)

    if args.model:
        model = nbf.load_model(args.model) if hasattr(nbf, "load_model") else nbf.wrap(args.model)
    else:
        model = nbf.wrap(tiny_gpt2()[0])
    hf = nbf.unwrap(model)
    names = nbf.site_names(model)
    n_layers = sum(n.endswith("hook_resid_pre") for n in names)
    mid, last = f"blocks.{n_layers // 2 - 1}.hook_resid_post", f"blocks.{n_layers - 1}.hook_resid_post"
    mid_mod, last_mod = (hf.get_submodule(nbf.resolve(model, s).module) for s in (mid, last))
    d = hf.config.hidden_size if hasattr(hf.config, "hidden_size") else hf.config.n_embd
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    vector = torch.randn(d)
    sae = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))  # a stand-in dictionary

    def out0(o):
        return o[0] if isinstance(o, tuple) else o

    def run_until_stop(handles):
        """One forward pass with these hooks, stopped by the one that raises _Stop; the hooks are removed after."""
        try:
            hf(ids)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()

    def hook_read():
        store = {}

        def grab(key, stop):
            def hook(m, a, o):
                store[key] = out0(o)
                if stop:
                    raise _Stop
            return hook

        run_until_stop([mid_mod.register_forward_hook(grab(mid, False)), last_mod.register_forward_hook(grab(last, True))])
        return store

    def hook_edit(fn):
        h = mid_mod.register_forward_hook(lambda m, a, o: fn(out0(o)))
        try:
            return hf(ids).logits
        finally:
            h.remove()

    ten = [n for n in names if n.startswith(("blocks.0.", "blocks.1.")) and "pattern" not in n][:10]
    ten_mods = [(n, hf.get_submodule(nbf.resolve(model, n).module), nbf.resolve(model, n).io) for n in ten]

    def hook_read_many():
        store, hs = {}, []
        for key, mod, io in ten_mods:
            if io == "input":
                hs.append(mod.register_forward_pre_hook(lambda m, a, k=key: store.__setitem__(k, a[0].clone())))
            else:
                hs.append(mod.register_forward_hook(lambda m, a, o, k=key: store.__setitem__(k, out0(o).clone())))
        last_block = hf.get_submodule(nbf.resolve(model, "blocks.1.hook_resid_post").module)

        def stop(*_):
            raise _Stop

        run_until_stop(hs + [last_block.register_forward_hook(stop)])
        return store

    pattern = f"blocks.{n_layers - 1}.attn.hook_pattern"

    def eager_attentions():
        before, hf.config._attn_implementation = hf.config._attn_implementation, "eager"
        try:
            return hf(ids, output_attentions=True).attentions
        finally:
            hf.config._attn_implementation = before

    short = ids[:1, :8]
    rows = [
        ("plain forward (no hooks)", lambda: hf(ids).logits, lambda: hf(ids).logits),
        (f"read_acts at 2 sites (stops after {last})", lambda: nbf.read_acts(model, ids, [mid, last]), hook_read),
        ("splice a 4x dictionary", lambda: nbf.run(model, ids, [nbf.Splice(mid, sae)]).logits, lambda: hook_edit(sae)),
        ("steer all positions", lambda: nbf.run(model, ids, [nbf.Steer(mid, vector, 4.0)]).logits, lambda: hook_edit(lambda x: x + 4.0 * vector)),
        ("read_acts at 10 sites of blocks 0-1 in one call", lambda: nbf.read_acts(model, ids, ten[::-1]), hook_read_many),
        (f"read {pattern} (vs output_attentions, eager)", lambda: nbf.read_acts(model, ids, pattern), eager_attentions),
        ("one 8-token prompt: run() vs a raw forward", lambda: nbf.run(model, short).logits, lambda: hf(short).logits),
    ]
    print(f"model: {type(hf).__name__} {n_layers} layers, d={d}; batch {args.batch}x{args.seq}; torch threads {torch.get_num_threads()}")
    print(f"{'operation':<58} {'nbfeatures ms':>14} {'hook ms':>9} {'ratio':>7}")
    worst = 0.0
    for label, ours, ref in rows:
        t_ours, t_ref = timed(ours, args.reps, warmup=3) * 1e3, timed(ref, args.reps, warmup=3) * 1e3
        ratio = t_ours / t_ref
        if label.startswith(("read_acts", "splice", "steer")):
            worst = max(worst, ratio)
        print(f"{label:<58} {t_ours:>14.2f} {t_ref:>9.2f} {ratio:>7.2f}")
    print(f"worst reading / editing ratio {worst:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
