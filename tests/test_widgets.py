"""Panels driven headless: set controls, click buttons, assert on the figure data and HTML outputs."""

import base64
import pathlib
import re
from html.parser import HTMLParser

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import nbfeatures.widgets.figure as figure_mod
import nbfeatures.widgets.gallery as gallery_mod
from nbfeatures.features import summarize_features
from nbfeatures.plots import ema
from nbfeatures.widgets import FeatureGallery, LiveCurves, SteeringPanel, figure_widgets_available

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def static(monkeypatch):
    """Simulate a front end without anywidget: plotly's FigureWidget raises ImportError at construction."""
    def no_anywidget(*args, **kwargs):
        raise ImportError("Please install anywidget to use the FigureWidget class")

    monkeypatch.setattr(go, "FigureWidget", no_anywidget)
    monkeypatch.setattr(figure_mod, "_probed", None)
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", None)


def shown(slot_view):
    """The plotly JSON a static panel put into its Output widget."""
    (out,) = slot_view.outputs
    return out["data"]["application/vnd.plotly.v1+json"]


def text_of(html):
    """The text an HTML string shows, tags stripped (the faint glyph for a whitespace token stays as it is)."""
    parser = HTMLParser()
    out = []
    parser.handle_data = out.append
    parser.feed(html)
    return "".join(out)


def array(spec):
    """plotly's JSON writes numpy arrays as {dtype, bdata (base64)}."""
    if isinstance(spec, dict):
        return np.frombuffer(base64.b64decode(spec["bdata"]), dtype=spec["dtype"]).tolist()
    return list(spec)


# ----------------------------------------------------------------------------- LiveCurves


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def row(i):
    return {"loss": 1.0 / i, "fvu": 0.5 / i, "l0": 32.0, "dead_fraction": 0.0, "lr": 1e-3, "elapsed_s": 0.1 * i}


def test_live_curves_draw_in_place_throttled_and_flush_on_finish():
    clock = Clock()
    curves = LiveCurves(every_s=1.0, max_overhead=0, clock=clock)
    assert isinstance(curves.fig, go.FigureWidget)
    fig = curves.fig
    curves(10, row(1))  # the first call draws
    assert curves.n_draws == 1 and list(fig.data[1].y) == [1.0] and fig.data[1].name == "loss"
    clock.t = 0.5
    curves(20, row(2))
    assert curves.n_draws == 1 and len(fig.data[1].y) == 1  # throttled: recorded, not drawn
    assert curves.history["loss"] == [1.0, 0.5]
    clock.t = 1.1
    curves(30, row(3))
    assert curves.n_draws == 2 and list(fig.data[1].x) == [10, 20, 30]
    clock.t = 1.2
    curves(40, row(4))
    assert len(fig.data[1].y) == 3
    curves.finish()
    assert list(fig.data[1].y) == [1.0, 0.5, 1 / 3, 0.25] and curves.fig is fig  # same widget, updated in place
    assert "step 40" in fig.layout.title.text and "loss 0.25" in curves.status.value


def test_live_curves_slow_redraws_push_the_next_one_out():
    clock = Clock()
    curves = LiveCurves(every_s=0.0, max_overhead=0.02, clock=clock)
    refresh = curves.slot.refresh

    def slow_refresh():  # every redraw ends here; make it "take" 50 ms, so the next may come 2.5 s later at the earliest
        clock.t += 0.05
        refresh()

    curves.slot.refresh = slow_refresh
    curves(1, row(1))  # builds the subplots: a rebuild, which does not set the pace
    curves(2, row(2))  # the first in-place redraw "took" 50 ms
    assert curves.n_draws == 2
    for step in (3, 4):
        clock.t += 1.0
        curves(step, row(step))
    assert curves.n_draws == 2  # 2.0 s after a 50 ms redraw: too soon for a 2% budget
    clock.t += 0.6
    curves(5, row(5))
    assert curves.n_draws == 3 and len(curves.fig.data[1].y) == 5


