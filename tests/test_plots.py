"""Figures are pure functions: check the traces and layout they return."""

import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest

from nbfeatures.plots import (
    activation_histogram, card_html, contexts_html, curves, default_panels, describe_steered, ema, feature_overview,
    generation_html, inversion_samples, next_token_bars, output_tokens_bar, query_html, shaded_tokens, show_token,
    training_curves, unique_labels,
)
from nbfeatures.plots.bars import activation_histogram_spec, output_tokens_spec
from nbfeatures.plots.inversion import QUERY_STYLE


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
    assert neg.xaxis == "x" and pos.xaxis == "x2" and neg.yaxis == "y" and pos.yaxis == "y2"
    assert {neg.orientation, pos.orientation} == {"h"}  # horizontal bars: tokens on the y axes, never rotated ticks


def test_output_tokens_bar_is_a_butterfly_with_labels_on_the_outer_sides():
    """Labels of the two plots never meet: negative tokens on the far left, positive on the far right, and each
    side's margin grows to its longest label, so the figure reads at any column width."""
    fig = output_tokens_bar([f"p{i}" for i in range(10)], np.linspace(3, 1, 10), [f"n{i}" for i in range(10)], -np.linspace(3, 1, 10))
    L = fig.layout
    assert L.xaxis.domain[1] <= L.xaxis2.domain[0]  # negative plot left of the positive one
    assert L.yaxis.side == "left" and L.yaxis2.side == "right"
    assert L.yaxis.anchor == "x" and L.yaxis2.anchor == "x2"
    for ax in (L.yaxis, L.yaxis2):
        assert ax.automargin and ax.type == "category" and ax.autorange == "reversed"  # strongest on top
    assert L.height >= 22 * 10  # a row per token, 22 px each
    assert fig.data[0].marker.color != fig.data[1].marker.color


def test_output_token_labels_are_the_text_the_tokens_stand_for():
    """Raw tokenizer pieces show as their text (display_tokens), whitespace visible, no Ġ / ▁ markers."""
    fig = output_tokens_bar(["Ġthe", "▁sea", "Ċ", "\tx"], [4.0, 3.0, 2.0, 1.0], ["Ġ", " a"], [-1.0, -0.5])
    neg, pos = fig.data
    assert list(pos.y) == ["·the", "·sea", "↵", "→x"]
    assert list(neg.y) == ["·", "·a"]
    assert not any(m in label for label in pos.y + neg.y for m in "Ġ▁Ċ")


def test_show_token_uses_display_tokens():
    assert [show_token(t) for t in ["Ġthe", "▁the", " the", "the", "Ċ", "<0x0A>", "", "<|endoftext|>"]] == \
        ["·the", "·the", "·the", "the", "↵", "↵", "∅", "<|endoftext|>"]
    assert show_token("Ã©") == "é" and show_token("café") == "café"  # byte-level mojibake decoded, real text kept


def test_output_tokens_spec_builds_the_same_figure():
    args = (["a", "b"], [2.0, 1.0], ["c"], [-1.0])
    assert go.Figure(output_tokens_spec(*args)).to_dict() == output_tokens_bar(*args).to_dict()
    args = ([3, 0, 1], [0.0, 1.0, 2.0, 4.0], 0.25, "feature 3")
    assert go.Figure(activation_histogram_spec(*args)).to_dict() == activation_histogram(*args).to_dict()


def test_query_html_draws_the_query_with_tokens_html():
    tokens = ["<s>", "Ġthe", "Ġ<b>", "Ċ", "cat"]
    html = query_html(tokens, 2)
    assert html.count('class="nbf-tokens"') == 1  # one tokens_html row
    spans = html.split('<span class="nbf-tok')[1:]  # a span per token (a whitespace token nests a glyph span)
    assert len(spans) == 5
    assert [QUERY_STYLE in s.split('style="')[1].split('"')[0] for s in spans] == [False, False, True, False, False]
    assert [re.sub(r"<[^>]*>", "", s.split(">", 1)[1]) for s in spans] == ["&lt;s&gt;", " the", " &lt;b&gt;", "↵\n", "cat"]
    assert spans[0].startswith(' nbf-special"')  # <s> dimmed as a special token
    assert "<b>" not in html.replace("<b>query</b>", "")  # every token escaped
    assert "Ġ" not in re.sub(r'title="[^"]*"', "", html)  # the raw piece only in the hover title
    assert "(position 2)" in html and html.startswith("<div><b>query</b>") and 'title="pos 2 · ' in html
    last = query_html(tokens, 4).split('<span class="nbf-tok')[1:]
    assert [QUERY_STYLE in s for s in last] == [False, False, False, False, True]


