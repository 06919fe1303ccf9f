"""Code search on planted cases."""

import pandas as pd
import pytest
import torch

from nbfeatures.code_search import neuron_precision_at_recall, rank_codes, regex_targets


def test_regex_targets_mark_the_capture_groups_token():
    texts = [["1", "2", "4", "0", "3", "4", "0"], ["4", "0", "x"]]
    t = regex_targets(texts, r"(?=(4)0)")
    assert t.tolist() == [[False, False, True, False, False, True, False], [True] + [False] * 6]  # padded to the longest
    multi = [["ab", "cd", "ef"]]  # a match starting inside a multi-character token marks that token
    assert regex_targets(multi, r"d(e)").tolist() == [[False, False, True]]
    assert regex_targets(multi, r"bc").tolist() == [[True, False, False]]


def test_rank_codes_recovers_a_planted_code():
    torch.manual_seed(0)
    B, T, C = 20, 30, 50
    codes = torch.randint(0, C, (B, T, 1))
    target = torch.rand(B, T) < 0.1
    codes[target] = 7  # code 7 fires exactly on the concept...
    codes[~target] = torch.where(codes[~target] == 7, 8, codes[~target])
    df = rank_codes(codes, target, C)
    top = df.iloc[0]
    assert top.code == 7 and top.precision == 1.0 and top.recall == 1.0 and top["count"] == target.sum()
    assert list(df.columns) == ["code", "precision", "recall", "count"]


def test_rank_codes_for_grouped_codebooks_with_k_slots():
    codes = torch.zeros(2, 3, 2, 2, dtype=torch.long)  # [B, T, G, K]
    codes[0, 1, 1, 1] = 5
    target = torch.zeros(2, 3, dtype=torch.bool)
    target[0, 1] = True
    df = rank_codes(codes, target, n_codes=6)
    assert (df.iloc[0][["group", "code", "precision", "recall"]].tolist()) == [1, 5, 1.0, 1.0]


def test_neuron_baseline_at_matched_recall():
    torch.manual_seed(0)
    target = torch.rand(2000) < 0.2
    acts = torch.randn(2000, 4)
    acts[:, 2] -= 3 * target.float()  # neuron 2 is (negatively) informative
    df = neuron_precision_at_recall(acts, target, recall=0.5)
    best = df.iloc[0]
    assert best.neuron == 2 and best.sign == -1 and best.precision > 0.8
    fires = -acts[:, 2] >= best.threshold
    assert (fires & target).sum() / target.sum() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="recall must lie"):
        neuron_precision_at_recall(acts, target, 0)
    with pytest.raises(ValueError, match="never occurs"):
        neuron_precision_at_recall(acts, torch.zeros(2000, dtype=torch.bool), 0.5)
