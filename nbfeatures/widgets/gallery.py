"""Feature gallery: a sortable, searchable list of features and a card for the selected one.

    summary = summarize_features(latents_NF, tokens, decode, W_dec=sae.W_dec, W_U=W_U, labels=...)
    gallery = FeatureGallery(summary)            # or FeatureGallery(table, card=callable)

The card follows SAEDashboard / Neuronpedia pages: top-activating contexts shaded by activation,
samples from activation quantiles, the activation histogram with the density in its title, the
top positive and negative output tokens, and the best ground-truth label with precision / recall.
"""

from __future__ import annotations

from typing import Any, Callable

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go

from ..plots import card_html, feature_overview
from ..plots.bars import activation_histogram_spec, output_tokens_spec
from ..plots._checks import as_int
from .figure import FigureSlot, reported

SEARCHED = ("best_label", "top_tokens", "top_logits")  # table columns the search box looks in
# Fixed figure widths (px) that fit the two columns of a 1280 px window's output area (about 1100 px): inside an
# HBox a plotly view cannot size itself to its column and falls back to 700 px, which spills under the card column
# (the overview) or is cut at its edge (the card figures). Seen in the gallery's screenshots.
OVERVIEW_WIDTH, CARD_FIGURE_WIDTH = 400, 660


class FeatureGallery(ipw.VBox):
    """Browse features. Public controls: sort_by, descending, search, results (the list), feature (selected id),
    prev_button / next_button; outputs: cards (HTML), hist_fig, logits_fig, overview_fig, status (a failed card's error)."""

    def __init__(self, table: Any, card: Callable[[int], Any] | None = None, *, feature: int | None = None,
                 max_rows: int = 200):
        if card is None:  # a FeatureSummary (or anything with .table and .card)
            if not (hasattr(table, "table") and hasattr(table, "card")):
                raise TypeError(f"FeatureGallery takes a FeatureSummary, or a table and card=callable; got {type(table).__name__}")
            table, card = table.table, table.card
        if not callable(card):
            raise TypeError(f"card must be a callable feature id -> FeatureCard, got {type(card).__name__}")
        missing = [c for c in ("density", "max_act", "mean_act") if c not in getattr(table, "columns", ())]
        if missing:
            raise ValueError(f"the feature table needs columns density, max_act, mean_act (as summarize_features makes); "
                             f"missing {missing}")
        if len(table) == 0:
            raise ValueError("the feature table is empty: nothing to browse")
        max_rows = as_int("max_rows", max_rows, 1)
        self.table, self.card, self.max_rows = table, card, max_rows
        self.order: list[int] = list(table.index)  # the features that match the search, in the chosen order
        sorts = [("density", "density"), ("max activation", "max_act"), ("mean activation", "mean_act")]
        sorts += [("label F1", "f1")] if "f1" in table else []
        self.sort_by = ipw.Dropdown(options=sorts + [("feature id", "feature")], value="density", description="sort by")
        self.descending = ipw.Checkbox(value=True, description="descending", indent=False)
        searchable = [c for c in SEARCHED if c in table]
        # A short placeholder: the box is a third of the page, and a long one was cut mid-word.
        self.search = ipw.Text(placeholder="label, token or #id" if searchable else "#id", description="search",
                               continuous_update=True, layout=ipw.Layout(width="100%", min_width="0"))
        self.results = ipw.Select(options=[], rows=18, layout=ipw.Layout(width="100%", min_width="0"))
        self.count = ipw.HTML()
        self.feature = ipw.BoundedIntText(value=int(table.index[0]), min=int(table.index.min()), max=int(table.index.max()),
                                          description="feature")
        self.prev_button = ipw.Button(description="◀", layout=ipw.Layout(width="3em"), tooltip="previous in the list")
        self.next_button = ipw.Button(description="▶", layout=ipw.Layout(width="3em"), tooltip="next in the list")
        self.cards = ipw.HTML(layout=ipw.Layout(width="100%", min_width="0"))  # contexts wrap inside the column
        self.status = ipw.HTML()
        self._hist = FigureSlot(activation_histogram_spec([], [0.0]))
        self._logits = FigureSlot(output_tokens_spec([], [], [], []))
        self._overview = FigureSlot(feature_overview(table["density"], table["max_act"], table.index).update_layout(width=OVERVIEW_WIDTH))
        if self._overview.live:
            self._overview.figure.data[0].on_click(self._clicked)
        self._syncing = False

        for w in (self.sort_by, self.descending, self.search):
            w.observe(lambda _: self.refilter(), names="value")
        self.results.observe(self._picked, names="value")
        self.feature.observe(lambda ch: self.show(ch["new"]), names="value")
        self.prev_button.on_click(lambda _: self.step(-1))
        self.next_button.on_click(lambda _: self.step(+1))

        # The left column's controls take its width (min_width 0 lets them shrink below their natural size) and the
        # column clips: a list wider than it ran under the cards, its right border and its entries hidden.
        left = ipw.VBox([ipw.HBox([self.sort_by, self.descending], layout=ipw.Layout(width="100%", min_width="0")), self.search,
                         self.count, self.results, self._overview.view],
                        layout=ipw.Layout(width="38%", min_width="0", overflow="hidden"))
        # The two card figures are stacked, not side by side: two autosized plotly figures (700px each by
        # default) in a row overflow the right column and put the output tokens off-screen at 1280px.
        right = ipw.VBox([ipw.HBox([self.feature, self.prev_button, self.next_button]), self.status, self.cards,
                          self._hist.view, self._logits.view], layout=ipw.Layout(width="62%", overflow="hidden"))
        super().__init__([ipw.HBox([left, right])])
        self.refilter()
        self.show(int(self.order[0]) if feature is None and self.order else int(feature if feature is not None else table.index[0]))

    @property
    def hist_fig(self) -> go.Figure:
        return self._hist.figure

    @property
    def logits_fig(self) -> go.Figure:
        return self._logits.figure

    @property
    def overview_fig(self) -> go.Figure:
        return self._overview.figure

    def refilter(self) -> None:
        """Apply search and sort to the list; the selection stays if it still matches, else moves to the first match."""
        t, term = self.table, self.search.value.strip()
        if term:
            hit = np.zeros(len(t), dtype=bool)
            for col in SEARCHED:
                if col in t:
                    hit |= t[col].astype(str).str.contains(term, case=False, regex=False, na=False).to_numpy()
            if term.lstrip("#").isdigit():
                hit |= (t.index == int(term.lstrip("#")))
            t = t[hit]
        key = self.sort_by.value
        t = t.sort_index(ascending=not self.descending.value) if key == "feature" else \
            t.sort_values(key, ascending=not self.descending.value, kind="stable", na_position="last")
        self.order = [int(i) for i in t.index]
        shown = t.iloc[: self.max_rows]
        options = [(self._row_label(int(f), r), int(f)) for f, r in shown.iterrows()]
        self.count.value = f"<small>{len(self.order)} of {len(self.table)} features match; showing {len(options)}</small>"
        self._syncing = True
        try:
            self.results.options = options
            self.results.value = self.feature.value if self.feature.value in self.order[: self.max_rows] else None
        finally:
            self._syncing = False
        if term and self.order and self.feature.value not in self.order:
            self.feature.value = self.order[0]

    def show(self, f: int) -> None:
        """Draw feature f's card (also what setting `feature.value` does)."""
        f = int(f)
        if self.feature.value != f:
            self.feature.value = f  # comes back here through the observer
            return
        with reported(self.status):  # build everything first: a failed card leaves the last one on show
            card = self.card(f)
            cards = card_html(card)
            # figure dicts, not go.Figures: the slots set only what changed (see widgets/figure.py), ~10x faster
            hist = activation_histogram_spec(card.hist_counts, card.hist_edges, card.density,
                                             f"feature {f}: activations when firing")
            logits = output_tokens_spec(card.pos_tokens, card.pos_values, card.neg_tokens, card.neg_values)
        self.status.value = ""
        self.cards.value = cards
        for spec in (hist, logits):
            spec["layout"]["width"] = CARD_FIGURE_WIDTH
        self._hist.update(hist)
        self._logits.update(logits)
        ov = self._overview.figure
        sel = np.flatnonzero(np.asarray(ov.data[0].customdata) == f)
        with ov.batch_update():
            ov.data[1].x, ov.data[1].y = np.asarray(ov.data[0].x)[sel], np.asarray(ov.data[0].y)[sel]
        self._overview.refresh()
        if f in self.order[: self.max_rows] and self.results.value != f:
            self._syncing = True
            try:
                self.results.value = f
            finally:
                self._syncing = False

    def step(self, delta: int) -> None:
        """Select the previous (-1) or next (+1) feature of the sorted, filtered list."""
        if not self.order:
            return
        i = self.order.index(self.feature.value) + delta if self.feature.value in self.order else 0
        self.feature.value = self.order[min(max(i, 0), len(self.order) - 1)]

    def _picked(self, change: dict) -> None:
        if not self._syncing and change["new"] is not None:
            self.feature.value = change["new"]

    def _clicked(self, trace, points, state) -> None:
        if points.point_inds:
            self.feature.value = int(trace.customdata[points.point_inds[0]])

    def _row_label(self, f: int, r: Any) -> str:
        what = r.get("best_label") if isinstance(r.get("best_label"), str) else None
        what = what or r.get("top_logits") or r.get("top_tokens") or ""
        return f"#{f:<6} d {r['density']:.1e}  max {r['max_act']:<7.3g} {what}"[:90]