def test_live_curves_draw_at_total_and_accept_bare_dicts():
    clock = Clock()
    curves = LiveCurves(total=3, every_s=100.0, clock=clock)
    curves({"loss": 3.0})
    curves({"loss": 2.0})
    assert curves.n_draws == 1
    curves({"loss": 1.0})  # step 3 == total
    assert curves.n_draws == 2 and list(curves.fig.data[1].x) == [1, 2, 3]
    with pytest.warns(RuntimeWarning, match="curves\\(step, row\\)"):
        curves(4)  # never raises into a training loop: noted and skipped
    assert "curves(step, row)" in curves.notes[-1] and "curves(step, row)" in curves.status.value and curves.n_calls == 3


def test_live_curves_new_metrics_add_subplots_and_missing_values_are_gaps():
    curves = LiveCurves(every_s=0.0)
    curves(1, {"loss": 1.0})
    curves(2, {"loss": 0.9, "ce_recovered": 0.7})
    curves(3, {"loss": 0.8})
    curves.finish()
    names = [t.name for t in curves.fig.data]
    assert names == ["loss (raw)", "loss", "ce_recovered (raw)", "ce_recovered"]
    assert curves.history["ce_recovered"][0] != curves.history["ce_recovered"][0]  # NaN before it was logged
    assert list(curves.fig.data[3].x) == [2] and list(curves.fig.data[3].y) == [0.7]


def test_live_curves_smoothing_and_log_controls():
    curves = LiveCurves(every_s=0.0)
    ys = [4.0, 1.0, 3.0, 0.5, 2.0]
    for i, y in enumerate(ys, 1):
        curves(i, {"loss": y})
    curves.smoothing.value = 0.8
    np.testing.assert_allclose(curves.fig.data[1].y, ema(ys, 0.8))
    assert curves.fig.data[0].visible is True and list(curves.fig.data[0].y) == ys
    curves.log_y.value = True
    assert curves.fig.layout.yaxis.type == "log"
    static = curves.figure()
    assert type(static) is go.Figure and static.layout.yaxis.type == "log"
    np.testing.assert_allclose(static.data[1].y, ema(ys, 0.8))


def test_live_curves_legend_below_the_subplot_titles_and_full_width():
    curves = LiveCurves({"loss": ["fvu", "aux_loss"], "sparsity": ["l0"]}, every_s=0.0)
    curves(1, {"fvu": 0.5, "aux_loss": 0.1, "l0": 30.0})
    curves(2, {"fvu": 0.4, "aux_loss": 0.1, "l0": 31.0})
    layout = curves.fig.layout
    titles = [a.y for a in layout.annotations if a.text in ("loss", "sparsity")]
    assert len(titles) == 2 and layout.legend.orientation == "h" and layout.legend.y < 0 < min(titles)
    assert layout.width is None and layout.autosize is True  # the figure takes the output area's width
    assert curves.layout.width == "100%"
    curves.log_y.value = True  # a rebuild keeps it
    assert curves.fig.layout.legend.y < 0 and curves.fig.layout.width is None


def test_live_curves_follow_train_sae():
    from nbfeatures.sae.topk import TopKConfig, TopKSAE
    from nbfeatures.train import TrainConfig, train_sae

    cfg = TrainConfig(steps=30, batch_size=64, log_every=5)
    curves = LiveCurves(total=cfg.steps)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    history = train_sae(TopKSAE(TopKConfig(d_in=8, d_sae=32, k=4)), x, cfg, callbacks=[curves], progress=False)
    assert curves.history["step"] == list(history["step"])
    loss = curves.fig.data[[t.name for t in curves.fig.data].index("loss")]
    np.testing.assert_allclose(loss.y, history["loss"])  # the last call drew (step == total)
    assert {"loss", "FVU", "L0"} <= {a.text for a in curves.fig.layout.annotations}


# ----------------------------------------------------------------------------- FeatureGallery

VOCAB = ["<s>", "red", "green", "blue", "<script>", "apple", "sky", "grass"]


