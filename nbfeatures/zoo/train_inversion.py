"""Train an InversionView decoder for a zoo model and save it next to the model (resumable).

    python -m nbfeatures.zoo.train_inversion counting            # -> nbfeatures/zoo/counting/inversion/
    python -m nbfeatures.zoo.train_inversion tokfsm --steps 5 --out /tmp/d

Recipes: which sites, which inputs, which query positions, the decoder's shape and the step budget.
  counting: every default site (residual stream, attention / MLP outputs, the head), queries at the target
            letter and at ':' (the reference's choice), inputs of the counting task.
  tokfsm:   the residual stream before layer 0 and after every layer, any position after BOS, trajectories
            cut to BOS + 12 states (25 tokens), to keep a CPU run short.

Dimension key: B batch, T position.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.counting import Counting
from ..data.tokfsm import TokFSM
from ..inversion import DecoderConfig, DecoderTrainConfig, InversionDecoder, PairSource, default_sites, save_decoder, site_widths
from ..sites import load_model
from .provenance import run_info

ZOO_DIR = Path(__file__).parent
TOKFSM_LEN = 25  # BOS + 12 states


@dataclass(frozen=True)
class DecoderRecipe:
    sites: Callable  # model -> list of site names
    inputs: Callable[[int, int], torch.Tensor]  # (n, seed) -> ids [n, T]
    query_mask: Callable | None
    n_ctx: int
    eos_id: int | None
    bos_id: int
    train: DecoderTrainConfig
    decoder: dict  # DecoderConfig fields beyond the data's


def _counting_mask(ids_BT: torch.Tensor) -> torch.Tensor:
    colon = (ids_BT == Counting().colon_id).float().argmax(1)
    mask = torch.zeros_like(ids_BT, dtype=torch.bool)
    rows = torch.arange(len(ids_BT))
    mask[rows, colon] = mask[rows, colon - 1] = True
    return mask


RECIPES = {
    "counting": DecoderRecipe(default_sites, lambda n, seed: Counting().sample(n, seed)[0], _counting_mask,
                              Counting().seq_len, 0, 0, DecoderTrainConfig(steps=16000, batch_size=64, lr=1e-3), {}),  # fmt: skip
    "tokfsm": DecoderRecipe(lambda m: ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(4)],
                            lambda n, seed: TokFSM().sample(n, seed)[:, :TOKFSM_LEN], None, TOKFSM_LEN, None, TokFSM().special_id,
                            DecoderTrainConfig(steps=1200, batch_size=64, lr=1e-3), {}),  # fmt: skip
}


def build(name: str, model_path: str | Path | None = None, cfg: DecoderTrainConfig | None = None):
    """(decoder, pair source, train config) for recipe `name` on the zoo model (or the folder `model_path`)."""
    if name not in RECIPES:
        raise ValueError(f"unknown decoder recipe {name!r}; available: {sorted(RECIPES)}")
    r = RECIPES[name]
    model = load_model(model_path or name)
    sites = r.sites(model)
    widths = site_widths(model, sites, r.bos_id)
    vocab = model._module.config.vocab_size
    dcfg = DecoderConfig(vocab_size=vocab, n_ctx=r.n_ctx, sites=tuple(sites), d_act=max(widths.values()), bos_id=r.bos_id,
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = RECIPES[args.name].train
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps, warmup_steps=min(cfg.warmup_steps, args.steps))
    out = args.out or ZOO_DIR / args.name / "inversion"
    ckpt = args.checkpoint or out.with_name(out.name + ".ckpt")
    decoder, source, cfg = build(args.name, args.model, cfg)
    start = time.perf_counter()
    history = train_decoder(decoder, source, cfg, checkpoint=ckpt, progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    card = {
        "probed_model": args.name, "train_config": dataclasses.asdict(cfg), "pairs_seen": cfg.steps * cfg.batch_size,
        "final_train_loss": history[-1]["smooth_loss"], "wall_time_s_this_run": round(wall_s, 1),
        "wall_time_s_total": round(history[-1]["elapsed_s"], 1),
        **run_info(args.threads),
        "command": f"nice -n 10 python -m nbfeatures.zoo.train_inversion {args.name} --steps {cfg.steps} --threads {args.threads}",
        "loss_curve": [(r["step"], round(r["smooth_loss"], 4)) for r in history[::4]],
    }  # fmt: skip
    save_decoder(decoder, out, {"card": card})
    print(json.dumps({"out": str(out), "wall_time_s": card["wall_time_s_total"], "loss": card["final_train_loss"]}))  # CLI output


if __name__ == "__main__":
    main()
