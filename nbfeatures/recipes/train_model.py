"""Train a zoo base model from its recipe and save it as a self-contained transformers folder with a card.

    python -m nbfeatures.recipes.train_model tokfsm                   # reproduces nbfeatures/zoo/tokfsm
    python -m nbfeatures.recipes.train_model counting --threads 1     # reproduces nbfeatures/zoo/counting
    python -m nbfeatures.recipes.train_model stories --steps 5 --out /tmp/s --quick-eval

Recipes are in `recipes/models.py`; the loop is the shared one (`nbfeatures.train.train`). Runs on CPU (the
shipped models were trained there); seeds fix the init and every batch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import torch

from .._io import atomic_folder
from ..data.counting import Counting, count_accuracy
from ..train import TrainConfig, train
from ..zoo import ZOO_DIR
from .common import loss_curve, parse, parser, weights_info, write_card
from .evaluate import evaluate_stories, evaluate_tokfsm
from .models import RECIPES


def train_model(name: str, cfg: TrainConfig | None = None, *, progress: bool = True, callback: Callable[[dict], None] | None = None):
    """Train the recipe `name`; returns (model, stream, history rows)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    cfg = cfg or recipe.train
    torch.manual_seed(cfg.seed)
    model = recipe.build()
    stream = recipe.stream(cfg)
    callbacks = [lambda step, row: callback(row)] if callback is not None else []
    history = train(model, stream, cfg, recipe.objective(model), callbacks, progress, desc=f"train {name}")
    return model, stream, history.to_dict("records")


def evaluate(name: str, model, stream, quick: bool = False) -> dict:
    if name == "tokfsm":
        return evaluate_tokfsm(model, n=64 if quick else 512)
    if name == "counting":
        return {"count_accuracy": count_accuracy(lambda ids: model(ids, attention_mask=torch.ones_like(ids)).logits,
                                                 n=200 if quick else 2000, seed=10**9)}  # fmt: skip
    return evaluate_stories(model, train_tokens=stream.tokens, n_val=100 if quick else 1000, per_topic=2 if quick else 10)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("name", choices=sorted(RECIPES))
    p.add_argument("--quick-eval", action="store_true", help="small evaluation samples (for smoke tests)")
    args = parse(p, argv)
    cfg = RECIPES[args.name].train
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps, warmup_steps=min(cfg.warmup_steps, args.steps))
    start = time.perf_counter()
    model, stream, history = train_model(args.name, cfg, progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    metrics = evaluate(args.name, model, stream, quick=args.quick_eval)
    out = args.out or ZOO_DIR / args.name
    with atomic_folder(out, keep=("codebooks", "saes", "inversion")) as tmp:
        model.save_pretrained(tmp)
        RECIPES[args.name].tokenizer().save_pretrained(tmp)
        extra = {"task": dataclasses.asdict(Counting())} if args.name == "counting" else {}
        card = write_card(tmp, args, wall_s, name=args.name, **extra, **weights_info(model, tmp / "model.safetensors"),
                          train_config=dataclasses.asdict(cfg), tokens_seen=history[-1]["tokens"],
                          final_train_loss=history[-1]["smooth_loss"], metrics=metrics, loss_curve=loss_curve(history))  # fmt: skip
    print(json.dumps({"out": str(out), "wall_time_s": card["wall_time_s"], "metrics": metrics}, indent=1))  # CLI output


if __name__ == "__main__":
    main()