def gallery_data():
    """4 sequences x 8 tokens, 4 features: f0 fires on 'red' tokens, f1 on 'green', f2 on everything weakly, f3 dead."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, len(VOCAB), (4, 8), generator=g)
    acts = torch.zeros(4, 8, 4)
    acts[..., 0] = (tokens == 1).float() * 2.0
    acts[..., 1] = (tokens == 2).float() * 5.0
    acts[..., 2] = 0.1 + torch.rand(4, 8, generator=g) * 0.1
    labels = torch.where(tokens == 1, 0, torch.where(tokens == 2, 1, -1)).reshape(-1)
    W_dec, W_U = torch.eye(4, 3), torch.randn(3, len(VOCAB), generator=g)
    return summarize_features(acts, tokens, VOCAB, W_dec=W_dec, W_U=W_U, labels=labels, label_names=["red color", "green color"])


def test_gallery_sort_search_select():
    data = gallery_data()
    t = data.table
    gallery = FeatureGallery(data)
    assert gallery.sort_by.value == "density" and gallery.order[0] == 2  # f2 fires everywhere
    assert gallery.feature.value == 2
    gallery.sort_by.value = "max_act"
    assert gallery.order == list(t["max_act"].sort_values(ascending=False, kind="stable").index)
    assert gallery.results.options[0][1] == 1  # f1's max is 5
    gallery.descending.value = False
    assert gallery.order[0] == 3  # the dead feature
    gallery.search.value = "red"
    assert gallery.order == [0] and gallery.feature.value == 0  # selection moves to the only match
    assert "red color" in gallery.cards.value and "precision 1.00" in gallery.cards.value
    gallery.search.value = "#3"
    assert gallery.order == [3]
    gallery.search.value = "no such thing"
    assert gallery.order == [] and gallery.results.options == () and gallery.feature.value == 3  # stays


def test_gallery_card_figures_follow_the_feature():
    data = gallery_data()
    gallery = FeatureGallery(data)
    gallery.feature.value = 1
    card = data.card(1)
    np.testing.assert_array_equal(gallery.hist_fig.data[0].y, card.hist_counts)
    assert f"density {card.density:.3g}" in gallery.hist_fig.layout.title.text
    neg, pos = gallery.logits_fig.data
    np.testing.assert_allclose(pos.x, card.pos_values)
    np.testing.assert_allclose(neg.x, card.neg_values)
    assert gallery.cards.value.count("top ") == 1 and "quantile" in gallery.cards.value
    sel = gallery.overview_fig.data[1]
    assert list(sel.y) == [card.max_act]
    assert gallery.results.value == 1  # the list follows a feature typed in
    gallery.feature.value = 2  # fires everywhere, so its contexts include the token "<script>"
    assert "&lt;script&gt;" in gallery.cards.value and "<script>" not in gallery.cards.value
    assert "nbf-special" in gallery.cards.value  # and it is dimmed as a special token


def plain(fig):
    """A figure as comparable data: its traces (uid dropped) and its layout, JSON-safe; an empty compound property
    (what setting `marker=None` leaves: `marker: {}`) is dropped, as plotly draws it as unset."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k != "uid" and v != {}}
    data = [strip(figure_mod.json_safe(t.to_plotly_json())) for t in fig.data]
    return data, strip(figure_mod.json_safe(fig.layout.to_plotly_json()))


@pytest.mark.parametrize("live", [True, False], ids=["FigureWidget", "static"])
def test_gallery_figures_equal_the_pure_functions_after_each_change(live, monkeypatch):
    """The slots diff the new figure into the old one; what they end up showing is what the pure functions build."""
    from nbfeatures.plots import activation_histogram, output_tokens_bar

    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", live)
    data = gallery_data()
    gallery = FeatureGallery(data)
    gallery.sort_by.value = "feature"
    gallery.descending.value = False
    for change in [lambda: setattr(gallery.feature, "value", 3), lambda: setattr(gallery.feature, "value", 1),
                   gallery.prev_button.click, gallery.next_button.click, gallery.next_button.click]:
        change()
        f = gallery.feature.value
        card = data.card(f)
        hist = activation_histogram(card.hist_counts, card.hist_edges, card.density, f"feature {f}: activations when firing")
        bars = output_tokens_bar(card.pos_tokens, card.pos_values, card.neg_tokens, card.neg_values)
        for ref in (hist, bars):  # at the width that fits the card column
            ref.update_layout(width=gallery_mod.CARD_FIGURE_WIDTH)
        assert plain(gallery.hist_fig) == plain(hist) and plain(gallery.logits_fig) == plain(bars)
        if live:  # the snapshot a new view starts from is the figure too
            for fig, ref in ((gallery.hist_fig, hist), (gallery.logits_fig, bars)):
                assert plain(go.Figure(data=fig._widget_data, layout=fig._widget_layout)) == plain(ref)
        else:  # and a static panel shows it
            assert shown(gallery._logits.view)["layout"]["title"]["text"] == bars.layout.title.text
    assert gallery.feature.value == 2  # 3, 1, back to 0, on to 1 and 2: each a different figure


