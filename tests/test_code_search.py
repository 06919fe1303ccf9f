"""Code search on planted cases."""

import pytest
import torch

from nbfeatures.codebook import CodebookConfig, CodebookLayer
from nbfeatures.codebook import NeuronBaseline, best_code_per_label, codes_frame, neuron_precision_at_recall, rank_codes, regex_targets


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


def test_codes_frame_lists_every_fired_code_per_token_and_site():
    heads = CodebookLayer(CodebookConfig(4, 6, k=2, n_groups=3))
    out = heads(torch.randn(2, 5, 3, 4))
    flat = torch.tensor([[[1], [2], [3]], [[4], [5], [0]]])  # [B=2, T=3, K=1]
    toks = [["a", "b", "c", "d", "e"], ["f", "g", "h", "i", "j"]]
    df = codes_frame({"heads": out, "mlp": flat}, tokens=toks)
    assert len(df) == 2 * 5 * 3 * 2 + 2 * 3
    row = df[(df.site == "heads") & (df.seq == 1) & (df.pos == 4) & (df.group == 2) & (df.slot == 1)].iloc[0]
    assert row.code == out.codes[1, 4, 2, 1] and row.token == "j" and row.sim == pytest.approx(out.sims[1, 4, 2, 1].item())
    mlp = df[df.site == "mlp"]
    assert mlp.code.tolist() == [1, 2, 3, 4, 5, 0] and mlp.token.tolist() == list("abcfgh") and mlp.sim.isna().all()
    with pytest.raises(ValueError, match=r"codes\['x'\] must be integer codes"):
        codes_frame({"x": torch.randn(2, 3, 1)})
    with pytest.raises(ValueError, match="token strings"):
        codes_frame({"mlp": flat}, tokens=[["a"]])


def test_best_code_per_label_agrees_with_rank_codes_on_each_label():
    g = torch.Generator().manual_seed(0)
    B, T, G, K, C = 6, 40, 2, 2, 9
    codes = torch.randint(0, C, (B, T, G, K), generator=g)
    labels = torch.randint(-1, 3, (B, T), generator=g)
    codes[..., 1, 0] = torch.where(labels == 2, 4, codes[..., 1, 0])  # group 1 code 4 fires on every label-2 token
    df = best_code_per_label(codes, labels, C)
    assert df.label.tolist() == [0, 1, 2] and df.support.tolist() == [int((labels == k).sum()) for k in range(3)]
    assert df.iloc[2][["group", "code", "recall"]].tolist() == [1, 4, 1.0]
    for k in range(3):
        ranked = rank_codes(codes, labels == k, C)
        f1 = 2 * ranked.precision * ranked.recall / (ranked.precision + ranked.recall)
        assert df.iloc[k].precision == pytest.approx(ranked.precision[f1.idxmax()])
        assert df.iloc[k].recall == pytest.approx(ranked.recall[f1.idxmax()])
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \[6, 40\]"):
        best_code_per_label(codes, labels[:, :5], C)


def test_neuron_baseline_equals_thresholding_every_neuron_by_hand():
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(500, 6, generator=g).round(decimals=1)  # ties at the thresholds
    target = torch.rand(500, generator=g) < 0.1
    acts[:, 4] += 2 * target.float()
    base = NeuronBaseline(acts)
    for recall in (0.3, 0.75, 1.0):
        df = base(target, recall)
        for _, row in df.iterrows():
            fires = row.sign * acts[:, int(row.neuron)] >= row.threshold
            assert row.precision == pytest.approx(((fires & target).sum() / fires.sum().clamp_min(1)).item())
        assert df.iloc[0].neuron == 4 and df.iloc[0].sign == 1
        one_pass = neuron_precision_at_recall(acts, target, recall)
        assert dict(zip(zip(one_pass.neuron, one_pass.sign), one_pass.precision)) == pytest.approx(dict(zip(zip(df.neuron, df.sign), df.precision)))
    with pytest.raises(ValueError, match="target has 3 entries for 500 rows"):
        base(target[:3], 0.5)
