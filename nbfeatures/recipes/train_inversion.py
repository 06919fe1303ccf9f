"""Train an InversionView decoder for a zoo model and save it next to the model (resumable).

    python -m nbfeatures.recipes.train_inversion counting            # -> nbfeatures/zoo/counting/inversion/
    python -m nbfeatures.recipes.train_inversion tokfsm --steps 5 --out /tmp/d
    python -m nbfeatures.recipes.train_inversion counting --init nbfeatures/zoo/counting/inversion --device cuda --out /tmp/d

`--device cuda` puts the decoder and the probed model on the GPU (inputs are drawn on the CPU and their activations
come back there, so a seed gives the same pairs on any device); the weights are saved from the CPU and the card's
hardware names the device. benchmarks/gpu_inversion.sh holds the GPU session's commands (the same commands run on a
CPU without the flag).

Recipes: which sites, which inputs, which query positions, the decoder's shape and the step budget.
  counting: every default site (residual stream, attention / MLP outputs, the head), queries at the target
            letter and at ':' (the reference's choice), inputs of the counting task. The shipped decoder is two runs:
            the recipe's 16000 steps, then `--init <it> --steps 14000 --batch-size 256 --lr 5e-4 --rebalance 6
            --eval-every 500 --eval-queries 32 --threads 2` (each card keeps the one before it under "warm_start").
            Measured on CPU for 614k more pairs each (benchmarks/inversion_in_eps.py: 60 held-out queries at ':',
            T = 1; 39.0% +- 2.9% in epsilon at blocks.1.hook_attn_out before): the same recipe 39.9%, batch 1024 at
            lr 1e-3 39.2%, `--focus blocks.1.hook_attn_out --focus-share 0.5` (half of the pairs there) 43.7%, but
            blocks.0.hook_attn_out fell from 47.2% to 43.9% with it: quality moved between sites, none was added, so
            the shipped decoder stays the two-run one.
  tokfsm:   the residual stream before layer 0 and after every layer, any position after BOS, trajectories
            cut to BOS + 12 states (25 tokens), to keep a CPU run short; plus one feature site: a k = 1 codebook
            of k-means codes on the last residual stream (fitted first, saved in <out>/codebook), one code at a time.
            Shipped: 3000 steps (`--eval-every 500`), then `--init <it> --steps 4000 --lr 5e-4 --eval-every 1000`.

Dimension key: B batch, T position.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .._io import atomic_folder
from ..codebook import CodebookConfig, CodebookLayer, load_codebook_layer, save_codebook_layer
from ..data.counting import Counting
from ..data.tokfsm import TokFSM
from ..harvest import harvest
from ..inversion import (DecoderConfig, FeatureSite, InversionDecoder, PairSource, RebalanceConfig, decoder_train_config,
                         default_sites, load_decoder, save_decoder, site_name, site_widths, train_decoder)
from ..train import TrainConfig
from ..zoo import ZOO_DIR, card, load_model
from .common import loss_curve, parse, parser, write_card
TOKFSM_LEN = 25  # BOS + 12 states


@dataclass(frozen=True)
class DecoderRecipe:
    sites: Callable  # (model, decoder folder) -> site names and FeatureSites
    inputs: Callable[[int, int], torch.Tensor]  # (n, seed) -> ids [n, T]
    query_mask: Callable | None
    n_ctx: int
    eos_id: int | None
    bos_id: int
    train: TrainConfig
    rebalance: RebalanceConfig
    decoder: dict  # DecoderConfig fields beyond the data's


TOKFSM_FEATURE_SITE = "blocks.3.hook_resid_post"
TOKFSM_CODEBOOK = dict(n_codes=200, k=1, n_walks=2048, kmeans_iters=20, seed=0)


def tokfsm_codebook(model, folder: Path):
    """The codebook behind the tokfsm decoder's feature site: k-means codes of the last residual stream (a dictionary
    read off the unchanged model, not inserted), loaded from folder/codebook or fitted and saved there first."""
    path = folder / "codebook"
    if (path / "codebook.json").is_file():
        return load_codebook_layer(path)
    r = TOKFSM_CODEBOOK
    acts = harvest(model, TokFSM().sample(r["n_walks"], seed=11)[:, :TOKFSM_LEN], TOKFSM_FEATURE_SITE, batch_size=256, progress=False)
    acts = acts[TOKFSM_FEATURE_SITE].cpu()  # the codebook lives on the CPU, with the pairs, whatever device the model is on
    layer = CodebookLayer(CodebookConfig(acts.shape[1], r["n_codes"], r["k"]), seed=r["seed"])
    with torch.no_grad():
        layer.init_kmeans_(acts, iters=r["kmeans_iters"], seed=r["seed"])
    save_codebook_layer(layer, path, site=TOKFSM_FEATURE_SITE, model="tokfsm", recipe=r)
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
                              Counting().seq_len, 0, 0, decoder_train_config(steps=16000), RebalanceConfig(), {}),  # fmt: skip
    "tokfsm": DecoderRecipe(_tokfsm_sites, lambda n, seed: TokFSM().sample(n, seed)[:, :TOKFSM_LEN], None, TOKFSM_LEN, None, TokFSM().special_id,
                            decoder_train_config(steps=1200), RebalanceConfig(), {}),  # fmt: skip
}


def build(name: str, model_path: str | Path | None = None, cfg: TrainConfig | None = None, folder: Path | None = None,
          device: str | torch.device = "cpu"):  # fmt: skip
    """(decoder, pair source, train config) for recipe `name` on the zoo model (or the folder `model_path`).

    `folder` is where the decoder lives (default: the zoo's); a recipe keeps what its feature sites need there.
    The decoder and the probed model sit on `device`; the inputs are drawn on the CPU, their activations come back
    there, and the training loop moves each batch to the decoder."""
    if name not in RECIPES:
        raise ValueError(f"unknown decoder recipe {name!r}; available: {sorted(RECIPES)}")
    r = RECIPES[name]
    model = load_model(model_path or name, device=device)
    sites = r.sites(model, Path(folder) if folder is not None else ZOO_DIR / name / "inversion")
    widths = site_widths(model, sites, r.bos_id)
    vocab = model._module.config.vocab_size
    dcfg = DecoderConfig(vocab_size=vocab, n_ctx=r.n_ctx, sites=tuple(site_name(s) for s in sites), d_act=max(widths.values()), bos_id=r.bos_id,
                         eos_id=r.eos_id, **r.decoder)  # fmt: skip
    source = PairSource(model, sites, r.inputs, r.query_mask, r.eos_id)
    return InversionDecoder(dcfg).to(device), source, cfg or r.train


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--model", default=None, help="probed model folder (default: the zoo model of that name)")
    p.add_argument("--checkpoint", type=Path, default=None, help="resumable training state (default: <out>.ckpt)")
    p.add_argument("--init", type=Path, default=None, help="a decoder folder to start from (warm start; same config)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rebalance", type=float, default=None, help="site rebalancing strength (0: uniform sites)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between in-epsilon measurements")
    p.add_argument("--eval-queries", type=int, default=None, help="held-out queries per site in each measurement")
    p.add_argument("--focus", default=None, help="a site that gets --focus-share of the pairs whatever the rebalancing says")
    p.add_argument("--focus-share", type=float, default=None)
    p.add_argument("--device", default="cpu", help="where the decoder and the probed model run: cpu (default), cuda, cuda:1 ...")
    args = parse(p, argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
    out = args.out or ZOO_DIR / args.name / "inversion"
    r = RECIPES[args.name]
    changes = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    cfg = dataclasses.replace(r.train, **{k: v for k, v in changes.items() if v is not None})
    cfg = dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, cfg.steps), checkpoint_every=min(200, cfg.steps),
                              checkpoint_dir=str(args.checkpoint or out.with_name(out.name + ".ckpt")))  # fmt: skip
    changes = {"rebalance": args.rebalance, "eval_every": args.eval_every, "eval_queries": args.eval_queries, "focus": args.focus,
               "focus_share": args.focus_share}  # fmt: skip
    rebalance = dataclasses.replace(r.rebalance, **{k: v for k, v in changes.items() if v is not None})
    decoder, source, cfg = build(args.name, args.model, cfg, folder=out, device=device)
    init_card = None
    if args.init is not None:
        init = load_decoder(args.init)
        if init.cfg != decoder.cfg:
            raise ValueError(f"{args.init}: its decoder config {init.cfg} differs from recipe {args.name!r}'s {decoder.cfg}")
        decoder.load_state_dict(init.state_dict())
        init_card = card(args.init)
    start = time.perf_counter()
    history = train_decoder(decoder, source, cfg, rebalance, progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    decoder.cpu()  # the weights are saved from the CPU whatever device trained them
    with atomic_folder(out, keep=("codebook",)) as tmp:
        save_decoder(decoder, tmp)
        written = write_card(tmp, args, wall_s, probed_model=args.name, train_config=dataclasses.asdict(cfg),
                             rebalance=dataclasses.asdict(rebalance),
                             pairs_seen=cfg.steps * cfg.batch_size + (init_card or {}).get("pairs_seen", 0),
                             final_train_loss=history[-1]["smooth_loss"], wall_time_s_this_run=round(wall_s, 1),
                             wall_time_s_total=round(history[-1]["elapsed_s"] + (init_card or {}).get("wall_time_s_total", 0.0), 1),
                             loss_curve=loss_curve(history),
                             inside_curve=[(r["measured_at"], r["inside"]) for r in history if "inside" in r],
                             site_weights_curve=[(r["measured_at"], r["site_weights"]) for r in history if "site_weights" in r],
                             warm_start=init_card)  # the card of the decoder this run started from (None: from scratch)  # fmt: skip
    print(json.dumps({"out": str(out), "wall_time_s": written["wall_time_s_total"], "loss": written["final_train_loss"]}))  # CLI output


if __name__ == "__main__":
    main()
