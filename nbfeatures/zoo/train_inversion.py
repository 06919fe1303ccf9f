"""Train an InversionView decoder for a zoo model and save it next to the model (resumable).

    python -m nbfeatures.zoo.train_inversion counting            # -> nbfeatures/zoo/counting/inversion/
    python -m nbfeatures.zoo.train_inversion tokfsm --steps 5 --out /tmp/d

Recipes: which sites, which inputs, which query positions, the decoder's shape and the step budget.
  counting: every default site (residual stream, attention / MLP outputs, the head), queries at the target
            letter and at ':' (the reference's choice), inputs of the counting task. The shipped decoder is two runs:
            the recipe's 16000 steps, then `--init <it> --steps 14000 --batch-size 256 --lr 5e-4 --rebalance 6
            --eval-every 500 --eval-queries 32 --threads 2` (each card keeps the one before it under "warm_start").
  tokfsm:   the residual stream before layer 0 and after every layer, any position after BOS, trajectories
            cut to BOS + 12 states (25 tokens), to keep a CPU run short; plus one feature site: a k = 1 codebook
            of k-means codes on the last residual stream (fitted first, saved in <out>/codebook), one code at a time.
            Shipped: 3000 steps (`--eval-every 500`), then `--init <it> --steps 4000 --lr 5e-4 --eval-every 1000`.

Dimension key: B batch, T position.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.counting import Counting
from ..data.tokfsm import TokFSM
from .._io import load_json
from ..inversion import (DecoderConfig, DecoderTrainConfig, FeatureSite, InversionDecoder, PairSource, default_sites,
                         load_decoder, save_decoder, site_name, site_widths)
from ..sites import load_model
from .provenance import run_info

ZOO_DIR = Path(__file__).parent
TOKFSM_LEN = 25  # BOS + 12 states


@dataclass(frozen=True)
class DecoderRecipe:
    sites: Callable  # (model, decoder folder) -> site names and FeatureSites
    inputs: Callable[[int, int], torch.Tensor]  # (n, seed) -> ids [n, T]
    query_mask: Callable | None
    n_ctx: int
    eos_id: int | None
    bos_id: int
    train: DecoderTrainConfig
    decoder: dict  # DecoderConfig fields beyond the data's


TOKFSM_FEATURE_SITE = "blocks.3.hook_resid_post"
TOKFSM_CODEBOOK = dict(n_codes=200, k=1, n_walks=2048, kmeans_iters=20, seed=0)


def tokfsm_codebook(model, folder: Path):
    """The codebook behind the tokfsm decoder's feature site: k-means codes of the last residual stream (a dictionary
    read off the unchanged model, not inserted), loaded from folder/codebook or fitted there first."""
    from .._io import load_tensors, save_json, save_tensors
    from ..codebook import CodebookConfig, CodebookLayer
    from ..harvest import harvest

    r = TOKFSM_CODEBOOK
    path = folder / "codebook"
    if (path / "codebook.json").is_file():
        config = load_json(path / "codebook.json")["config"]
        return CodebookLayer.from_saved(config, load_tensors(path / "codebook.safetensors").get("codebook"), f"{path}: codebook")
    acts = harvest(model, TokFSM().sample(r["n_walks"], seed=11)[:, :TOKFSM_LEN], TOKFSM_FEATURE_SITE, batch_size=256, progress=False)
    layer = CodebookLayer(CodebookConfig(acts[TOKFSM_FEATURE_SITE].shape[1], r["n_codes"], r["k"]), seed=r["seed"])
    with torch.no_grad():
        layer.init_kmeans_(acts[TOKFSM_FEATURE_SITE], iters=r["kmeans_iters"], seed=r["seed"])
    save_tensors(path / "codebook.safetensors", {"codebook": layer.codebook})
    save_json(path / "codebook.json", {"config": layer.config_dict(), "site": TOKFSM_FEATURE_SITE, "model": "tokfsm", "recipe": r})
    return layer.eval()


def _tokfsm_sites(model, folder: Path) -> list:
    return (["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(4)]
            + [FeatureSite.from_codebook(tokfsm_codebook(model, folder), TOKFSM_FEATURE_SITE)])  # fmt: skip


def _counting_mask(ids_BT: torch.Tensor) -> torch.Tensor:
    colon = (ids_BT == Counting().colon_id).float().argmax(1)
    mask = torch.zeros_like(ids_BT, dtype=torch.bool)
    rows = torch.arange(len(ids_BT))
    mask[rows, colon] = mask[rows, colon - 1] = True
    return mask


RECIPES = {
    "counting": DecoderRecipe(lambda m, folder: default_sites(m), lambda n, seed: Counting().sample(n, seed)[0], _counting_mask,
                              Counting().seq_len, 0, 0, DecoderTrainConfig(steps=16000, batch_size=64, lr=1e-3), {}),  # fmt: skip
    "tokfsm": DecoderRecipe(_tokfsm_sites, lambda n, seed: TokFSM().sample(n, seed)[:, :TOKFSM_LEN], None, TOKFSM_LEN, None, TokFSM().special_id,
                            DecoderTrainConfig(steps=1200, batch_size=64, lr=1e-3), {}),  # fmt: skip
}


def build(name: str, model_path: str | Path | None = None, cfg: DecoderTrainConfig | None = None, folder: Path | None = None):
    """(decoder, pair source, train config) for recipe `name` on the zoo model (or the folder `model_path`).

    `folder` is where the decoder lives (default: the zoo's); a recipe keeps what its feature sites need there."""
    if name not in RECIPES:
        raise ValueError(f"unknown decoder recipe {name!r}; available: {sorted(RECIPES)}")
    r = RECIPES[name]
    model = load_model(model_path or name)
    sites = r.sites(model, Path(folder) if folder is not None else ZOO_DIR / name / "inversion")
    widths = site_widths(model, sites, r.bos_id)
    vocab = model._module.config.vocab_size
    dcfg = DecoderConfig(vocab_size=vocab, n_ctx=r.n_ctx, sites=tuple(site_name(s) for s in sites), d_act=max(widths.values()), bos_id=r.bos_id,
                         eos_id=r.eos_id, **r.decoder)  # fmt: skip
    source = PairSource(model, sites, r.inputs, r.query_mask, r.eos_id)
    return InversionDecoder(dcfg), source, cfg or r.train


def main(argv=None):
    from ..inversion import train_decoder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--model", default=None, help="probed model folder (default: the zoo model of that name)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: nbfeatures/zoo/<name>/inversion")
    parser.add_argument("--checkpoint", type=Path, default=None, help="resumable training state (default: <out>.ckpt)")
    parser.add_argument("--init", type=Path, default=None, help="a decoder folder to start from (warm start; same config)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rebalance", type=float, default=None, help="site rebalancing strength (0: uniform sites)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between in-epsilon measurements")
    parser.add_argument("--eval-queries", type=int, default=None, help="held-out queries per site in each measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = RECIPES[args.name].train
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps, warmup_steps=min(cfg.warmup_steps, args.steps))
    given = {"batch_size": args.batch_size, "lr": args.lr, "rebalance": args.rebalance, "eval_every": args.eval_every,
             "eval_queries": args.eval_queries}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    out = args.out or ZOO_DIR / args.name / "inversion"
    ckpt = args.checkpoint or out.with_name(out.name + ".ckpt")
    decoder, source, cfg = build(args.name, args.model, cfg, folder=out)
    init_card = None
    if args.init is not None:
        init = load_decoder(args.init)
        if init.cfg != decoder.cfg:
            raise ValueError(f"{args.init}: its decoder config {init.cfg} differs from recipe {args.name!r}'s {decoder.cfg}")
        decoder.load_state_dict(init.state_dict())
        init_card = load_json(args.init / "decoder.json").get("card")
    start = time.perf_counter()
    history = train_decoder(decoder, source, cfg, checkpoint=ckpt, progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    card = {
        "probed_model": args.name, "train_config": dataclasses.asdict(cfg),
        "pairs_seen": cfg.steps * cfg.batch_size + (init_card or {}).get("pairs_seen", 0),
        "final_train_loss": history[-1]["smooth_loss"], "wall_time_s_this_run": round(wall_s, 1),
        "wall_time_s_total": round(history[-1]["elapsed_s"], 1),
        **run_info(args.threads),
        "command": f"python -m nbfeatures.zoo.train_inversion {' '.join(argv if argv is not None else sys.argv[1:])}",
        "loss_curve": [(r["step"], round(r["smooth_loss"], 4)) for r in history[::4]],
        "inside_curve": [(r["step"], r["inside"]) for r in history if "inside" in r],
        "site_weights_curve": [(r["step"], r["site_weights"]) for r in history if "site_weights" in r],
        "warm_start": init_card,  # the card of the decoder this run started from (None: from scratch)
    }  # fmt: skip
    if init_card is not None:
        card["wall_time_s_total"] = round(card["wall_time_s_total"] + init_card["wall_time_s_total"], 1)
    save_decoder(decoder, out, {"card": card})
    print(json.dumps({"out": str(out), "wall_time_s": card["wall_time_s_total"], "loss": card["final_train_loss"]}))  # CLI output


if __name__ == "__main__":
    main()
