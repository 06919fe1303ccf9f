"""Training on two processes (torchrun, gloo on CPU) against one process with the whole batch.

Two launches, since each costs seconds of process start: this file as a torchrun worker running the library's
scenarios (`python -m torch.distributed.run ... tests/test_distributed.py OUT`), and the recipe CLI as documented.
The references are trained here, in the test process, on one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import nbfeatures as nbf
from nbfeatures._io import load_tensors, save_tensors
from nbfeatures.data.stories import story_windows
from nbfeatures.harvest import ActivationCache, harvest
from nbfeatures.sae import ReLUConfig, ReLUObjective, ReLUSAE, TopKConfig, TopKObjective, TopKSAE, load_sae
from nbfeatures.train import TrainConfig, latest_checkpoint, train_sae
from nbfeatures.train_many import train_many

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE_A, SITE_B = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
N = 10  # steps of the two-process runs; the one-process references run 2N
RELU_CFG = TrainConfig(steps=N, batch_size=256, lr=1e-3, warmup_steps=3, log_every=5)
TOPK_CFG = TrainConfig(steps=N, batch_size=256, lr=2e-3, log_every=5)
TOPK_DEAD = 768  # three steps of 256 tokens: latents die during the run, and AuxK works on them
MANY_CFG = TrainConfig(steps=6, batch_size=8, lr=1e-3, log_every=3)  # 8 sequences: 4 per process


def tokens() -> torch.Tensor:
    return story_windows(seed=1, n_stories=60, n_ctx=32)  # 178 windows


def relu_case(d_in: int):
    sae = ReLUSAE(ReLUConfig(d_in, 128), seed=0)
    return sae, ReLUObjective(sae, l1_coef=0.3, dead_tokens=1000)


def topk_case(d_in: int):
    sae = TopKSAE(TopKConfig(d_in, 256, 4), seed=0)
    return sae, TopKObjective(sae, dead_tokens=TOPK_DEAD)


def many_case(kind: str) -> dict:
    """Dictionaries at two sites: ReLU ones (a mean loss: exact under data parallelism) or TopK ones."""
    if kind == "relu":
        a, b = ReLUSAE(ReLUConfig(128, 128), seed=1), ReLUSAE(ReLUConfig(128, 128), seed=2)
        return {"a": (SITE_A, a, ReLUObjective(a, l1_coef=0.3)), "b": (SITE_B, b, ReLUObjective(b, l1_coef=0.3))}
    saes = {"a4": (SITE_A, TopKSAE(TopKConfig(128, 256, 4), seed=1)), "a8": (SITE_A, TopKSAE(TopKConfig(128, 256, 8), seed=2)),
            "b4": (SITE_B, TopKSAE(TopKConfig(128, 256, 4), seed=3))}  # fmt: skip
    return {name: (site, sae, TopKObjective(sae, dead_tokens=500)) for name, (site, sae) in saes.items()}


def weights(case: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, (_, sae, _) in case.items() for k, v in sae.state_dict().items()}


def worker(out: pathlib.Path) -> None:
    """Run under torchrun: every scenario on this rank; what the tests compare goes to `out`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = nbf.load_model("stories")
    acts = ActivationCache.open(out / "acts")[SITE_B]
    # a ReLU SAE on a harvested folder, each rank reading its rows of every batch; rank 0 checkpoints and logs
    sae, objective = relu_case(acts.shape[1])
    cfg = dataclasses.replace(RELU_CFG, distributed=True, checkpoint_dir=str(out / "relu"), metrics_file=str(out / "relu.jsonl"))
    train_sae(sae, acts, cfg, objective=objective, progress=False)
    # a TopK SAE with AuxK: every rank must keep the same dead latents
    sae, objective = topk_case(acts.shape[1])
    train_sae(sae, acts, dataclasses.replace(TOPK_CFG, distributed=True), objective=objective, progress=False)
    save_tensors(out / f"topk_{rank}.safetensors", {**sae.state_dict(), **objective.state_dict()})
    # train_many, data-parallel, and with the dictionaries split over the ranks (checkpoints by their owners)
    case = many_case("relu")
    train_many(model, tokens(), case, dataclasses.replace(MANY_CFG, distributed=True), progress=False)
    save_tensors(out / f"many_data_{rank}.safetensors", weights(case))
    case = many_case("topk")
    cfg = dataclasses.replace(MANY_CFG, distributed=True, checkpoint_dir=str(out / "split"), metrics_file=str(out / "split.jsonl"))
    history = train_many(model, tokens(), case, cfg, progress=False, shard="dictionaries")
    save_tensors(out / f"many_split_{rank}.safetensors", weights(case))
    history.drop(columns="elapsed_s").to_json(out / f"split_history_{rank}.json", orient="records")
    dist.destroy_process_group()


def torchrun(*args: str, timeout: int = 180) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def model():
    return nbf.load_model("stories")


