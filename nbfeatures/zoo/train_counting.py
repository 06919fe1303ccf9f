"""Train the zoo's character-counting model (InversionView's counting task) and ship it as a transformers folder.

    python -m nbfeatures.zoo.train_counting                       # reproduces nbfeatures/zoo/counting
    python -m nbfeatures.zoo.train_counting --steps 5 --out /tmp/c

GPT-2, 2 layers, 1 head, d_model 64 (the reference's shape). The loss is the cross-entropy of the count
digit at ':', plus (weight AUX) at every letter the running count of that letter so far. The reference
trains on the count alone; with that loss alone this model sat on the uniform-guess plateau (loss 1.98,
accuracy 0.19) for a whole 2000-step CPU run, and the dense auxiliary target teaches the layer-0
"attend to the same letter" head it needs within the budget. Fresh inputs every step, seeded by
(seed, step); AdamW with warmup + cosine from `zoo.models.TrainConfig`.

Dimension key: B batch, T position, V vocab.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.counting import Counting, count_accuracy
from .models import TrainConfig
from .provenance import run_info, weights_info

ZOO_DIR = Path(__file__).parent
TRAIN = TrainConfig(steps=10000, batch_size=64, lr=3e-3, warmup_steps=100)
AUX = 0.5  # weight of the running-count loss at the letters


def counting_model(task: Counting | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    task = task or Counting()
    config = GPT2Config(vocab_size=task.vocab_size, n_positions=task.seq_len, n_embd=64, n_layer=2, n_head=1, n_inner=256,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def running_counts(ids_BT: torch.Tensor, task: Counting) -> torch.Tensor:
    """Labels [B, T]: at each letter, the digit of how often that letter has occurred up to here; -100 elsewhere."""
    letters = (ids_BT >= 1) & (ids_BT <= task.n_letters)
    bar_seen = (ids_BT == task.bar_id).long().cumsum(1) > 0
    letters &= ~bar_seen  # the target letter after '|' is not counted
    onehot = F.one_hot(ids_BT, task.vocab_size) * letters[..., None]
    counts = onehot.cumsum(1).gather(-1, ids_BT[..., None])[..., 0]
    return torch.where(letters, task.digit_id(counts.clamp(max=9)), torch.full_like(ids_BT, -100))


def train(cfg: TrainConfig = TRAIN, task: Counting | None = None, *, progress: bool = True,
          callback: Callable[[dict], None] | None = None):  # fmt: skip
    """Returns (model, history); history is one dict per logged step."""
    task = task or Counting()
    torch.manual_seed(cfg.seed)
    model = counting_model(task)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    history, smooth, start = [], None, time.perf_counter()
    rows = torch.arange(cfg.batch_size)
    model.train()
    bar = tqdm(range(cfg.steps), desc="train counting", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        ids_BT, colon_B, count_B = task.sample(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        logits_BTV = model(ids_BT, attention_mask=torch.ones_like(ids_BT)).logits
        main = F.cross_entropy(logits_BTV[rows, colon_B], task.digit_id(count_B))
        aux = F.cross_entropy(logits_BTV.flatten(0, 1), running_counts(ids_BT, task).flatten(), ignore_index=-100)
        loss = main + AUX * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{smooth:.3f}")
            record = {"step": step, "loss": loss.item(), "count_loss": main.item(), "smooth_loss": smooth, "elapsed_s": time.perf_counter() - start}
            history.append(record)
            if callback is not None:
                callback(record)
    model.eval()
    return model, history


def save(out: Path, model, cfg: TrainConfig, history: list, metrics: dict, wall_s: float, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    Counting().tokenizer().save_pretrained(out)
    weights = out / "model.safetensors"
    card = {
        "name": "counting",
        "task": dataclasses.asdict(Counting()),
        **weights_info(model, weights),
        "train_config": dataclasses.asdict(cfg),
        "sequences_seen": cfg.steps * cfg.batch_size,
        "final_train_loss": history[-1]["smooth_loss"],
        "wall_time_s": round(wall_s, 1),
        **run_info(threads),
        "metrics": metrics,
        "command": f"nice -n 10 python -m nbfeatures.zoo.train_counting --steps {cfg.steps} --threads {threads}",
        "loss_curve": [(r["step"], round(r["smooth_loss"], 4)) for r in history[::4]],
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--out", type=Path, default=ZOO_DIR / "counting", help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TRAIN if args.steps is None else dataclasses.replace(TRAIN, steps=args.steps, warmup_steps=min(TRAIN.warmup_steps, args.steps))
    start = time.perf_counter()
    model, history = train(cfg, progress=not args.no_progress)
    wall_s = time.perf_counter() - start
    metrics = {"count_accuracy": count_accuracy(lambda ids: model(ids, attention_mask=torch.ones_like(ids)).logits, n=2000, seed=10**9)}
    card = save(args.out, model, cfg, history, metrics, wall_s, args.threads)
    print(json.dumps({"out": str(args.out), "wall_time_s": card["wall_time_s"], "metrics": metrics}))  # CLI output


if __name__ == "__main__":
    main()
