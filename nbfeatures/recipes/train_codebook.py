"""Finetune a zoo model with codebooks inserted and ship it as a zoo codebook model with a model card.

    python -m nbfeatures.recipes.train_codebook tokfsm-codebook --threads 1   # reproduces zoo/tokfsm/codebooks/tokfsm-codebook
    python -m nbfeatures.recipes.train_codebook stories-codebook --steps 5 --out /tmp/s --quick-eval

Recipe: load the base zoo model, insert codebooks at the recipe's sites (`blocks.{i}.attn.hook_z`: one
codebook per head; `blocks.{i}.hook_mlp_out`: one per layer), initialise every codebook with k-means on the
base model's activations, then finetune codebooks (lr) and model (lr * model_lr_factor) together with
    L = CE(next token) + mse_coef * sum over sites of MSE(codes, stopgrad(normalised input))
through the shared loop (`nbfeatures.train.train`). The folder holds the finetuned transformer in
save_pretrained form, codebooks.safetensors, codebooks.json (sites, configs, `base_model`) and card.json.

Dimension key: B batch, T position.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import torch

from .. import sites, zoo
from .._io import atomic_folder
from ..codebook import (CodebookConfig, CodebookLayer, CodebookModel, CodebookObjective, CodebookTrainConfig,
                        load_codebook_model)
from ..data.stories import StoryCorpus
from ..data.tokfsm import TokFSM, first_transition_accuracy
from ..train import TrainConfig, train as train_loop
from .common import loss_curve, parse, parser, write_card
from .evaluate import VAL_SEED, evaluate_tokfsm, mean_loss, topic_stay_rate
from .models import RECIPES, StoriesStream, TokFSMStream


@dataclass(frozen=True)
class CodebookRecipe:
    base: str  # the zoo model finetuned
    attn: bool  # one codebook per head on every layer's attn.hook_z
    mlp: bool  # one codebook on every layer's hook_mlp_out
    n_codes: int
    k: int
    steps: int
    batch_size: int  # sequences per step
    lr: float = 1e-3  # codebooks; the model gets lr * model_lr_factor
    model_lr_factor: float = 0.5
    mse_coef: float = 1.0
    warmup_steps: int = 20
    decay_fraction: float = 0.3
    kmeans_sequences: int = 64  # base-model sequences whose activations seed the k-means
    seed: int = 1  # data order (the base models were trained on stream seed 0)

    def __post_init__(self):
        if not (self.attn or self.mlp):
            raise ValueError("a codebook recipe needs attn=True or mlp=True")
        if self.base not in RECIPES:
            raise ValueError(f"unknown base model {self.base!r}; available: {sorted(RECIPES)}")

    def sites(self, n_layers: int) -> list[str]:
        return [s for i in range(n_layers) for s, on in ((f"blocks.{i}.attn.hook_z", self.attn), (f"blocks.{i}.hook_mlp_out", self.mlp)) if on]


CODEBOOK_RECIPES = {
    # Table 1's rows at small scale, all with the same budget: attention-only k = 1, attention + MLP k = 1 and k = 4
    "tokfsm-codebook": CodebookRecipe("tokfsm", attn=True, mlp=True, n_codes=1000, k=1, steps=600, batch_size=32),
    "tokfsm-codebook-attn": CodebookRecipe("tokfsm", attn=True, mlp=False, n_codes=1000, k=1, steps=600, batch_size=32),
    "tokfsm-codebook-k4": CodebookRecipe("tokfsm", attn=True, mlp=True, n_codes=1000, k=4, steps=600, batch_size=32),
    "stories-codebook": CodebookRecipe("stories", attn=True, mlp=False, n_codes=1000, k=8, steps=600, batch_size=16),
}


def build(recipe: CodebookRecipe, progress: bool = True) -> CodebookModel:
    """The base zoo model with k-means-initialised codebooks at the recipe's sites."""
    model = zoo.load_model(recipe.base)
    hf = sites.unwrap(model)
    n_layers, d = hf.config.num_hidden_layers, hf.config.hidden_size
    n_heads = sites.resolve(model, "blocks.0.attn.hook_z").heads
    site_list = recipe.sites(n_layers)
    ids = _stream(recipe, steps=1, batch_size=recipe.kmeans_sequences).batch(0)
    acts = sites.read_acts(model, ids, site_list)
    layers = {}
    for j, s in enumerate(site_list):
        per_head = s.endswith("attn.hook_z")
        cfg = CodebookConfig(d // n_heads if per_head else d, recipe.n_codes, k=recipe.k, n_groups=n_heads if per_head else 1)
        layer = CodebookLayer(cfg, seed=j)
        layer.init_kmeans_(acts[s][:, 1:], iters=10, seed=j)  # position 0 (BOS) is the same in every row
        layers[s] = layer
    return CodebookModel(model, layers)


def _stream(recipe: CodebookRecipe, steps: int, batch_size: int):
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=recipe.lr, seed=recipe.seed)
    return TokFSMStream(cfg) if recipe.base == "tokfsm" else StoriesStream(cfg)