def test_gallery_changes_only_the_data_of_its_figures(monkeypatch):
    """A feature change restyles the existing traces and sets the title; it neither rebuilds traces nor sends the
    template again (validating it was most of the 170-230 ms a click took, issue #18)."""
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", True)
    gallery = FeatureGallery(gallery_data(), feature=0)
    hist = gallery.hist_fig
    traces, template = hist.data, hist.layout._props["template"]
    sent = []
    hist.observe(lambda ch: ch["new"] is not None and sent.append((ch["name"], ch["new"])),
                 names=["_py2js_update", "_py2js_relayout", "_py2js_restyle", "_py2js_addTraces", "_py2js_deleteTraces"])
    gallery.feature.value = 1
    assert [name for name, _ in sent] == ["_py2js_update"]  # one batched message
    msg = sent[0][1]
    assert {"x", "y", "width"} <= set(msg["style_data"]) and "marker" not in msg["style_data"]  # colour unchanged
    assert set(msg["layout_data"]) == {"title"} and "feature 1" in msg["layout_data"]["title"]["text"]
    assert hist.data[0] is traces[0] and hist.layout._props["template"] is template


def test_figure_slot_diff_matches_a_fresh_figure():
    """Reference: whatever the slot held before, after update(new) it equals go.Figure(new) - same traces
    restyled, other traces rebuilt, keys the new figure lacks cleared (a zoom too), a dict spec as a go.Figure."""
    from nbfeatures.widgets import figure as F

    figs = [
        go.Figure(go.Bar(x=["a", "b"], y=[1.0, 2.0], marker_color="red"), layout=dict(title="one", template="plotly_white")),
        go.Figure(go.Bar(x=["c"], y=[3.0], text=["t"]), layout=dict(title="two", template="plotly_white", height=300)),
        {"data": [{"type": "bar", "x": ["d"], "y": [np.nan]}], "layout": {"title": {"text": "dict"}, "template": "plotly_white"}},
        go.Figure([go.Scatter(x=[0, 1], y=[1, 0]), go.Bar(x=["e"], y=[1.0])], layout=dict(xaxis=dict(range=[0, 1]))),
        go.Figure([go.Scatter(x=[0, 2], y=[1, 5], mode="lines"), go.Bar(x=["e"], y=[2.0])], layout=dict(template="plotly_dark")),
        go.Figure(go.Bar(x=["a"], y=[1.0]), layout=dict(title="last", template="plotly_white")),
    ]
    for live in (True, False):
        F.USE_FIGURE_WIDGET = live
        try:
            slot = F.FigureSlot(figs[0])
            for new in figs[1:]:
                slot.figure.layout.xaxis.range = [5, 6]  # as a user's zoom would leave it
                slot.update(new)
                assert plain(slot.figure) == plain(go.Figure(new))
        finally:
            F.USE_FIGURE_WIDGET = None


def test_gallery_contexts_read_as_words_and_wrap():
    data = gallery_data()
    gallery = FeatureGallery(data)
    gallery.feature.value = 1
    text = text_of(gallery.cards.value)
    words = "|".join(w for w in VOCAB if w.isalpha())
    assert re.search(rf"\b({words}) ({words})\b", text)  # words of a context separated by spaces
    assert not re.search(rf"({words})({words})", text)  # never run together
    for c in data.card(1).top:
        assert " ".join(c.tokens) in text  # each context reads as its words, one space apart
    assert "overflow-wrap: anywhere" in gallery.cards.value and gallery.cards.layout.width == "100%"


