"""Train a zoo model from its recipe and save it as a self-contained transformers folder with a model card.

    python -m nbfeatures.zoo.train tokfsm                      # reproduces nbfeatures/zoo/tokfsm
    python -m nbfeatures.zoo.train stories --steps 5 --out /tmp/s --quick-eval

The loop is the plain nanoGPT one: sample a batch, next-token cross-entropy, AdamW step with warmup + cosine.
Runs on CPU (the shipped models were trained there); seeds fix the init and every batch.

Dimension key: B batch, T position.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .evaluate import evaluate_stories, evaluate_tokfsm
from .models import RECIPES, TrainConfig
from .provenance import run_info, weights_info

ZOO_DIR = Path(__file__).parent


def train(
    name: str,
    cfg: TrainConfig | None = None,
    *,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
):
    """Train the recipe `name`; returns (model, stream, history). history is one dict per logged step."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    cfg = cfg or recipe.train
    torch.manual_seed(cfg.seed)
    model = recipe.build()
    stream = recipe.stream(cfg)
    # No weight decay on biases and LayerNorm gains (nanoGPT's split): decaying them only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, cfg.beta2))  # fmt: skip
    history, smooth, tokens = [], None, 0
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {name}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        ids_BT = stream.batch(step)
        tokens += ids_BT.numel()
        loss = model(ids_BT, attention_mask=torch.ones_like(ids_BT), labels=ids_BT).loss  # HF shifts labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 25 == 0 or step == cfg.steps - 1:
            record = {"step": step, "loss": loss.item(), "smooth_loss": smooth, "lr": cfg.lr_at(step), "tokens": tokens,
                      "elapsed_s": time.perf_counter() - start}  # fmt: skip
            history.append(record)
            bar.set_postfix(loss=f"{smooth:.4f}")
            if callback is not None:
                callback(record)
    model.eval()
    return model, stream, history


def evaluate(name: str, model, stream, quick: bool = False) -> dict:
    if name == "tokfsm":
        return evaluate_tokfsm(model, n=64 if quick else 512)
    return evaluate_stories(model, train_tokens=stream.tokens, n_val=100 if quick else 1000, per_topic=2 if quick else 10)


def save(name: str, out: Path, model, cfg: TrainConfig, history: list, metrics: dict, wall_s: float, threads: int):
    """Write config.json, model.safetensors, tokenizer files and model_card.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    RECIPES[name].tokenizer().save_pretrained(out)
    weights = out / "model.safetensors"
    card = {
        "name": name,
        **weights_info(model, weights),
        "train_config": dataclasses.asdict(cfg),
        "tokens_seen": history[-1]["tokens"],
        "final_train_loss": history[-1]["smooth_loss"],
        "wall_time_s": round(wall_s, 1),
        **run_info(threads),
        "metrics": metrics,
        "command": f"python -m nbfeatures.zoo.train {name} --steps {cfg.steps} --threads {threads}",
        "loss_curve": [(r["step"], round(r["smooth_loss"], 4)) for r in history[::4]],
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped zoo folder)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick-eval", action="store_true", help="small evaluation samples (for smoke tests)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = RECIPES[args.name].train
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps, warmup_steps=min(cfg.warmup_steps, args.steps))
    start = time.perf_counter()
    model, stream, history = train(args.name, cfg, progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    metrics = evaluate(args.name, model, stream, quick=args.quick_eval)
    out = args.out or ZOO_DIR / args.name
    card = save(args.name, out, model, cfg, history, metrics, wall_s, args.threads)
    print(json.dumps({"out": str(out), "wall_time_s": card["wall_time_s"], "metrics": metrics}, indent=1))  # CLI output


if __name__ == "__main__":
    main()
