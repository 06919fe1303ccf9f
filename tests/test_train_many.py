"""Many dictionaries from one pass: equal to training each alone, exact resume, a curve per dictionary, the metrics file."""

import dataclasses
import json
import os

import pytest
import torch

import nbfeatures as nbf
from nbfeatures.distributed import MetricsFile
from nbfeatures.harvest import TensorSource, TokenSource, harvest
from nbfeatures.sae import ReLUConfig, ReLUObjective, ReLUSAE, TopKConfig, TopKObjective, TopKSAE
from nbfeatures.train import TrainConfig, latest_checkpoint, train_sae
from nbfeatures.train_many import train_many
from nbfeatures.widgets import LiveCurves

SITE_A, SITE_B = "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"
CFG = TrainConfig(steps=12, batch_size=8, lr=1e-3, log_every=2)


@pytest.fixture(scope="module")
def model():
    return nbf.load_model("stories")


@pytest.fixture(scope="module")
def tokens():
    return nbf.data.stories.story_windows(seed=1, n_stories=60, n_ctx=32)  # 178 windows of 32 tokens


def case() -> dict:
    """Three dictionaries at two sites, each with its own objective."""
    a4, a8, b = TopKSAE(TopKConfig(128, 256, 4), seed=1), TopKSAE(TopKConfig(128, 256, 8), seed=2), ReLUSAE(ReLUConfig(128, 256), seed=3)
    return {"a4": (SITE_A, a4, TopKObjective(a4, dead_tokens=500)), "a8": (SITE_A, a8, TopKObjective(a8, dead_tokens=500)),
            "b": (SITE_B, b, ReLUObjective(b, l1_coef=0.1, dead_tokens=500))}  # fmt: skip


class Batches:
    """Precomputed batches, one per step."""

    def __init__(self, batches):
        self.batches = batches

    def batch(self, step):
        return self.batches[step]


def rows_of(history, name):
    """One dictionary's rows, without the columns only the others log."""
    return history[history.dictionary == name].drop(columns=["dictionary", "elapsed_s"]).dropna(axis=1, how="all").reset_index(drop=True)


def test_train_many_equals_training_each_alone_on_the_same_batches(model, tokens):
    many = case()
    history = train_many(model, tokens, many, CFG, progress=False)
    assert list(history.columns[:3]) == ["dictionary", "step", "lr"]
    # the reference: activations harvested from the same token batches, each dictionary trained by train_sae
    token_batches = TokenSource(tokens, CFG.batch_size, CFG.seed)
    cached = [harvest(model, token_batches.batch(s), [SITE_A, SITE_B], batch_size=CFG.batch_size, progress=False) for s in range(CFG.steps)]
    for name, (site, sae, objective) in case().items():
        alone = train_sae(sae, Batches([c[site] for c in cached]), CFG, objective=objective, progress=False)
        for k, v in sae.state_dict().items():
            assert torch.equal(v, many[name][1].state_dict()[k]), (name, k)  # bit for bit
        assert rows_of(history, name).equals(alone.drop(columns="elapsed_s")[rows_of(history, name).columns]), name
    assert history.tokens.iloc[-1] == CFG.steps * CFG.batch_size * 31  # the first position of each window dropped


def test_train_many_checkpoints_each_dictionary_and_resumes_exactly(model, tokens, tmp_path):
    cfg = dataclasses.replace(CFG, checkpoint_every=4, checkpoint_dir=str(tmp_path / "ckpt"), metrics_file=str(tmp_path / "m.jsonl"))
    straight = case()
    history = train_many(model, tokens, straight, dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "straight")), progress=False)

    def stop(step, row):
        if step == 10:
            raise KeyboardInterrupt

    interrupted = case()
    with pytest.raises(KeyboardInterrupt):
        train_many(model, tokens, interrupted, cfg, callbacks=[stop], progress=False)
    assert not any(sae.training for _, sae, _ in interrupted.values())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["a4", "a8", "b"]
    assert {latest_checkpoint(tmp_path / "ckpt" / n).name for n in interrupted} == {"step_00000008"}
    # a crash between two dictionaries' saves leaves one a checkpoint behind: it resumes from its own
    import shutil

    shutil.rmtree(tmp_path / "ckpt" / "b" / "step_00000008")
    resumed = case()
    resumed_history = train_many(model, tokens, resumed, cfg, progress=False)
    for name in straight:
        for k, v in straight[name][1].state_dict().items():
            assert torch.equal(v, resumed[name][1].state_dict()[k]), (name, k)
    assert resumed_history.drop(columns="elapsed_s").equals(history.drop(columns="elapsed_s"))
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert sorted((r["dictionary"], r["step"]) for r in lines) == sorted(zip(history.dictionary, history.step))  # no duplicates


