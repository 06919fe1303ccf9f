"""Forward-pass cost of codebooks: a TokFSM-shaped model with and without codebooks inserted.

    python benchmarks/bench_codebook.py [--batch 64] [--seq 128] [--reps 10] [--threads 1]

Codebooks go where the paper puts them: one per attention head (hook_z) and one on every MLP
output, k = 1, at 1k and 10k codes. The configurations are timed round-robin (one call of each per
repetition), so load from other processes drifting during the run hits them alike; times are medians,
and the ratio is against the same model without codebooks, run through the same site layer (plain
forward shown for reference). Target: at most 1.5x.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

import nbfeatures as nbf
from nbfeatures.codebook import CodebookConfig, CodebookLayer
from nbfeatures.codebook_model import CodebookModel
from _timing import timed  # benchmarks/_timing.py (scripts run from benchmarks/ on sys.path)


def tokfsm_model():
    try:
        from nbfeatures.zoo import load_pretrained

        hf, tok = load_pretrained("tokfsm")
        return nbf.wrap(hf, tok), "zoo tokfsm"
    except Exception:  # no shipped model yet: a random model of the same shape
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(0)
        cfg = GPTNeoXConfig(vocab_size=11, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                            max_position_embeddings=128, bos_token_id=10, eos_token_id=10)
        return nbf.wrap(GPTNeoXForCausalLM(cfg).eval()), "random GPT-NeoX of the tokfsm shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    model, label = tokfsm_model()
    hf = nbf.unwrap(model)
    n_layers, n_heads, d = hf.config.num_hidden_layers, hf.config.num_attention_heads, hf.config.hidden_size
    ids = torch.randint(0, 10, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = [("plain forward", lambda: hf(ids).logits), ("site layer, no codebooks", lambda: nbf.run(model, ids).logits)]
    for n_codes in (1000, 10000):
        layers = {}
        for i in range(n_layers):
            layers[f"blocks.{i}.attn.hook_z"] = CodebookLayer(CodebookConfig(d // n_heads, n_codes, k=1, n_groups=n_heads), seed=i).eval()
            layers[f"blocks.{i}.hook_mlp_out"] = CodebookLayer(CodebookConfig(d, n_codes, k=1), seed=100 + i).eval()
        cb = CodebookModel(model, layers)
        rows.append((f"attn (per head) + MLP codebooks, C={n_codes}", lambda cb=cb: cb.run(ids).logits))
    for _, fn in rows:  # warm-up
        fn()
    samples = {name: [] for name, _ in rows}
    for _ in range(args.reps):
        for name, fn in rows:
            samples[name].append(timed(fn, 1, warmup=0))
    times = {name: statistics.median(v) for name, v in samples.items()}
    base = times["site layer, no codebooks"]
    print(f"model: {label}, {n_layers} layers x {n_heads} heads, d={d}; batch {args.batch}x{args.seq}; CPU threads {torch.get_num_threads()}")
    print(f"{'configuration':<46} {'ms':>8} {'ratio':>6}")
    for name, t in times.items():
        print(f"{name:<46} {t * 1e3:>8.1f} {t / base:>6.2f}")


if __name__ == "__main__":
    main()
