"""Live training curves: a callback for `train_sae` (or any loop) that redraws a figure in place.

    curves = LiveCurves(total=cfg.steps); display(curves)
    history = train_sae(sae, acts, cfg, callbacks=[curves])       # or curves(step, {"loss": ...}) in any loop

Redraws are throttled: at most one per `every_s` seconds, and never so often that drawing takes
more than `max_overhead` of the wall time (a slow redraw pushes the next one further out). The
first call, the call at step `total`, `finish()` and leaving a `with LiveCurves() as curves:`
block always draw, so the figure ends on the last row.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as ipw
import plotly.graph_objects as go

from ..plots import curves, curves_title, default_panels, training_curves
from .figure import FigureSlot, json_safe


class LiveCurves(ipw.VBox):
    """Training curves that follow a loop; `smoothing` (EMA slider) and `log_y` (toggle) are public controls."""

    def __init__(self, panels: Mapping[str, Sequence[str]] | None = None, *, x: str = "step", total: int | None = None,
                 every_s: float = 1.0, max_overhead: float = 0.02, smoothing: float = 0.0, log_y: bool = False,
                 height: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.panels, self.x, self.total, self.height = panels, x, total, height
        self.every_s, self.max_overhead, self._clock = every_s, max_overhead, clock
        self.history: dict[str, list[float]] = {}  # metric -> one value per call (NaN where a call lacked it)
        self.n_calls = self.n_draws = 0
        self.draw_s = 0.0  # total time spent redrawing
        self._last_draw: float | None = None
        self._last_cost = 0.0
        self.smoothing = ipw.FloatSlider(value=smoothing, min=0.0, max=0.99, step=0.01, description="smoothing",
                                         readout_format=".2f", continuous_update=True)
        self.log_y = ipw.ToggleButton(value=log_y, description="log y", icon="chart-line")
        self.status = ipw.HTML("waiting for the first step")
        self._shape: tuple | None = None
        self.slot = FigureSlot(training_curves({}))
        self.smoothing.observe(lambda _: self.redraw(), names="value")
        self.log_y.observe(lambda _: self.redraw(), names="value")
        super().__init__([ipw.HBox([self.smoothing, self.log_y, self.status]), self.slot.view])

    @property
    def fig(self) -> go.Figure:
        """The figure shown: a go.FigureWidget, or a go.Figure where FigureWidget is unavailable."""
        return self.slot.figure

    def __call__(self, step: int | Mapping[str, Any], row: Mapping[str, Any] | None = None) -> None:
        """Record one row: `curves(step, row)` as train_sae calls it, or `curves(row)` with the step inside (or implied)."""
        if row is None:
            if not isinstance(step, Mapping):
                raise ValueError(f"call LiveCurves as curves(step, row) or curves(row) with a dict of metrics; got {type(step).__name__}")
            row, step = step, step.get(self.x, self.n_calls + 1)
        row = {**row, self.x: step}
        for key, value in row.items():
            numeric = isinstance(value, (int, float)) or hasattr(value, "item")  # numbers, numpy scalars, 0-d tensors
            if numeric and not isinstance(value, bool):
                if key not in self.history:
                    self.history[key] = [math.nan] * self.n_calls
                self.history[key].append(float(value))
        self.n_calls += 1
        for values in self.history.values():
            if len(values) < self.n_calls:
                values.append(math.nan)
        now = self._clock()
        last = self._last_draw
        gap = max(self.every_s, self._last_cost / self.max_overhead) if self.max_overhead > 0 else self.every_s
        if last is None or now - last >= gap or (self.total is not None and step >= self.total):
            self.redraw()

    def redraw(self) -> None:
        """Draw the history now: new arrays into the existing traces, or a new figure when the metrics changed."""
        t0 = self._clock()
        panels, smoothing, log_y = self._panels(), self.smoothing.value, self.log_y.value
        shape = (tuple((t, tuple(ms)) for t, ms in panels.items()), log_y, smoothing > 0)
        fast = shape == self._shape
        if fast:
            fig = self.slot.figure
            with fig.batch_update():
                for j, c in enumerate(curves(self.history, panels, smoothing, self.x)):
                    # plain lists with None for the gaps (see json_safe)
                    fig.data[2 * j].x, fig.data[2 * j].y = json_safe(list(map(float, c.x))), json_safe(list(map(float, c.raw)))
                    fig.data[2 * j + 1].x, fig.data[2 * j + 1].y = json_safe(list(map(float, c.x))), json_safe(list(map(float, c.smooth)))
                fig.layout.title.text = curves_title(self.history, smoothing, self.x)
            self.slot.refresh()
        else:
            self.slot.update(training_curves(self.history, panels, smoothing=smoothing, log_y=log_y, x=self.x, height=self.height))
            self._shape = shape
        last = {k: v[-1] for k, v in self.history.items() if v and v[-1] == v[-1]}
        shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "fvu", "l0", "dead_fraction", "ce_recovered") if k in last)
        self.status.value = f"{self.x} {self.history[self.x][-1]:g} · {shown}" if self.n_calls else "waiting for the first step"
        self.n_draws += 1
        self._last_draw = self._clock()
        if fast:  # a rebuild (new metrics, toggles) is rare: let in-place redraws set the pace
            self._last_cost = self._last_draw - t0
        self.draw_s += self._last_draw - t0

    def finish(self) -> "LiveCurves":
        """Draw the last rows (a throttled call may have skipped them)."""
        self.redraw()
        return self

    def _panels(self) -> dict[str, list[str]]:
        if self.panels is None:
            return default_panels(list(self.history))
        # metrics not logged yet (an occasional eval) get their subplot once they appear
        panels = {t: [m for m in ms if m in self.history] for t, ms in self.panels.items()}
        return {t: ms for t, ms in panels.items() if ms}

    def figure(self) -> go.Figure:
        """A static go.Figure of the history, which a notebook saves in its outputs."""
        return training_curves(self.history, self._panels(), smoothing=self.smoothing.value, log_y=self.log_y.value,
                               x=self.x, height=self.height)

    def __enter__(self) -> "LiveCurves":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