def test_gallery_list_and_buttons_select():
    gallery = FeatureGallery(gallery_data())
    gallery.sort_by.value = "feature"
    gallery.descending.value = False
    gallery.results.value = 1
    assert gallery.feature.value == 1
    gallery.next_button.click()
    assert gallery.feature.value == 2
    gallery.prev_button.click()
    gallery.prev_button.click()
    gallery.prev_button.click()  # clamps at the start
    assert gallery.feature.value == 0


def test_gallery_with_a_plain_table_and_card_callable():
    data = gallery_data()
    calls = []

    def card(f):
        calls.append(f)
        return data.card(f)

    gallery = FeatureGallery(data.table[["density", "max_act", "mean_act", "top_tokens"]], card, feature=0)
    assert calls == [0] and gallery.feature.value == 0
    assert [o for o, _ in gallery.sort_by.options] == ["density", "max activation", "mean activation", "feature id"]


# ----------------------------------------------------------------------------- SteeringPanel

V = ["a", "b", "c", "d"]


class FakeModel:
    """A generate callable that steers feature f towards token V[f]; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, feature, strength):
        self.calls.append((prompt, feature, strength))
        words = prompt.split()
        probs = np.full(4, 0.25)
        tokens = ["a", "b", "a"]
        if feature is not None and strength:
            probs = np.eye(4)[feature] * 0.7 + 0.075
            tokens = ["a", V[feature], V[feature]]
        steered = [False] * (len(words) - 1) + [feature is not None] * 4
        return {"prompt_tokens": words, "tokens": tokens, "steered": steered, "probs": probs}


def test_steering_panel_generates_on_release_and_marks_steered_tokens():
    fake = FakeModel()
    panel = SteeringPanel(fake, V, ["apple", "red things", "sky", "grass"], prompt="x y z", feature=1)
    assert fake.calls == [] and panel.strength.continuous_update is False
    panel.strength.value = 6.0
    assert fake.calls == [("x y z", None, 0.0), ("x y z", 1, 6.0)]
    base, steer = panel.next_token_fig.data
    assert list(base.x) == ["b", "a", "c", "d"] and steer.y[0] == pytest.approx(0.775)
    assert list(base.y)[0] == 0.25
    assert "last prompt token and every generated token" in panel.where.value
    assert panel.steered_html.value.count("border-bottom") == 4  # z and the 3 generated tokens
    assert panel.steered_html.value.count("font-weight:700") == 1  # a b b against the baseline's a b a
    assert "red things" in panel.steered_html.value and "1 of 3" in panel.status.value
    panel.strength.value = -2.0
    assert fake.calls[-1] == ("x y z", 1, -2.0) and len(fake.calls) == 3  # baseline cached per prompt


def test_steering_panel_stacks_the_two_texts_and_reads_them_as_words():
    panel = SteeringPanel(FakeModel(), V, ["apple", "red things", "sky", "grass"], prompt="x y z", feature=1)
    panel.generate_button.click()
    assert isinstance(panel.texts, ipw.VBox) and not isinstance(panel.texts, ipw.HBox)
    assert list(panel.texts.children) == [panel.baseline_html, panel.steered_html] and panel.texts in panel.children
    assert not any(isinstance(w, ipw.HBox) and panel.baseline_html in w.children for w in panel.children)
    assert panel.baseline_html.layout.width == panel.steered_html.layout.width == "100%"
    assert "x y z a b a" in text_of(panel.baseline_html.value)  # word-level tokens, one space apart
    assert "x y z a b b" in text_of(panel.steered_html.value)
    for out in (panel.baseline_html.value, panel.steered_html.value):
        assert "white-space: pre-wrap" in out and "overflow-wrap: anywhere" in out
        assert out.count("font-weight:700") == 1 and out.count("background: rgba(44,160,44") == 1  # the differing token
    assert "border-bottom" not in panel.baseline_html.value  # nothing steered there
    assert "underlined" in panel.where.value and "#ff7f0e" in panel.where.value  # the legend: orange underline


class WithNorm(FakeModel):
    """A generate callable that reports its site's activation norm and its directions' promoted tokens."""

    act_norm = 3.2

    def promoted(self, f):
        return [[" sea", " boat", " wave"], ["\n", " sky"], [" grass"], []][f]


def test_steering_panel_strength_range_follows_the_activation_norm():
    panel = SteeringPanel(WithNorm(), V, 4, prompt="x")
    assert panel.act_norm == 3.2 and panel.strength.max == pytest.approx(6.4) and panel.strength.min == pytest.approx(-6.4)
    assert panel.strength.step == 0.01 and panel.strength.readout_format == ".2f"  # 640 steps to the end
    assert SteeringPanel(WithNorm(), V, 4, max_strength=50.0).strength.max == 50.0  # explicit wins
    assert SteeringPanel(WithNorm(), V, 4, strength=9.0).strength.max == 9.0  # the range holds the given strength
    assert SteeringPanel(FakeModel(), V, 4).strength.max == 20.0  # nothing reported: the old default
    with pytest.raises(ValueError, match="need max_strength > 0 and \\|strength\\| <= max_strength"):
        SteeringPanel(WithNorm(), V, 4, strength=9.0, max_strength=5.0)


def test_unnamed_features_show_their_id_and_promoted_tokens():
    panel = SteeringPanel(WithNorm(), V, ["apple", None, "", "None"], prompt="x y z", feature=0)
    labels = dict((i, label) for label, i in panel.results.options)
    assert labels[0] == "#0 apple · ↑ sea, boat, wave"
    assert labels[1] == "#1 · ↑ ↵, sky" and labels[2] == "#2 · ↑ grass"
    assert labels[3] == "#3"  # no name and nothing promoted: the id alone
    assert not any("None" in label for label in labels.values())
    panel.feature.value = 1
    panel.generate_button.click()
    assert "#1 · ↑ ↵, sky" in text_of(panel.steered_html.value)
    mapping = SteeringPanel(FakeModel(), V, {5: None, 7: "sky"}, promoted={5: ["sea"], 7: ["blue"]})
    assert [label for label, _ in mapping.results.options] == ["#5 · ↑ sea", "#7 sky · ↑ blue"]
    calls = []
    SteeringPanel(FakeModel(), V, 3, promoted=lambda f: calls.append(f) or [f"t{f}"])
    assert calls == [0, 1, 2]
    with pytest.raises(TypeError, match="promoted must be a mapping or a callable"):
        SteeringPanel(FakeModel(), V, 3, promoted=["a"])


def test_steering_panel_search_picks_a_feature_without_calling_the_model():
    fake = FakeModel()
    panel = SteeringPanel(fake, V, ["apple", "red things", "sky", "grass"], prompt="x y")
    panel.generate_button.click()
    n = len(fake.calls)
    panel.search.value = "sky"
    assert panel.feature.value == 2 and [i for _, i in panel.results.options] == [2]
    assert len(fake.calls) == n and "press Generate" in panel.status.value
    panel.generate_button.click()
    assert fake.calls[-1] == ("x y", 2, 4.0)
    assert panel.next_token_fig.data[1].x[0] == "c"
    panel.search.value = "#3"
    assert panel.feature.value == 3


def test_steering_panel_names_what_a_bad_callable_returned():
    panel = SteeringPanel(lambda p, f, s: {"tokens": []}, V, 4, prompt="x")
    with pytest.raises(ValueError, match="prompt_tokens, tokens, steered, probs"):
        panel.run()
    panel.status.value = ""
    panel.generate_button.click()  # ipywidgets logs a handler's exception; the panel shows it
    assert "ValueError" in panel.status.value and "prompt_tokens" in panel.status.value


# ----------------------------------------------------------------------------- static fallback


def test_without_anywidget_panels_fall_back_to_static_figures(static):
    assert figure_widgets_available() is False
    curves = LiveCurves(every_s=0.0, max_overhead=0)
    curves(1, {"loss": 2.0})
    curves(2, {"loss": 1.0})
    assert type(curves.fig) is go.Figure and list(curves.fig.data[1].y) == [2.0, 1.0]
    view = curves.children[1]
    assert isinstance(view, ipw.Output) and array(shown(view)["data"][1]["y"]) == [2.0, 1.0]
    curves.log_y.value = True
    assert shown(view)["layout"]["yaxis"]["type"] == "log"

    gallery = FeatureGallery(gallery_data())
    gallery.feature.value = 1
    assert type(gallery.hist_fig) is go.Figure
    assert list(gallery.hist_fig.data[0].y) == list(gallery_data().card(1).hist_counts)

    panel = SteeringPanel(FakeModel(), V, 4, prompt="x y", feature=3)
    panel.generate_button.click()
    assert type(panel.next_token_fig) is go.Figure and panel.next_token_fig.data[1].x[0] == "d"


def test_the_switch_forces_static_figures(monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", False)
    assert type(LiveCurves().fig) is go.Figure


# ----------------------------------------------------------------------------- steering_fn on tiny models


def test_steering_fn_on_tiny_models(model):
    from nbfeatures import sites
    from nbfeatures.edits import Ablate, Steer
    from nbfeatures.steering import edits_fn, steering_fn, token_strings

    site, prompt = "blocks.0.hook_resid_post", "w1 w2 w3 w4"
    directions = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    fn = steering_fn(model, site, directions, max_new_tokens=4)
    base = fn(prompt, None, 0.0)
    ref = sites.generate(model, prompt, [], max_new_tokens=4).tokens[0]
    tok = sites.tokenizer_of(model)
    assert base.prompt_tokens == ["w1", "w2", "w3", "w4"]
    assert base.prompt_tokens + base.tokens == [tok.decode([i]) for i in ref.tolist()]
    assert base.steered == [False] * (4 + len(base.tokens))
    zero = fn(prompt, 1, 0.0)  # identity: zero strength generates the baseline
    assert zero.tokens == base.tokens and torch.allclose(zero.probs, base.probs, atol=1e-6)
    assert zero.steered == [False, False, False] + [True] * (1 + len(zero.tokens))  # last prompt token + generated

    out = fn(prompt, 1, 30.0)
    logits = sites.run(model, prompt, [Steer(site, directions[1], 30.0, slice(-1, None))]).logits[0, -1]
    torch.testing.assert_close(out.probs, logits.softmax(-1))
    assert not torch.allclose(out.probs, base.probs, atol=1e-3)
    with pytest.raises(ValueError, match="out of range.*0..2"):
        fn(prompt, 3, 1.0)

    ablate = edits_fn(model, lambda f, s: [Ablate(site, positions=[1, 2])], positions=[1, 2], max_new_tokens=2)
    ablated = ablate(prompt, 0, 1.0)  # any edit: here zero-ablating prompt positions 1 and 2
    torch.testing.assert_close(ablated.probs, sites.run(model, prompt, [Ablate(site, positions=[1, 2])]).logits[0, -1].softmax(-1))
    assert ablated.steered == [False, True, True, False, False, False]

    vocab = token_strings(model)
    assert len(vocab) == 64 and vocab[5] == "w5"
    hf = sites.unwrap(model)
    # the site's typical norm, against a raw forward: block 0's output on the same 33 pseudo-random tokens
    sample = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        resid = hf(sample, output_hidden_states=True).hidden_states[1][0, 1:]
    assert fn.act_norm == pytest.approx(float(resid.norm(dim=-1).median()), rel=1e-5)
    with torch.no_grad():
        top = hf.get_output_embeddings()(directions[2]).topk(5).indices.tolist()  # the unembedding as a module
    assert fn.promoted(2) == [vocab[i] for i in top]
    auto = SteeringPanel(fn, vocab, [None, "two", None], prompt=prompt, strength=0.1)
    assert auto.strength.max == pytest.approx(2 * fn.act_norm, rel=0.1) and auto.strength.max >= 2 * fn.act_norm
    label = dict((i, t) for t, i in auto.results.options)[2]
    assert label.startswith("#2 · ↑ ") and fn.promoted(2)[0] in label and "None" not in label
    panel = SteeringPanel(fn, vocab, ["one", "two", "three"], prompt=prompt, feature=1, max_strength=40.0)
    assert panel.strength.max == 40.0  # an explicit range is kept
    panel.strength.value = 30.0
    steered_bars = panel.next_token_fig.data[1]
    top = int(out.probs.argmax())
    assert steered_bars.y[list(steered_bars.x).index(vocab[top])] == pytest.approx(float(out.probs[top]), rel=1e-3)
    assert "last prompt token and every generated token" in panel.where.value


def test_steering_panel_forces_a_codebook_code_through_edits_fn(model):
    """The panel's third kind of steering: a codebook code forced at the last prompt token and every generated one."""
    from nbfeatures import sites
    from nbfeatures.codebook import CodebookConfig, CodebookLayer
    from nbfeatures.codebook import ForceCodes
    from nbfeatures.steering import edits_fn, token_strings

    site, prompt = "blocks.0.hook_resid_post", "w1 w2 w3 w4"
    torch.manual_seed(0)
    layer = CodebookLayer(CodebookConfig(d_in=32, n_codes=16, k=2))
    with torch.no_grad():
        layer.codebook.mul_(5.0)  # big codes: forcing one moves the output
    force = edits_fn(model, lambda c, s: [ForceCodes(site, layer, (c,), positions=slice(-1, None), mode="last")],
                     max_new_tokens=3)
    out = force(prompt, 7, 1.0)
    ref = sites.run(model, prompt, [ForceCodes(site, layer, (7,), positions=slice(-1, None), mode="last")]).logits[0, -1]
    torch.testing.assert_close(out.probs, ref.softmax(-1))
    assert out.steered == [False, False, False] + [True] * (1 + len(out.tokens))
    other = force(prompt, 3, 1.0)
    assert not torch.allclose(other.probs, out.probs, atol=1e-4)  # which code is forced matters

    panel = SteeringPanel(force, token_strings(model), [f"code {i}" for i in range(16)], prompt=prompt, feature=7)
    panel.generate_button.click()
    bars = panel.next_token_fig.data[1]
    top = int(out.probs.argmax())
    assert bars.y[list(bars.x).index(token_strings(model)[top])] == pytest.approx(float(out.probs[top]), rel=1e-3)
    panel.feature.value = 3
    panel.generate_button.click()
    bars = panel.next_token_fig.data[1]
    top = int(other.probs.argmax())
    assert bars.y[list(bars.x).index(token_strings(model)[top])] == pytest.approx(float(other.probs[top]), rel=1e-3)