@pytest.fixture(scope="module")
def launched(model, tmp_path_factory):
    """The worker's results: one torchrun launch of two processes over every scenario."""
    out = tmp_path_factory.mktemp("distributed")
    harvest(model, tokens(), SITE_B, folder=out / "acts", batch_size=32, shard_tokens=1000, progress=False)  # 6 shards
    torchrun(str(ROOT / "tests" / "test_distributed.py"), str(out))
    return out


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol), (k, (a[k].double() - b[k].double()).abs().max().item())


def test_two_processes_with_half_batches_equal_one_with_the_whole_batch_and_resume_on_one(launched, tmp_path):
    acts = ActivationCache.open(launched / "acts")[SITE_B]
    # one process, 2N steps, checkpoint at N: the reference for both the two-process run and its resume
    sae, objective = relu_case(acts.shape[1])
    straight = dataclasses.replace(RELU_CFG, steps=2 * N, checkpoint_every=N, checkpoint_dir=str(tmp_path / "one"))
    history = train_sae(sae, acts, straight, objective=objective, progress=False)
    two = latest_checkpoint(launched / "relu")
    assert two.name == f"step_{N:08d}"
    for name in ("dictionary", "objective", "optimizer"):  # weights, dead-latent counts (all-reduced), Adam's moments
        close(load_tensors(two / f"{name}.safetensors"), load_tensors(tmp_path / "one" / two.name / f"{name}.safetensors"), 1e-5)
    rows = [json.loads(line) for line in (launched / "relu.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10] and rows[-1]["tokens"] == N * 256  # rank 0 logged the global batch
    # resume the two-process checkpoint on one process up to 2N: the uninterrupted run's weights
    shutil.copytree(launched / "relu", tmp_path / "resumed")
    resumed, objective = relu_case(acts.shape[1])
    cfg = dataclasses.replace(RELU_CFG, steps=2 * N, checkpoint_dir=str(tmp_path / "resumed"), metrics_file=str(tmp_path / "m.jsonl"))
    resumed_history = train_sae(resumed, acts, cfg, objective=objective, progress=False)
    close(resumed.state_dict(), sae.state_dict(), 1e-5)
    assert resumed_history.step.tolist() == history.step.tolist() == [5, 10, 15, 20]
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [5, 10, 15, 20]


def test_dead_latent_counts_are_global_so_every_rank_keeps_the_same_dead_set(launched):
    ranks = [load_tensors(launched / f"topk_{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # weights and counts, bit for bit
    since = ranks[0]["tokens_since_fired"]
    # every rank counted the global batch of 256 each step, not its own 128: the counts of one process
    assert bool((since % 256 == 0).all()) and int(since.max()) == N * 256, since
    assert bool((since >= TOPK_DEAD).any()), "no latent died: the scenario does not exercise AuxK's dead set"


def test_train_many_data_parallel_equals_one_process(launched, model):
    case = many_case("relu")
    train_many(model, tokens(), case, MANY_CFG, progress=False)
    ranks = [load_tensors(launched / f"many_data_{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    close(ranks[0], weights(case), 1e-5)


def test_train_many_with_the_dictionaries_split_over_ranks(launched, model):
    case = many_case("topk")
    history = train_many(model, tokens(), case, MANY_CFG, progress=False)
    for r in (0, 1):  # each dictionary trained whole by its owner, then copied to every rank
        close(load_tensors(launched / f"many_split_{r}.safetensors"), weights(case), 1e-6)
        rows = json.loads((launched / f"split_history_{r}.json").read_text())
        assert [(row["dictionary"], row["step"]) for row in rows] == list(zip(history.dictionary, history.step))
    for name in case:  # checkpoints by each owner, in its own folder
        assert latest_checkpoint(launched / "split" / name).name == f"step_{MANY_CFG.steps:08d}"
    lines = [json.loads(line) for line in (launched / "split.jsonl").read_text().splitlines()]
    assert sorted((row["dictionary"], row["step"]) for row in lines) == sorted(zip(history.dictionary, history.step))


def test_the_recipe_command(tmp_path):
    out = tmp_path / "run"
    torchrun("-m", "nbfeatures.recipes.train_distributed", "--shard", "dictionaries", "--sites", SITE_A, "--k", "4", "8",
             "--d-sae", "256", "--steps", "10", "--batch-size", "8", "--stories", "60", "--context", "32",
             "--checkpoint-every", "5", "--out", str(out), "--no-progress")  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = [f"{SITE_A}_k4", f"{SITE_A}_k8"]
    assert sorted((r["dictionary"], r["step"]) for r in rows) == [(n, s) for n in names for s in (5, 10)]
    for name, k in zip(names, (4, 8)):
        assert load_sae(out / name).cfg.k == k
        assert json.loads((out / name / "card.json").read_text())["processes"] == 2
        assert latest_checkpoint(out / "checkpoints" / name).name == "step_00000010"


if __name__ == "__main__":
    worker(pathlib.Path(sys.argv[1]))
