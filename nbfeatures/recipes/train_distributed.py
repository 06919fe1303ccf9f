"""Train TopK SAEs on several processes: torchrun launches this script, and train_many reads each token batch once for
all the dictionaries (or train_sae reads a harvested folder), data-parallel or with the dictionaries split over ranks.

    torchrun --standalone --nproc-per-node 2 -m nbfeatures.recipes.train_distributed --steps 50 --out runs/demo
    torchrun --standalone --nproc-per-node 2 -m nbfeatures.recipes.train_distributed --shard dictionaries \\
        --sites blocks.1.hook_resid_post blocks.2.hook_resid_post --k 8 16 --steps 500 --out runs/many
    torchrun --standalone --nproc-per-node 2 -m nbfeatures.recipes.train_distributed --acts harvested/ \\
        --sites blocks.2.hook_resid_post --batch-size 4096 --out runs/one       # each rank reads its rows of the folder

(`python -m torch.distributed.run` is the same launcher; a fixed --master-port instead of --standalone works too, and
plain `python -m nbfeatures.recipes.train_distributed ...` runs the same training in one process.)

One TopK SAE per site and k, named <site>_k<k>, on windows of --context tokens from the stories corpus (or --acts).
Under --out: metrics.jsonl, one JSON line per dictionary and logged step, appended by rank 0 as training goes (a
notebook follows it with `LiveCurves.follow`); checkpoints/<name>/step_*; and at the end <name>/ as a SAELens folder
with a card.json. Rerunning the command resumes from the checkpoints, on any number of processes. Each process uses
--threads CPU threads (gloo), or the GPU cuda:LOCAL_RANK (nccl) when there is one and --cpu is not given.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import zoo
from .._io import atomic_folder
from ..data.stories import story_windows
from ..harvest import ActivationCache
from ..sae import TopKConfig, TopKObjective, TopKSAE, save_sae
from ..sites import read_acts, unwrap
from ..train import TrainConfig, train_sae
from ..train_many import train_many
from .common import parse, parser, write_card


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default="stories", help="zoo name or model folder (default: stories)")
    p.add_argument("--sites", nargs="+", default=["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"])
    p.add_argument("--k", nargs="+", type=int, default=[16], help="active latents; one SAE per site and k")
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (with --acts: activations per step)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dead-tokens", type=int, default=50_000)
    p.add_argument("--stories", type=int, default=400, help="stories in the training windows")
    p.add_argument("--context", type=int, default=64, help="tokens per window")
    p.add_argument("--acts", type=Path, default=None, help="train one SAE on this harvested folder at --sites' one site")
    p.add_argument("--shard", choices=("data", "dictionaries"), default="data")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even where there are GPUs")
    args = parse(p, argv)
    if args.out is None:
        p.error("--out is required: the folder for metrics.jsonl, checkpoints/ and the trained SAEs")
    if args.acts is not None and len(args.sites) != 1:
        p.error(f"--acts trains one SAE: give one site, got {args.sites}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    cfg = TrainConfig(steps=args.steps or 50, batch_size=args.batch_size, lr=args.lr, log_every=args.log_every,
                      checkpoint_every=args.checkpoint_every, checkpoint_dir=str(args.out / "checkpoints"),
                      metrics_file=str(args.out / "metrics.jsonl"), seed=args.seed, distributed=True)  # fmt: skip
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.acts is not None:
        site = args.sites[0]
        acts = ActivationCache.open(args.acts)[site]
        sample = torch.as_tensor(acts[: min(4096, len(acts))]).float()
        saes = {f"{site}_k{k}": (site, TopKSAE(TopKConfig(acts.shape[1], args.d_sae, k), seed=args.seed).to(device)) for k in args.k}
        (name, (_, sae)), *rest = saes.items()
        if rest:
            p.error("--acts trains one SAE: give one k")
        sae.init_b_dec_(sample.to(device))
        one = dataclasses.replace(cfg, checkpoint_dir=str(args.out / "checkpoints" / name))
        history = train_sae(sae, acts, one, TopKObjective(sae, dead_tokens=args.dead_tokens), progress=not args.no_progress)
        history.insert(0, "dictionary", name)
        data = f"{args.acts}: {len(acts)} activations"
    else:
        model = zoo.load_model(args.model)
        unwrap(model).to(device)
        windows = story_windows(seed=args.seed + 1, n_stories=args.stories, n_ctx=args.context)  # not the model's own stories
        sample = read_acts(model, windows[:16], args.sites)  # the same sample on every rank: the same b_dec init
        saes = {}
        for site in args.sites:
            x = sample[site][:, 1:].flatten(0, 1)
            for k in args.k:
                sae = TopKSAE(TopKConfig(x.shape[1], args.d_sae, k), seed=args.seed).to(device)
                sae.init_b_dec_(x)
                saes[f"{site}_k{k}"] = (site, sae, TopKObjective(sae, dead_tokens=args.dead_tokens))
        history = train_many(model, windows, saes, cfg, progress=not args.no_progress, shard=args.shard)
        data = f"story_windows(seed={args.seed + 1}, n_stories={args.stories}, n_ctx={args.context}): {tuple(windows.shape)}"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        for name, (site, sae, *_) in saes.items():
            rows = history[history["dictionary"] == name].dropna(axis=1, how="all")
            last = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rows.iloc[-1].to_dict().items()}
            with atomic_folder(args.out / name) as tmp:
                save_sae(sae.cpu(), tmp, hook_name=site, model_name=args.model)
                write_card(tmp, args, time.perf_counter() - start, run=name, site=site, model=args.model, processes=world,
                           shard=args.shard, train=dataclasses.asdict(cfg), data=data, last_logged=last)  # fmt: skip
    if dist.is_initialized():
        dist.barrier()  # the folders are written before any process exits
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