def test_figure_slot_sends_json_safe_data_and_refreshes_the_view_snapshot():
    """NaN cannot travel in a widget message, and a view made after an update must start from the update."""
    import json

    import plotly.graph_objects as go

    from nbfeatures.widgets import figure as F

    F.USE_FIGURE_WIDGET = True
    try:
        slot = F.FigureSlot(go.Figure(go.Bar(x=["a", "b"], y=np.array([1.0, np.nan]))))
        assert list(slot.figure.data[0].y) == [1.0, None]
        slot.update(go.Figure([go.Scatter(x=[0, 1], y=[np.inf, 2.0]), go.Bar(x=["c"], y=[3.0])]))
        snap = slot.figure._widget_data
        json.dumps(snap, allow_nan=False)  # what the front end receives
        assert [t["type"] for t in snap] == ["scatter", "bar"] and list(snap[0]["y"]) == [None, 2.0]
        curves = LiveCurves(every_s=0.0)
        curves(1, {"loss": 1.0})
        curves(2, {"loss": 0.5, "l0": 3.0})  # l0 missing at step 1: a gap, sent as None
        curves(3, {"loss": 0.25, "l0": 2.0})
        json.dumps(curves.fig._widget_data, allow_nan=False)
        assert [t.get("y") for t in curves.fig._widget_data] == [list(t.y) for t in curves.fig.data]
    finally:
        F.USE_FIGURE_WIDGET = None
