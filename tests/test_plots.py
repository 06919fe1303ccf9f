"""Figures are pure functions: check the traces and layout they return."""

import math

import numpy as np
import plotly.graph_objects as go
import pytest

from nbfeatures.plots import (
    activation_histogram, card_html, contexts_html, curves, default_panels, describe_steered, ema, feature_overview,
    generation_html, next_token_bars, output_tokens_bar, shaded_tokens, training_curves, unique_labels,
)


def naive_ema(y, a):
    s = w = 0.0
    out = []
    for v in y:
        s, w = a * s + (1 - a) * v, a * w + (1 - a)
        out.append(s / w)
    return np.array(out)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("a", [0.0, 0.3, 0.9, 0.99])
def test_ema_matches_the_loop(n, a):
    y = np.random.default_rng(n).normal(size=n)
    np.testing.assert_allclose(ema(y, a), naive_ema(y, a), rtol=1e-10, atol=1e-12)


def test_ema_rejects_smoothing_outside_0_1():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema([1.0, 2.0], 1.0)


HISTORY = {
    "step": [10, 20, 30, 40], "lr": [1e-3] * 4, "loss": [4.0, 3.0, 2.0, 1.0], "aux_loss": [0.5, 0.4, 0.3, 0.2],
    "fvu": [0.9, 0.5, 0.3, 0.2], "l0": [60.0, 40.0, 32.0, 32.0], "dead_fraction": [0.0, 0.1, 0.2, 0.2],
    "ce_recovered": [math.nan, 0.5, math.nan, 0.8], "weird": [1.0, 2.0, 3.0, 4.0],
}


def test_default_panels_group_known_metrics_and_skip_bookkeeping():
    panels = default_panels(list(HISTORY))
    assert panels == {"loss": ["loss", "aux_loss"], "FVU": ["fvu"], "L0": ["l0"], "dead / dense fraction": ["dead_fraction"],
                      "CE loss recovered": ["ce_recovered"], "other": ["weird"]}


def test_training_curves_one_subplot_per_group_raw_and_smoothed_lines():
    fig = training_curves(HISTORY)
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert names[:4] == ["loss (raw)", "loss", "aux_loss (raw)", "aux_loss"]
    loss = fig.data[1]
    assert list(loss.x) == [10, 20, 30, 40] and list(loss.y) == [4.0, 3.0, 2.0, 1.0]
    assert fig.data[0].visible is False  # no smoothing: the raw line would coincide
    ce = fig.data[names.index("ce_recovered")]
    assert list(ce.x) == [20, 40] and list(ce.y) == [0.5, 0.8]  # NaN rows dropped
    assert {a.text for a in fig.layout.annotations} >= {"loss", "FVU", "L0", "CE loss recovered"}
    assert fig.data[1].xaxis != fig.data[names.index("fvu")].xaxis  # different subplots
    assert "step 40" in fig.layout.title.text


def test_a_training_history_dataframe_works_as_is():
    import pandas as pd

    fig = training_curves(pd.DataFrame(HISTORY), smoothing=0.5)
    assert [t.name for t in fig.data][1] == "loss" and list(fig.data[1].x) == [10, 20, 30, 40]
    assert "step 40" in fig.layout.title.text
    fig = training_curves(pd.DataFrame({"loss": [2.0, 1.0]}))
    assert list(fig.data[1].x) == [1, 2] and "step 2" in fig.layout.title.text


def test_smoothing_changes_the_data_and_shows_raw_lines():
    fig = training_curves(HISTORY, smoothing=0.5)
    np.testing.assert_allclose(fig.data[1].y, naive_ema([4.0, 3.0, 2.0, 1.0], 0.5))
    assert list(fig.data[0].y) == [4.0, 3.0, 2.0, 1.0] and fig.data[0].visible is True
    assert "EMA 0.5" in fig.layout.title.text


def test_log_toggle_sets_every_y_axis_to_log():
    lin, log = training_curves(HISTORY), training_curves(HISTORY, log_y=True)
    def axes(fig):
        return [fig.layout[k].type for k in fig.layout if k.startswith("yaxis")]
    assert set(axes(lin)) == {"linear"} and set(axes(log)) == {"log"}


def test_explicit_panels_and_curves_data():
    panels = {"recon": ["fvu", "loss"]}
    fig = training_curves(HISTORY, panels)
    assert [t.name for t in fig.data] == ["fvu (raw)", "fvu", "loss (raw)", "loss"]
    c = curves(HISTORY, panels, 0.0)
    assert [x.metric for x in c] == ["fvu", "loss"] and {x.panel for x in c} == {0}
    with pytest.raises(ValueError, match="not in the history.*'nope'"):
        training_curves(HISTORY, {"a": ["nope"]})