def test_inversion_heatmap_cells_show_token_text():
    fig = inversion_samples([["<s>", "Ġa", "Ċ"]], [0.0], [[0.0, 1.0, 0.0]], [1], 0.1)
    assert fig.data[0].text[0] == ["&lt;s&gt;", "·a", "↵"]  # escaped: plotly reads a bare <s> as strike-through


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
    assert "top" in html and html.count("class=\"nbf-tok\"") == 2 and html.count("background: rgba(255,127,14,") == 2
    assert "a</span><span" in html and "> b</span>" in html  # word-level tokens read with a space between


def test_contexts_decide_word_level_once_for_all_rows():
    """A context of decoded BPE pieces may hold no leading space; the other rows tell that it is not word level."""
    rows = [Ctx(["lit", "tle"], np.array([1.0, 0.0]), 0), Ctx([" the", " sea"], np.array([0.0, 1.0]), 1)]
    html = contexts_html(rows, 1.0)
    assert ">lit</span><span" in html and ">tle</span>" in html  # not " tle"
    assert "> tle</span>" in contexts_html(rows[:1], 1.0)  # alone it looks word level


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
    assert html.count("color:#777") == 2  # the prompt is grey
    assert "white-space: pre-wrap" in html and "overflow-wrap: anywhere" in html  # wraps in its column
    plain = generation_html(["Mia", "was"], ["a", "girl", "."], None)
    assert ">Mia</span>" in plain and "> was</span>" in plain and "> girl</span>" in plain and ">.</span>" in plain


def test_training_curves_legend_below_the_plots_and_width_from_the_page():
    fig = training_curves(HISTORY)
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0 and fig.layout.legend.yanchor == "top"
    titles = [a for a in fig.layout.annotations if a.text in {"loss", "FVU", "L0"}]
    assert titles and min(a.y for a in titles) > 0.5 > fig.layout.legend.y  # the subplot titles stay clear
    assert fig.layout.width is None and fig.layout.autosize is True
    assert training_curves({"loss": [1.0]}, height=300).layout.legend.y < 0


def test_tokens_reach_plotly_escaped():
    """plotly reads <s>, <b>, <br> ... in text as markup: a token `<s>` must arrive as `&lt;s&gt;` everywhere."""
    from nbfeatures.plots.tokens import plotly_text
    assert plotly_text("<s> & </s>") == "&lt;s&gt; &amp; &lt;/s&gt;"
    assert unique_labels(["<s>", "a"]) == ["&lt;s&gt;", "a"]
    fig = output_tokens_bar(["<s>"], [1.0], ["</s>"], [-1.0], title="<s> x")
    assert "&lt;s&gt;" in fig.data[1].y and "&lt;/s&gt;" in fig.data[0].y and fig.layout.title.text == "&lt;s&gt; x"
    fig = next_token_bars([0.6, 0.4], [0.5, 0.5], ["<s>", "a"], k=2)
    assert "&lt;s&gt;" in fig.data[0].x
    fig = inversion_samples([["<s>", "a"]], [0.0], [[0.0, 1.0]], [0], 0.1, title="query <s>")
    assert fig.layout.title.text == "query &lt;s&gt;" and fig.data[0].text[0][0] == "&lt;s&gt;"


def test_state_codes_table_labels_every_row_and_column():
    from nbfeatures.plots.fsm import state_codes_table
    fig = state_codes_table(["L0 attn", "L1 <mlp>"], [1, 2], [3, 4], "07")
    head, cells = fig.data[0].header.values, fig.data[0].cells.values
    # no plain space: plotly.js word-wraps such cells by measuring the page, blank when drawn hidden
    assert all(" " not in h and h for h in head) and head[1].replace("\u00a0", " ") == "code on 1st digit 0"
    assert [c.replace("\u00a0", " ") for c in cells[0]] == ["L0 attn", "L1 &lt;mlp&gt;"]
    assert fig.layout.height == 40 + 28 + 2 * 22 + 6 + 2  # as tall as the table: no empty band under it


def test_next_state_bars_ticks_are_readable():
    from nbfeatures.plots.fsm import next_state_bars
    ax = next_state_bars(np.full(100, 0.01), None, [1, 2]).layout.xaxis
    assert ax.tickangle in (0, -45) and ax.tickfont.size >= 11 and ax.nticks <= 25


def test_log_y_curves_label_decades_only():
    fig = training_curves({"step": [0, 1, 2], "loss": [100.0, 10.0, 1.0]}, {"loss": ["loss"]}, log_y=True)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1
