"""Harvesting activations and training straight from a model."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import VOCAB
from nbfeatures import sites
from nbfeatures.harvest import ActivationCache, ModelSource, harvest, token_batches
from nbfeatures.sae.topk import TopKConfig, TopKSAE
from nbfeatures.train import TrainConfig, train_sae

SITES = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB - 1, (12, 9), generator=torch.Generator().manual_seed(0))


def test_harvest_in_memory_matches_read_acts(model, tokens):
    cache = harvest(model, tokens, SITES, batch_size=5, progress=False)
    acts = sites.read_acts(model, tokens, SITES)
    for s in SITES:
        expected = acts[s][:, 1:].reshape(-1, 32)  # first position dropped
        torch.testing.assert_close(cache[s], expected, atol=1e-6, rtol=1e-6)
    assert len(cache) == 12 * 8


def test_harvest_to_memory_mapped_shards(model, tokens, tmp_path):
    mem = harvest(model, tokens, SITES, batch_size=4, progress=False)
    disk = harvest(model, tokens, SITES, batch_size=4, folder=tmp_path, shard_tokens=20, progress=False, dtype=torch.float16)
    assert len(list(tmp_path.glob("*.npy"))) > 2 * 2  # several shards per site
    assert isinstance(disk[SITES[0]].arrays[0], np.memmap)
    reopened = ActivationCache.open(tmp_path)
    idx = np.array([0, 5, 33, 95, 40])
    for s in SITES:
        torch.testing.assert_close(reopened[s][idx].float(), mem[s][idx], atol=2e-2, rtol=1e-2)
        assert reopened[s][idx].dtype == torch.float16


def test_harvest_limits_tokens_and_masks_padding(model):
    ragged = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11]]
    cache = harvest(model, ragged, "blocks.0.hook_resid_post", batch_size=3, progress=False)
    assert len(cache) == 3 + 1 + 4  # real tokens only, first position of each dropped
    alone = sites.read_acts(model, torch.tensor([[5, 6]]), "blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"][3], alone[0, 1], atol=1e-5, rtol=1e-5)
    assert len(harvest(model, ragged, "blocks.0.hook_resid_post", n_tokens=5, progress=False)) == 5


def test_token_batches_from_a_dataset():
    ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]})
    batches = list(token_batches(ds, 2))
    assert [b["input_ids"].tolist() for b in batches] == [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9]]]
    with pytest.raises(ValueError, match="'input_ids' column"):
        list(token_batches(Dataset.from_dict({"text": ["a"]}), 2))


def test_train_directly_on_a_model(model, tokens):
    source = ModelSource(model, "blocks.1.hook_resid_post", tokens, batch_size=16, buffer_tokens=40, seq_batch=4)
    first = source.batch(0)
    assert first.shape == (16, 32)
    assert torch.equal(ModelSource(model, "blocks.1.hook_resid_post", tokens, batch_size=16, buffer_tokens=40, seq_batch=4).batch(7), source.batch(7))
    sae = TopKSAE(TopKConfig(32, 64, 4))
    hist = train_sae(sae, source, TrainConfig(steps=12, batch_size=16, log_every=4), progress=False)
    assert len(hist) == 3 and hist["fvu"].notna().all()


def test_bad_harvest_input(model, tokens):
    with pytest.raises(ValueError, match="unknown site"):
        harvest(model, tokens, "blocks.5.hook_resid_post", progress=False)
    with pytest.raises(ValueError, match="integer"):
        harvest(model, tokens.float(), SITES, progress=False)
    with pytest.raises(KeyError, match="was not harvested"):
        harvest(model, tokens, SITES[:1], progress=False)["blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match="indexable"):
        ModelSource(model, SITES[0], iter([[1, 2]]), batch_size=4)