def test_empty_history_is_an_empty_figure():
    fig = training_curves({})
    assert len(fig.data) == 0 and "no data yet" in fig.layout.title.text


def test_activation_histogram_bars_and_density_title():
    fig = activation_histogram([3, 0, 1], [0.0, 1.0, 2.0, 4.0], density=0.0125)
    assert list(fig.data[0].y) == [3, 0, 1]
    assert list(fig.data[0].x) == [0.5, 1.5, 3.0] and list(fig.data[0].width) == [1.0, 1.0, 2.0]
    assert "density 0.0125" in fig.layout.title.text
    with pytest.raises(ValueError, match="len\\(edges\\) == len\\(counts\\) \\+ 1"):
        activation_histogram([1, 2], [0.0, 1.0])


def test_output_tokens_bar_negative_left_positive_right():
    fig = output_tokens_bar([" cat", "dog"], [2.0, 1.0], ["x", "x"], [-3.0, -1.0])
    neg, pos = fig.data
    assert list(pos.x) == [2.0, 1.0] and list(pos.y) == ["·cat", "dog"]
    assert list(neg.x) == [-3.0, -1.0] and list(neg.y) == ["x #0", "x #1"]  # equal labels kept apart
    assert neg.xaxis == "x" and pos.xaxis == "x2"


def test_unique_labels_only_disambiguates_collisions():
    assert unique_labels(["a", "b", "a"], [5, 6, 7]) == ["a #5", "b", "a #7"]
    assert unique_labels(["\n", ""]) == ["↵", "∅"]


def test_next_token_bars_top_k_by_either_distribution():
    vocab = ["a", "b", "c", "d"]
    fig = next_token_bars([0.7, 0.2, 0.1, 0.0], [0.1, 0.0, 0.1, 0.8], vocab, k=2)
    base, steer = fig.data
    assert list(base.x) == ["d", "a"] and list(base.y) == [0.0, 0.7] and list(steer.y) == [0.8, 0.1]
    with pytest.raises(ValueError, match="vocab of V strings"):
        next_token_bars([0.5, 0.5], [0.5, 0.5], vocab)


def test_feature_overview_marks_the_selected_feature():
    fig = feature_overview([0.1, 0.0, 0.01], [3.0, 0.0, 1.0], selected=2)
    assert list(fig.data[0].customdata) == [0, 1, 2]
    assert list(fig.data[1].y) == [1.0] and fig.data[1].x[0] == pytest.approx(-2.0)


class Ctx:
    def __init__(self, tokens, acts, center):
        self.tokens, self.acts, self.center, self.act, self.seq, self.pos = tokens, acts, center, acts[center], 0, center


def test_shaded_tokens_escape_and_shade_by_activation():
    out = shaded_tokens(["<b>", "x"], [0.0, 2.0], 2.0, center=1)
    assert "&lt;b&gt;" in out and "<b>" not in out
    assert "rgba(255,127,14,0.00)" in out and "rgba(255,127,14,1.00)" in out and "outline" in out
    html = contexts_html([Ctx(["a", "b"], np.array([0.0, 1.0]), 1)], 1.0, "top")
    assert "top" in html and html.count("<span style=\"background") == 2


def test_card_html_shows_label_only_when_present():
    class Card:
        feature, density, max_act, mean_act, best_label, precision, recall = 3, 0.01, 2.0, 1.0, "red & blue", 0.9, 0.5
        top, quantiles = [], [("quantile 80%–100%", [])]
    html = card_html(Card())
    assert "feature 3" in html and "red &amp; blue" in html and "precision 0.90" in html and "quantile 80%" in html
    Card.best_label = None
    assert "best label" not in card_html(Card())


def test_describe_steered_in_words():
    assert describe_steered([0, 0, 1, 1, 1], 3) == "last prompt token and every generated token"
    assert describe_steered([1, 1, 1, 1], 3) == "every prompt token and every generated token"
    assert describe_steered([0, 1, 1, 0], 4) == "prompt tokens 1–2"
    assert describe_steered([0, 0, 0], 2) == "nothing steered"


def test_generation_html_marks_steered_and_changed_tokens():
    html = generation_html(["a", "b"], ["c", "<d>"], [False, True, True, True], "steered", differs=[False, True])
    assert html.count("border-bottom") == 3 and html.count("font-weight:700") == 1 and "&lt;d&gt;" in html
