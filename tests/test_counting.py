"""Counting task: sampled inputs are well formed, the tokenizer round-trips, the shipped model counts."""

import hashlib
import json

import pytest
import torch

from nbfeatures import zoo
from nbfeatures.data.counting import Counting, count_accuracy
from nbfeatures.recipes.models import running_counts
from nbfeatures.recipes.train_model import main as _train_main


def test_samples_are_well_formed_and_reproducible():
    task = Counting()
    ids, colon, count = task.sample(64, seed=3)
    assert ids.shape == (64, task.seq_len) and torch.equal(ids, task.sample(64, seed=3)[0])
    for row, c, n in zip(ids, colon, count):
        parts = task.parse(row)
        assert parts["count"] == parts["true_count"] == int(n) and parts["colon"] == int(c) and row[c] == task.colon_id
        assert len(set(parts["letters"])) == task.n_distinct and parts["target"] in parts["letters"]
        assert 1 <= n <= task.max_count and row[c + 1] == task.digit_id(int(n)) and row[c + 2] == task.special_id
    assert set(count.tolist()) == set(range(1, 10))


def test_tokenizer_round_trip_and_parse_rejects_junk():
    task = Counting()
    tok = task.tokenizer()
    ids = tok("abba|b:2")["input_ids"]
    assert ids[0] == task.special_id and task.text(ids) == "<s>abba|b:2" and len(tok) == task.vocab_size
    assert task.parse(ids) == {"letters": "abba", "target": "b", "count": 2, "true_count": 2, "colon": 7}
    assert task.parse(tok("abba|b:7")["input_ids"])["true_count"] == 2  # a wrong written count is still parsed
    for junk in ("abba", "ab|b", "|a:1", "ab||a:1", "ab|:1"):
        assert task.parse(tok(junk)["input_ids"]) is None, junk
    with pytest.raises(ValueError, match="max_count must be in"):
        Counting(max_count=12)
    with pytest.raises(ValueError, match="n_distinct must be in"):
        Counting(n_letters=2, n_distinct=3)


def test_running_counts_label_each_letter_with_its_count_so_far():
    task = Counting()
    ids = torch.tensor([task.tokenizer()("abab|a:2")["input_ids"]])
    labels = running_counts(ids, task)[0]
    assert (labels[1:5] - task.digit_id(0)).tolist() == [1, 1, 2, 2] and (labels[[0, 5, 6, 7, 8]] == -100).all()


def test_shipped_counting_model_counts():
    assert "counting" in zoo.available()
    model, tok = zoo.load_pretrained("counting")
    c = model.config
    assert (type(model).__name__, c.n_layer, c.n_head, c.n_embd) == ("GPT2LMHeadModel", 2, 1, 64)
    card = zoo.card("counting")
    assert card["weights_sha256"] == hashlib.sha256((zoo.path("counting") / "model.safetensors").read_bytes()).hexdigest()
    acc = count_accuracy(lambda ids: model(ids, attention_mask=torch.ones_like(ids)).logits, n=256, seed=77)
    assert acc >= card["metrics"]["count_accuracy"] - 0.06 and acc > 0.5  # chance is 1/9


def test_train_script_writes_a_loadable_folder(tmp_path):
    _train_main(["counting", "--steps", "3", "--out", str(tmp_path), "--no-progress"])
    model, tok = zoo.load_pretrained(tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["train_config"]["steps"] == 3 and card["hardware"]["torch_threads"] == 1
    assert tok is not None and len(tok) == model.config.vocab_size == Counting().vocab_size