def test_live_curves_draw_a_line_per_dictionary(model, tokens):
    curves = LiveCurves(every_s=0.0, max_overhead=0)
    history = train_many(model, tokens, case(), dataclasses.replace(CFG, steps=6), callbacks=[curves], progress=False)
    lines = {t.name for t in curves.fig.data if t.visible is not False}
    assert {"fvu/a4", "fvu/a8", "fvu/b", "l0/a4", "aux_loss/a4", "mse/b"} <= lines, lines
    assert not any(name.startswith(("lr/", "tokens/", "elapsed_s/", "dictionary")) for name in lines)
    fvu_a8 = [v for v in curves.history["fvu/a8"] if v == v]
    assert fvu_a8 == history[history.dictionary == "a8"].fvu.tolist()
    assert not curves.notes  # the dictionary's name is not taken for a bad value
    assert all(f"fvu/{name} " in curves.status.value for name in ("a4", "a8", "b")), curves.status.value


def test_live_curves_follow_a_metrics_file_as_it_grows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"dictionary": d, "step": s, "fvu": 1.0 / s} for s in range(1, 7) for d in ("x", "y")]
    MetricsFile.start(path, rows[:2])
    curves = LiveCurves(every_s=0.0).follow(path)
    assert curves.n_calls == 2
    line = json.dumps(rows[2]).encode() + b"\n"
    with open(path, "ab") as f:  # half a line: not read until it is whole
        f.write(line[:10])
    assert curves.poll() == 0
    with open(path, "ab") as f:
        f.write(line[10:])
    assert curves.poll() == 1 and curves.history["fvu/x"][-1] == 0.5
    MetricsFile.start(path, rows[:1])  # a resumed run rewrites the file: the curves start over
    assert curves.poll() == 1 and curves.n_calls == 1
    appended = iter(rows[1:])

    def until():  # a training process that logs a row between polls and ends when it has logged them all
        row = next(appended, None)
        if row is not None:
            MetricsFile(path).append([row])
        return row is None

    curves.follow(path, until=until, poll_s=0.001)
    assert [s for s, v in zip(curves.history["step"], curves.history["fvu/y"]) if v == v] == list(range(1, 7))
    with open(path, "ab") as f:
        f.write(b"not json\n")
    with pytest.warns(RuntimeWarning, match="not a JSON object"):
        assert curves.poll() == 0
    with pytest.raises(ValueError, match="poll_s must be a finite number of seconds > 0"):
        curves.follow(path, poll_s=0)
    with pytest.raises(ValueError, match="no metrics file is followed"):
        LiveCurves().poll()
    assert LiveCurves().follow(tmp_path / "not_yet.jsonl").n_calls == 0  # a run that has not started writing


def test_bad_input_is_named(model, tokens):
    sae = TopKSAE(TopKConfig(128, 256, 4))
    narrow = TopKSAE(TopKConfig(64, 256, 4))
    cfg = dataclasses.replace(CFG, steps=2)
    for dictionaries, message in [
        ({"a/b": (SITE_A, sae)}, "must be a folder name"),
        ({"a": (SITE_A, sae, None, 1)}, r"must map to \(site, dictionary\)"),
        ({"a": (SITE_A, sae), "b": (SITE_B, sae)}, "'b' and 'a' are the same dictionary"),
        ({"a": ("blocks.9.hook_resid_post", sae)}, "blocks.9"),
        ({"a": (SITE_A, narrow)}, "has width 128 .* d_in=64"),
        ({}, "non-empty dict"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_many(model, tokens, dictionaries, cfg, progress=False)
    with pytest.raises(ValueError, match="shard"):
        train_many(model, tokens, {"a": (SITE_A, sae)}, cfg, progress=False, shard="layers")
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        TensorSource(torch.zeros(64, 4), 16, world=3, rank=0)
    with pytest.raises(ValueError, match="rank must be"):
        TensorSource(torch.zeros(64, 4), 16, world=2, rank=2)
    with pytest.raises(ValueError, match="distributed must be"):
        TrainConfig(steps=1, distributed="yes")
    with pytest.raises(ValueError, match="metrics_file must be a file path"):
        TrainConfig(steps=1, metrics_file="")


def test_a_tensor_source_split_over_ranks_makes_up_the_whole_batch(tmp_path, model, tokens):
    table = harvest(model, tokens[:40], SITE_A, folder=tmp_path / "acts", shard_tokens=300, progress=False)[SITE_A]
    for acts in (torch.as_tensor(table[:]), table):  # in memory, and memory-mapped shards (read in file order)
        whole = TensorSource(acts, 64, seed=3).batch(5)
        parts = [TensorSource(acts, 64, seed=3, rank=r, world=2).batch(5) for r in (0, 1)]
        assert torch.equal(torch.stack(parts, 1).reshape(64, -1), whole)  # rank r holds rows r::2
    assert os.path.isdir(tmp_path / "acts")