def logits_fn(cb: CodebookModel):
    """ids [B, T] -> logits [B, T, V] of the codebook model (codebooks as currently enabled)."""
    def run(ids_BT):
        with torch.no_grad():
            return cb.run(ids_BT).logits.float().cpu()
    return run


def evaluate(recipe: CodebookRecipe, cb: CodebookModel, quick: bool = False) -> dict:
    """The base recipe's bars with the codebooks in, and (as `no_codebooks_*`) the finetuned model with them switched off."""
    cb.codebooks.eval()
    metrics = {}
    for prefix, enabled in (("", True), ("no_codebooks_", False)):
        cb.enabled = enabled
        run = logits_fn(cb)
        if recipe.base == "tokfsm" and enabled:
            m = evaluate_tokfsm(run, n=16 if quick else 128)
        elif recipe.base == "tokfsm":  # sampled transitions are the slow part (no KV cache): skipped here
            ids = TokFSM().sample(16 if quick else 128, seed=10_000)
            m = {"first_transition_accuracy": first_transition_accuracy(run), "val_loss": mean_loss(run, ids.tolist())}
        else:
            corpus = StoryCorpus(seed=VAL_SEED)
            m = {"val_loss": mean_loss(run, corpus.encode(corpus.generate(50 if quick else 200))),
                 "topic_stay_rate": topic_stay_rate(run, corpus, per_topic=1 if quick else 4)}
        metrics.update({prefix + k: v for k, v in m.items()})
    cb.enabled = True
    return metrics


def recipe_for(name: str, steps: int | None = None, n_codes: int | None = None) -> CodebookRecipe:
    """The recipe `name`, with the step count and codebook size overridden where given."""
    if name not in CODEBOOK_RECIPES:
        raise ValueError(f"unknown codebook recipe {name!r}; available: {sorted(CODEBOOK_RECIPES)}")
    recipe = CODEBOOK_RECIPES[name]
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps, warmup_steps=min(recipe.warmup_steps, steps))
    if n_codes is not None:
        recipe = dataclasses.replace(recipe, n_codes=n_codes)
    return recipe


def train(recipe: CodebookRecipe, progress: bool = True) -> tuple[CodebookModel, list[dict], float]:
    """Build and finetune `recipe`; returns (model, history rows, wall seconds of the k-means and finetuning)."""
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    cb = build(recipe, progress)
    cfg = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                      decay_fraction=recipe.decay_fraction, grad_clip=1.0, log_every=10, seed=recipe.seed)
    objective = CodebookObjective(cb, CodebookTrainConfig(mse_coef=recipe.mse_coef, model_lr_factor=recipe.model_lr_factor))
    history = train_loop(cb, _stream(recipe, recipe.steps, recipe.batch_size), cfg, objective, progress=progress)
    cb.codebooks.eval()
    sites.unwrap(cb.model).eval()
    return cb, history.to_dict("records"), time.perf_counter() - start


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("name", choices=sorted(CODEBOOK_RECIPES))
    p.add_argument("--n-codes", type=int, default=None, help="override the recipe's codes per codebook")
    p.add_argument("--quick-eval", action="store_true", help="small evaluation samples (for smoke tests)")
    args = parse(p, argv)
    recipe = recipe_for(args.name, args.steps, args.n_codes)
    cb, history, wall_s = train(recipe, progress=not args.no_progress)
    out = args.out or zoo.ZOO_DIR / recipe.base / "codebooks" / args.name
    with atomic_folder(out) as tmp:
        cb.save(tmp, base_model=recipe.base)
        metrics = evaluate(recipe, load_codebook_model(tmp), quick=args.quick_eval)  # what ships is what is measured
        last = history[-1]
        card = write_card(
            tmp, args, wall_s, name=args.name, base_model=recipe.base, base_model_metrics=zoo.card(recipe.base)["metrics"],
            recipe=dataclasses.asdict(recipe), sites=cb.sites, n_codebook_params=sum(p.numel() for p in cb.codebooks.parameters()),
            tokens_seen=int(last["tokens"]),
            final_train={k: round(float(v), 5) for k, v in last.items() if k in ("ce", "codebook_mse", "loss")},
            codes_used_last_batch={k.removeprefix("codes_used/"): round(float(v), 4) for k, v in last.items() if k.startswith("codes_used/")},
            metrics=metrics, loss_curve=loss_curve(history, "ce", every=3))  # fmt: skip
    print(json.dumps({"out": str(out), "wall_time_s": card["wall_time_s"], "metrics": card["metrics"]}, indent=1))  # CLI output


if __name__ == "__main__":
    main()
