"""Held-out in-epsilon fraction of counting decoders at ':' (the measurement behind notebook 06's "37% +- 3%").

    python benchmarks/inversion_in_eps.py [DECODER_OR_CHECKPOINT_FOLDER ...] [--sites blocks.1.hook_attn_out ...] [--threads 1]

For each of 60 held-out counting inputs (seed 2**29, never a training seed), query the activation at ':' and draw 32
samples at temperature 1 with `inversion.sample` (each re-run through the probed model); a query's score is the
fraction of its samples within epsilon = 0.1. Prints mean +- standard error over queries per decoder and site and,
for every decoder after the first, the paired difference to the first (same queries, same sampling seeds).
Default decoder: the shipped one (nbfeatures/zoo/counting/inversion). A training checkpoint (<out>.ckpt/step_*) is
read with the shipped decoder's config; its "pairs" column is then the pairs of that run alone (steps x batch size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import nbfeatures as nbf
from nbfeatures import zoo
from nbfeatures.data.counting import Counting
from nbfeatures.inversion import DecoderConfig, InversionDecoder, load_decoder, sample
from nbfeatures._io import load_json, load_tensors

N_QUERIES, N_SAMPLES, TEMPERATURE, EPSILON, QUERY_SEED = 60, 32, 1.0, 0.1, 2**29


def in_eps(decoder, model, site: str, n_queries: int = N_QUERIES) -> np.ndarray:
    """Per query: the fraction of its samples inside epsilon (query b at ':' of held-out input b, seed b)."""
    ids, colon, _ = Counting().sample(n_queries, seed=QUERY_SEED)
    out = []
    for b in range(n_queries):
        q, p = ids[b, : int(colon[b]) + 2], int(colon[b])
        s = sample(decoder, model, site, query=q, position=p, temperatures=(TEMPERATURE,), n_per_temperature=N_SAMPLES,
                   epsilon=EPSILON, seed=b)  # fmt: skip
        out.append(s.inside_fraction)
    return np.array(out)


def load(folder: Path) -> tuple[InversionDecoder, int]:
    """(decoder, pairs seen) from a decoder folder or a training checkpoint."""
    if not (folder / "dictionary.safetensors").is_file():
        return load_decoder(folder), zoo.card(folder)["pairs_seen"]
    cfg = load_json(zoo.path("counting") / "inversion" / "decoder.json")["config"]
    decoder = InversionDecoder(DecoderConfig(**cfg))
    decoder.load_state_dict(load_tensors(folder / "dictionary.safetensors"))
    state = load_json(folder / "trainer_state.json")
    return decoder.eval(), state["step"] * state["config"]["batch_size"]


def mean_se(x: np.ndarray) -> str:
    return f"{x.mean():.3f} +- {x.std(ddof=1) / np.sqrt(len(x)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("decoders", nargs="*", type=Path, default=[zoo.path("counting") / "inversion"])
    parser.add_argument("--sites", nargs="+", default=["blocks.1.hook_attn_out"])
    parser.add_argument("--queries", type=int, default=N_QUERIES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write per-query scores here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = nbf.load_model("counting")
    scores, t0 = {}, time.perf_counter()
    print(f"{'decoder':48} {'pairs':>9} {'site':24} {'in eps (T=1)':>16} {'paired diff':>16}")
    for folder in args.decoders:
        decoder, pairs = load(folder)
        for site in args.sites:
            x = scores[str(folder), site] = in_eps(decoder, model, site, args.queries)
            first = scores[str(args.decoders[0]), site]
            diff = mean_se(x - first) if folder != args.decoders[0] else ""
            print(f"{str(folder)[-48:]:48} {pairs:>9} {site:24} {mean_se(x):>16} {diff:>16}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({f"{f}|{s}": x.tolist() for (f, s), x in scores.items()}))


if __name__ == "__main__":
    main()
