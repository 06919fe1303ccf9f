"""Forward-pass cost of codebooks: a TokFSM-shaped model with and without codebooks inserted.

    python benchmarks/bench_codebook.py [--batch 64] [--seq 128] [--reps 10] [--threads 1]

Codebooks go where the paper puts them: one per attention head (hook_z) and one on every MLP
output, k = 1, at 1k and 10k codes, their codes drawn from the model's own (normalised) activations
as a k-means initialisation would place them. Each size runs with the exact search and with the IVF
index (`CodebookModel.use_ivf`); `agree` is the fraction of (token, codebook) choices the IVF search
shares with the exact one on the timed batch. The configurations are timed round-robin (one call of
each per repetition), so load from other processes drifting during the run hits them alike; times
are medians, and the ratio is against the same model without codebooks, run through the same site
layer (plain forward shown for reference). Target: at most 1.5x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch

import nbfeatures as nbf
from nbfeatures.codebook import CodebookConfig, CodebookLayer, IVFConfig
from nbfeatures.codebook import CodebookModel
from _timing import timed  # benchmarks/_timing.py (scripts run from benchmarks/ on sys.path)

N_CODES = (1000, 10000)  # codes per codebook, timed


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
    parser.add_argument("--n-probe", type=int, default=4, help="IVF lists searched per token")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    model, label = tokfsm_model()
    hf = nbf.unwrap(model)
    n_layers, n_heads, d = hf.config.num_hidden_layers, hf.config.num_attention_heads, hf.config.hidden_size
    ids = torch.randint(0, 10, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = [("plain forward", lambda: hf(ids).logits), ("site layer, no codebooks", lambda: nbf.run(model, ids).logits)]
    site_list = [s for i in range(n_layers) for s in (f"blocks.{i}.attn.hook_z", f"blocks.{i}.hook_mlp_out")]
    pool = nbf.read_acts(model, torch.randint(0, 10, (96, args.seq), generator=torch.Generator().manual_seed(1)), site_list)
    agree = {}  # row name -> agreement of its IVF search with exact search
    for n_codes in N_CODES:
        layers = {}
        for j, s in enumerate(site_list):
            per_head = s.endswith("attn.hook_z")
            layer = CodebookLayer(CodebookConfig(d // n_heads if per_head else d, n_codes, k=1, n_groups=n_heads if per_head else 1), seed=j)
            acts = pool[s][:, 1:].reshape(-1, *layer.codebook.shape[::2]).float()  # [N, G, E]
            pick = torch.randperm(len(acts), generator=torch.Generator().manual_seed(j))[:n_codes]
            layer.codebook.data = torch.nn.functional.layer_norm(acts[pick], (acts.shape[-1],)).transpose(0, 1).contiguous()
            layers[s] = layer.eval()
        cb = CodebookModel(model, layers)
        exact = cb.run(ids).outputs
        ivf = CodebookModel(model, {s: copy.deepcopy(layer) for s, layer in layers.items()}).use_ivf(IVFConfig(n_probe=args.n_probe))
        approx = ivf.run(ids).outputs
        ivf_row = f"  same, C={n_codes}, IVF search (n_probe={args.n_probe})"
        agree[ivf_row] = sum(float((approx[s].codes == exact[s].codes).float().mean()) for s in site_list) / len(site_list)
        rows.append((f"attn (per head) + MLP codebooks, C={n_codes}", lambda cb=cb: cb.run(ids).logits))
        rows.append((ivf_row, lambda cb=ivf: cb.run(ids).logits))
    for _, fn in rows:  # warm-up
        fn()
    samples = {name: [] for name, _ in rows}
    for _ in range(args.reps):
        for name, fn in rows:
            samples[name].append(timed(fn, 1, warmup=0))
    times = {name: statistics.median(v) for name, v in samples.items()}
    base = times["site layer, no codebooks"]
    print(f"model: {label}, {n_layers} layers x {n_heads} heads, d={d}; batch {args.batch}x{args.seq}; CPU threads {torch.get_num_threads()}")
    d_ff = hf.config.intermediate_size
    model_macs = n_layers * (4 * d * d + 2 * d * d_ff + args.seq * d)  # projections, MLP, causal QK and AV (mean T/2 each)
    for n_codes in N_CODES:  # exact search scores every code: d MACs per code per token at each of the 2 sites per layer
        cb_macs = n_layers * 2 * d * n_codes
        print(f"C={n_codes}: exact search {cb_macs / 1e6:.2f}M MACs/token vs the model's {model_macs / 1e6:.2f}M: "
              f"ratio >= {1 + cb_macs / model_macs:.2f} even at the model's own FLOP rate")
    print(f"{'configuration':<46} {'ms':>8} {'ratio':>6} {'agree':>6}")
    for name, t in times.items():
        a = f"{agree[name]:.3f}" if name in agree else ""
        print(f"{name:<46} {t * 1e3:>8.1f} {t / base:>6.2f} {a:>6}")


if __name__ == "__main__":
    main()
