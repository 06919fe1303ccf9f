"""Prompt view: type a prompt, see which features fire on each token, open a feature's gallery card.

    fn = prompt_features_fn(model, site, sae, k=8)          # nbfeatures.prompt_features: the panel never sees the model
    PromptView(fn, card=summary, prompt="Once upon a time")  # summary: a FeatureSummary (or card=callable f -> FeatureCard)

The panel calls `features_fn(prompt)`, which must return an object (NamedTuple, dataclass or dict) with

    tokens: list[str]       the prompt as the model tokenised it
    ids: [T, K] ints        each token's features, strongest first; -1 where fewer than K fire
    values: [T, K]          their values
    features: [M] ints      the features kept over the prompt          acts: [T, M] their values on every token

Any dictionary fits: SAE latents, codebook codes, binary-autoencoder bits.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as ipw
import numpy as np

from ..plots import card_html, is_special
from ..plots._checks import as_int
from ..plots.prompt import prompt_tokens_html, token_features_table
from .figure import reported

FIELDS = ("tokens", "ids", "values", "features", "acts")


def _field(result: Any, name: str) -> Any:
    if isinstance(result, Mapping):
        if name not in result:
            raise ValueError(f"features_fn returned a mapping without {name!r}; it needs {', '.join(FIELDS)}")
        return result[name]
    if not hasattr(result, name):
        raise ValueError(f"features_fn returned a {type(result).__name__} without .{name}; it needs {', '.join(FIELDS)}")
    return getattr(result, name)


class _Result:
    """features_fn's result, checked, as numpy arrays."""

    def __init__(self, result: Any):
        self.raw = result
        self.tokens = [str(t) for t in _field(result, "tokens")]
        T = len(self.tokens)
        if T == 0:
            raise ValueError("features_fn returned no tokens")
        self.ids = np.asarray(_field(result, "ids"), dtype=np.int64)
        self.values = np.asarray(_field(result, "values"), dtype=np.float64)
        self.features = np.asarray(_field(result, "features"), dtype=np.int64).reshape(-1)
        self.acts = np.asarray(_field(result, "acts"), dtype=np.float64)
        if self.ids.ndim != 2 or self.ids.shape[0] != T or self.values.shape != self.ids.shape:
            raise ValueError(f"features_fn must return ids and values [T={T}, K], one row per token; got "
                             f"{list(self.ids.shape)} and {list(self.values.shape)}")
        if self.acts.shape != (T, len(self.features)):
            raise ValueError(f"features_fn must return acts [T={T}, M={len(self.features)}] (every kept feature on every "
                             f"token); got {list(self.acts.shape)}")
        self.column = {int(f): i for i, f in enumerate(self.features)}


