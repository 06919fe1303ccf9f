"""Live training curves: a callback for `train_sae` (or any loop) that redraws a figure in place.

    curves = LiveCurves(total=cfg.steps); display(curves)
    history = train_sae(sae, acts, cfg, callbacks=[curves])       # or curves(step, {"loss": ...}) in any loop

Redraws are throttled: at most one per `every_s` seconds, and never so often that drawing takes
more than `max_overhead` of the wall time (a slow redraw pushes the next one further out). The
first call, the call at step `total`, `finish()` and leaving a `with LiveCurves() as curves:`
block always draw, so the figure ends on the last row.

A bad row never stops training: a call never raises. NaN / inf values are recorded (the curve shows a
gap, the status line says where it started); a value that is not a number, a row that is not a dict
and a failed redraw are skipped. Each such problem is kept in `notes`, shown in the status line and
warned about once (a RuntimeWarning), so a script without a display sees it too.
"""

from __future__ import annotations

import html
import math
import time
import warnings
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
        for name, v in (("every_s", every_s), ("max_overhead", max_overhead)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"total must be None or an int >= 1 (the last step), got {total!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 0.99:
            raise ValueError(f"smoothing must lie in [0, 0.99] (the slider's range), got {smoothing!r}")
        if panels is not None and (not isinstance(panels, Mapping) or any(isinstance(m, str) for m in panels.values())):
            raise ValueError(f"panels must map a subplot title to a list of metric names, e.g. {{'loss': ['fvu']}}; got {panels!r:.80}")
        self.panels, self.x, self.total, self.height = panels, x, total, height
        self.every_s, self.max_overhead, self._clock = every_s, max_overhead, clock
        self.history: dict[str, list[float]] = {}  # metric -> one value per call (NaN where a call lacked it)
        self.n_calls = self.n_draws = 0
        self.notes: list[str] = []  # what was skipped or odd (bad values, failed redraws), oldest first
        self._warned: set[str] = set()
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
        # the full width of the output area: the figure autosizes to it (training_curves sets no width)
        super().__init__([ipw.HBox([self.smoothing, self.log_y, self.status]), self.slot.view], layout=ipw.Layout(width="100%"))

    @property
    def fig(self) -> go.Figure:
        """The figure shown: a go.FigureWidget, or a go.Figure where FigureWidget is unavailable."""
        return self.slot.figure

    def __call__(self, step: int | Mapping[str, Any], row: Mapping[str, Any] | None = None) -> None:
        """Record one row: `curves(step, row)` as train_sae calls it, or `curves(row)` with the step inside (or implied).

        Never raises into the training loop: a problem with the row is noted (see the module docstring).
        """
        if row is None:
            if not isinstance(step, Mapping):
                self._note("call", f"call LiveCurves as curves(step, row) or curves(row) with a dict of metrics; "
                                   f"got {type(step).__name__} {step!r:.40}: skipped")
                return
            row, step = step, step.get(self.x, self.n_calls + 1)
        if not isinstance(row, Mapping):
            self._note("row", f"row must be a dict of metrics, got {type(row).__name__} {row!r:.40}: skipped")
            return
        step_value = _number(step)
        if step_value is None or not math.isfinite(step_value):
            self._note(f"{self.x}", f"{self.x} must be a finite number, got {step!r:.40}: used the row number {self.n_calls + 1}")
            step_value = float(self.n_calls + 1)
        row = {**row, self.x: step_value}
        for key, value in row.items():
            if isinstance(value, bool):  # flags (e.g. entropy_on) are not curves
                continue
            v = _number(value)
            if v is None:
                self._note(f"value:{key}", f"{key!r} must be a number (or a one-element tensor), got "
                                           f"{type(value).__name__} {value!r:.40}: not plotted")
                continue
            if not math.isfinite(v):
                self._note(f"nonfinite:{key}", f"{key} is {v} at {self.x} {step_value:g}: recorded, drawn as a gap")
            if key not in self.history:
                self.history[key] = [math.nan] * self.n_calls
            self.history[key].append(v)
        self.n_calls += 1
        for values in self.history.values():
            if len(values) < self.n_calls:
                values.append(math.nan)
        now = self._clock()
        last = self._last_draw
        gap = max(self.every_s, self._last_cost / self.max_overhead) if self.max_overhead > 0 else self.every_s
        if last is None or now - last >= gap or (self.total is not None and step_value >= self.total):
            self._safe_redraw()

    def _note(self, kind: str, message: str) -> None:
        """Keep a problem in `notes`, show it in the status line, and warn once per kind."""
        self.notes.append(message)
        del self.notes[:-100]  # a problem repeated every step must not grow without bound
        self.status.value = f"<span style='color:#d62728'>{html.escape(message)}</span>"
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"LiveCurves: {message}", RuntimeWarning, stacklevel=3)

    def _safe_redraw(self) -> None:
        try:
            self.redraw()
        except Exception as e:  # a figure problem must not stop training; the history is kept and drawn later
            self._note("redraw", f"redraw failed ({type(e).__name__}: {e}); the history is kept")

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
        if self.notes:
            self.status.value += f" · <span style='color:#d62728'>{len(self.notes)} note(s), last: {html.escape(self.notes[-1])}</span>"
        self.n_draws += 1
        self._last_draw = self._clock()
        if fast:  # a rebuild (new metrics, toggles) is rare: let in-place redraws set the pace
            self._last_cost = self._last_draw - t0
        self.draw_s += self._last_draw - t0

    def finish(self) -> "LiveCurves":
        """Draw the last rows (a throttled call may have skipped them)."""
        self._safe_redraw()
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


def _number(value: Any) -> float | None:
    """A float from a number, a numpy scalar or a one-element tensor / array; None for anything else."""
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item"):
        try:
            v = value.item()
        except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
            return None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return None
