"""InversionView panel: pick a query, a site, a position, a temperature and epsilon; see the sampled preimage.

The panel never sees a model. It calls

    tokenize(query: str) -> list[str]                                     the query's tokens (BOS first)
    sample(query: str, site: str, position: int, temperature: float)      the decoder's candidates, returning an
        object (NamedTuple, dataclass or dict) with tokens: list[list[str]], distance: [N], position: [N]
        (matched position per sample) and colour: list of [len] (log p(tok | z) - log p(tok | z_BOS))

`nbfeatures.inversion.panel_callables(decoder, model, vocab)` builds both from a decoder and a model.
Epsilon only redraws; every other control samples again.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import ipywidgets as ipw
import numpy as np

from ..plots._checks import as_float, as_int
from ..plots.inversion import inversion_samples, query_html, shared_html, shared_tokens
from .figure import FigureSlot, reported


def _field(result: Any, name: str) -> Any:
    value = result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)
    if value is None:
        raise ValueError(f"the sample callable returned a {type(result).__name__} without {name!r}; "
                         "it needs tokens, distance, position, colour")  # fmt: skip
    return value


def _floats(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1)


class InversionPanel(ipw.VBox):
    """Controls: query, site, position, temperature, epsilon, sample_button. Outputs: query_view, fig, summary, status."""

    def __init__(self, sample: Callable[[str, str, int, float], Any], tokenize: Callable[[str], list[str]], sites: Sequence[str],
                 *, query: str = "", site: str | None = None, position: int | None = None, temperature: float = 1.0,
                 epsilon: float = 0.1, max_rows: int = 40):  # fmt: skip
        if not sites:
            raise ValueError("sites must list at least one site")
        if not callable(sample) or not callable(tokenize):
            raise TypeError("sample and tokenize must be callables (see the module docstring)")
        if site is not None and site not in sites:
            raise ValueError(f"site {site!r} is not among the sites {list(sites)}")
        if not 0.25 <= as_float("temperature", temperature) <= 4.0 or not 0 <= as_float("epsilon", epsilon) <= 1:
            raise ValueError(f"temperature must lie in [0.25, 4] and epsilon in [0, 1] (the sliders' ranges), "
                             f"got {temperature}, {epsilon}")
        max_rows = as_int("max_rows", max_rows, 1)
        if position is not None:
            as_int("position", position, 0)
        self.sample_fn, self.tokenize, self.max_rows = sample, tokenize, max_rows
        self.query = ipw.Text(value=query, description="query", continuous_update=False, layout=ipw.Layout(width="60%"))
        self.site = ipw.Dropdown(options=list(sites), value=site or sites[0], description="site")
        self.position = ipw.IntSlider(value=0, min=0, max=0, description="position", continuous_update=False)  # one call per release
        self.temperature = ipw.FloatSlider(value=temperature, min=0.25, max=4.0, step=0.25, description="temperature",
                                           continuous_update=False, style={"description_width": "initial"})  # fmt: skip
        self.epsilon = ipw.FloatSlider(value=epsilon, min=0.0, max=1.0, step=0.01, description="epsilon", readout_format=".2f")
        self.sample_button = ipw.Button(description="Sample", button_style="primary", icon="play")
        self.query_view, self.summary, self.status = ipw.HTML(), ipw.HTML(), ipw.HTML()
        self._fig = FigureSlot(inversion_samples([], [], [], [], epsilon))
        self.result: Any = None  # the last result, as the callable returned it
        self._quiet = False  # set while the panel moves its own controls
        self._set_query(position)
        self.query.observe(lambda _: self._query_changed(), names="value")
        for w in (self.site, self.position, self.temperature):
            w.observe(lambda _: None if self._quiet else self.run(), names="value")
        self.epsilon.observe(lambda _: self.redraw(), names="value")
        self.sample_button.on_click(lambda _: self.run())
        super().__init__([
            ipw.HBox([self.query, self.site]), ipw.HBox([self.position, self.temperature, self.epsilon]),
            ipw.HBox([self.sample_button, self.status]), self.query_view, self.summary, self._fig.view,
        ])  # fmt: skip

    @property
    def fig(self):
        return self._fig.figure

    def _query_changed(self) -> None:
        with reported(self.status):
            self._set_query(None)
        self.run()

    def redraw(self) -> None:
        """Draw the last result again (what moving epsilon does)."""
        with reported(self.status):
            self._draw()

    def _set_query(self, position: int | None) -> None:
        tokens = self.tokenize(self.query.value)
        if isinstance(tokens, str) or not hasattr(tokens, "__len__"):
            raise ValueError(f"tokenize must return the query's tokens as a list of strings, got {type(tokens).__name__}")
        if not len(tokens):
            raise ValueError(f"tokenize returned no tokens for the query {self.query.value!r}; it needs at least one (BOS first)")
        self.tokens = [str(t) for t in tokens]
        last = len(self.tokens) - 1
        pos = last if position is None else position
        if not 0 <= pos <= last:
            raise ValueError(f"position {pos} is outside the query of {len(self.tokens)} tokens; allowed 0..{last}")
        self._quiet = True
        try:
            self.position.max = last
            self.position.value = pos
        finally:
            self._quiet = False
        self.query_view.value = query_html(self.tokens, pos)

    def run(self) -> None:
        """Sample for the current query, site, position and temperature, and draw."""
        self.status.value = "<i>sampling…</i>"
        with reported(self.status):
            self.query_view.value = query_html(self.tokens, self.position.value)
            result = self.sample_fn(self.query.value, self.site.value, int(self.position.value), float(self.temperature.value))
            self._draw(result)
            self.result = result  # only a result that could be drawn replaces the last one

    def _draw(self, result: Any = None) -> None:
        result = self.result if result is None else result
        if result is None:
            return
        tokens = [list(t) for t in _field(result, "tokens")]
        dist = _floats(_field(result, "distance"))
        pos = [int(p) for p in _floats(_field(result, "position"))]
        colour = [_floats(c) for c in _field(result, "colour")]
        if not len(tokens) == len(dist) == len(pos) == len(colour):
            raise ValueError(f"the sample callable returned {len(tokens)} token rows, {len(dist)} distances, {len(pos)} "
                             f"positions and {len(colour)} colour rows; it needs one of each per sample")
        order = np.argsort(dist, kind="stable")[: self.max_rows]
        eps = float(self.epsilon.value)
        inside = dist <= eps
        shown = [int(i) for i in order]
        self._fig.update(inversion_samples([tokens[i] for i in shown], dist[shown].tolist(), [colour[i] for i in shown],
                                           [pos[i] for i in shown], eps))  # fmt: skip
        self.summary.value = shared_html(shared_tokens(tokens, pos, inside.tolist()), int(inside.sum()))
        self.status.value = f"{int(inside.sum())} of {len(dist)} samples inside ε = {eps:g} (showing the closest {len(shown)})"