class PromptView(ipw.VBox):
    """Which features fire on each token of a typed prompt.

    Public controls: prompt (Textarea), compute_button (runs features_fn), token (the selected position),
    feature (a Select: the selected token's features, ranked; picking one opens its card).
    Outputs: tokens_html (the prompt shaded by each token's strongest feature, hover for its features; the
    selected feature's activations below), table (the token's features ranked), card_html (the feature's
    gallery card), status. `result` holds the last features_fn result.
    """

    def __init__(self, features_fn: Callable[[str], Any], card: Any = None,
                 names: Mapping[int, str] | Sequence[str] | None = None, *, prompt: str = "", compute: bool = True):
        if not callable(features_fn):
            raise TypeError(f"features_fn must be a callable prompt -> features (e.g. prompt_features_fn(model, site, "
                            f"dictionary)), got {type(features_fn).__name__}")
        table = None
        if card is not None and not callable(card):  # a FeatureSummary (anything with .card and .table)
            if not callable(getattr(card, "card", None)):
                raise TypeError(f"card must be None, a callable feature id -> FeatureCard, or a FeatureSummary; "
                                f"got {type(card).__name__}")
            table, card = getattr(card, "table", None), card.card
        if names is not None and not isinstance(names, (Mapping, Sequence)) or isinstance(names, str):
            raise TypeError(f"names must be a mapping feature id -> name or a list of names, got {type(names).__name__}")
        self.features_fn, self.card = features_fn, card
        self.names: dict[int, str] = (dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
                                      if names is not None else _names_of(table))
        self.result: _Result | None = None
        self.prompt = ipw.Textarea(value=prompt, description="prompt", placeholder="type a prompt, then Run",
                                   layout=ipw.Layout(width="100%"))
        self.compute_button = ipw.Button(description="Run", button_style="primary", icon="play",
                                         tooltip="read the features that fire on each token of the prompt")
        self.token = ipw.BoundedIntText(value=0, min=0, max=0, description="token")
        self.feature = ipw.Select(options=[], rows=8, description="feature", layout=ipw.Layout(width="100%", min_width="0"))
        self.tokens_html = ipw.HTML()
        self.table = ipw.HTML()
        self.card_html = ipw.HTML(value=self._no_card())
        self.status = ipw.HTML()
        self._syncing = False
        self._card_of: int | None = None  # the feature whose card is on show

        self.compute_button.on_click(lambda _: self.compute())
        self.prompt.observe(lambda _: self._stale(), names="value")
        self.token.observe(lambda ch: self._syncing or self.show_token(ch["new"]), names="value")
        self.feature.observe(lambda ch: self._syncing or ch["new"] is None or self.show_feature(ch["new"]), names="value")
        # The column clips and its controls take its width (min_width 0 lets them shrink): the Select ran under the card.
        left = ipw.VBox([self.token, self.feature, self.table], layout=ipw.Layout(width="38%", min_width="0", overflow="hidden"))
        right = ipw.VBox([self.card_html], layout=ipw.Layout(width="62%", overflow="hidden"))
        super().__init__([self.prompt, ipw.HBox([self.compute_button, self.status]), self.tokens_html, ipw.HBox([left, right])])
        if compute and prompt.strip():
            self.compute()

    def compute(self) -> None:
        """Run features_fn on the prompt and draw it; the strongest token (and its strongest feature) is selected."""
        self.status.value = "<i>reading features…</i>"
        t0 = time.perf_counter()
        with reported(self.status):  # a failed call leaves the last prompt on show
            result = _Result(self.features_fn(self.prompt.value))
        self.result = result
        top = np.where(result.ids[:, 0] >= 0, np.abs(result.values[:, 0]), -1.0) if result.ids.shape[1] else np.zeros(len(result.tokens))
        plain = [i for i, t in enumerate(result.tokens) if not is_special(t)]
        t = max(plain or range(len(result.tokens)), key=lambda i: top[i])
        self._syncing = True
        try:
            self.token.max = len(result.tokens) - 1
            self.token.value = int(t)
        finally:
            self._syncing = False
        self.show_token(int(t))
        fired = int((result.ids >= 0).any(1).sum())
        self.status.value = (f"{len(result.tokens)} tokens ({fired} with a feature firing) · {len(result.features)} features "
                             f"· {1000 * (time.perf_counter() - t0):.1f} ms")

    def show_token(self, t: int) -> None:
        """Select token t: list its features ranked and open the strongest one's card (also what setting `token` does)."""
        r = self._need_result()
        t = as_int("token", t)
        if not t < len(r.tokens):
            raise ValueError(f"token must be a position in 0..{len(r.tokens) - 1}, got {t}")
        if self.token.value != t:
            self.token.value = t  # comes back here through the observer
            return
        ids, values = r.ids[t], r.values[t]
        on = ids >= 0
        options = [(f"#{f:<6} {v:8.3g}  {self.names.get(int(f), '')}"[:80], int(f)) for f, v in zip(ids[on], values[on])]
        keep = self.feature.value if self.feature.value in ids[on] else (int(ids[0]) if on.any() else None)
        self._syncing = True
        try:
            self.feature.options = options
            self.feature.value = keep
        finally:
            self._syncing = False
        if keep is not None:
            self.show_feature(keep)
        else:
            self._draw(None)

    def show_feature(self, f: int) -> None:
        """Open feature f's card and shade the prompt by it (also what picking it in `feature` does)."""
        f = as_int("feature", f)
        self._need_result()
        if f != self._card_of:  # the card does not depend on the prompt: kept while the feature stays
            with reported(self.status):  # build first: a failed card leaves the last one on show
                self.card_html.value = card_html(self.card(f)) if self.card is not None else self._no_card()
            self._card_of = f
        listed = f in [v for _, v in self.feature.options]
        if self.feature.value != (f if listed else None):
            self._syncing = True
            try:
                self.feature.value = f if listed else None
            finally:
                self._syncing = False
        self._draw(f)

    def _draw(self, f: int | None) -> None:
        r, t = self.result, int(self.token.value)
        acts = r.acts[:, r.column[f]] if f is not None and f in r.column else None
        self.tokens_html.value = prompt_tokens_html(r.tokens, r.ids, r.values, names=self.names, token=t, feature=f,
                                                    feature_acts=acts if acts is not None else np.zeros(len(r.tokens)))
        self.table.value = token_features_table(r.ids[t], r.values[t], names=self.names, feature=f,
                                                title=f"token {t}: {r.tokens[t]!r}")

    def _need_result(self) -> _Result:
        if self.result is None:
            raise ValueError("no prompt read yet: type a prompt and press Run (or call compute())")
        return self.result

    def _stale(self) -> None:
        if self.result is not None:
            self.status.value = "<i>prompt changed: press Run</i>"

    def _no_card(self) -> str:
        return ("<div style='color:#888; font-size:12px'>no feature cards: pass card=FeatureSummary (summarize_features) "
                "or a callable feature id -> FeatureCard</div>")


def _names_of(table: Any) -> dict[int, str]:
    """A short name per feature from a gallery table: its best label, else its top output or input tokens."""
    if table is None or not hasattr(table, "columns"):
        return {}
    out: dict[int, str] = {}
    for col in ("top_tokens", "top_logits", "best_label"):  # later columns win
        if col in table.columns:
            for f, v in zip(table.index.tolist(), table[col].tolist()):
                if isinstance(v, str) and v:
                    out[int(f)] = v
    return out
