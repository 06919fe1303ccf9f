"""Live training curves: a callback for `train_sae` (or any loop) that redraws a figure in place.

    curves = LiveCurves(total=cfg.steps); display(curves)
    history = train_sae(sae, acts, cfg, callbacks=[curves])       # or curves(step, {"loss": ...}) in any loop

Redraws are throttled: at most one per `every_s` seconds, and never so often that drawing takes
more than `max_overhead` of the wall time (a slow redraw pushes the next one further out). The
first call, the call at step `total`, `finish()` and leaving a `with LiveCurves() as curves:`
block always draw, so the figure ends on the last row.

Rows of several runs in one figure: a row naming its run in the `group` field ("dictionary", as in `train_many`'s
rows) has its metrics recorded as `fvu/<name>`, ..., so each subplot (panels name the plain metric) draws a line per run.

A run in another process (`torchrun ...`, with `TrainConfig(metrics_file=...)`) is followed through its metrics file:
`curves.follow(path, until=lambda: proc.poll() is not None)` reads the new lines every `poll_s` seconds until the
process ends (`curves.poll()` reads them once). Only whole lines are read; a file replaced by a resumed run is read
again from its start.

A bad row never stops training: a call never raises. NaN / inf values are recorded (the curve shows a
gap, the status line says where it started); a value that is not a number, a row that is not a dict
and a failed redraw are skipped. Each such problem is kept in `notes`, shown in the status line and
warned about once (a RuntimeWarning), so a script without a display sees it too.
"""

from __future__ import annotations

import html
import json
import math
import os
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
                 height: int | None = None, group: str = "dictionary", clock: Callable[[], float] = time.perf_counter):
        for name, v in (("every_s", every_s), ("max_overhead", max_overhead)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"total must be None or an int >= 1 (the last step), got {total!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 0.99:
            raise ValueError(f"smoothing must lie in [0, 0.99] (the slider's range), got {smoothing!r}")
        if panels is not None and (not isinstance(panels, Mapping) or any(isinstance(m, str) for m in panels.values())):
            raise ValueError(f"panels must map a subplot title to a list of metric names, e.g. {{'loss': ['fvu']}}; got {panels!r:.80}")
        if not isinstance(group, str):
            raise ValueError(f"group must be the name of the field that names a row's run (a str), got {group!r}")
        self.panels, self.x, self.total, self.height, self.group = panels, x, total, height, group
        self._base: dict[str, str] = {}  # "fvu/a" -> "fvu": a grouped row's metric -> the metric it is
        self._tail: _Tail | None = None  # the followed metrics file
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
        name = row.get(self.group)
        if isinstance(name, str):  # one run of several: its metrics get their own lines
            row = {(k if k == self.x else f"{k}/{name}"): v for k, v in row.items() if k != self.group}
            self._base.update({k: k.rpartition("/")[0] for k in row if k != self.x})
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
        # a grouped metric's last logged value: the other runs' calls leave NaN after it
        last = {k: next((x for x in reversed(v) if x == x), math.nan) if k in self._base else v[-1] for k, v in self.history.items() if v}
        last = {k: x for k, x in last.items() if x == x}
        shown = ", ".join(f"{k} {last[k]:.4g}" for m in ("loss", "fvu", "l0", "dead_fraction", "ce_recovered")
                          for k in last if self._base.get(k, k) == m)  # fmt: skip
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
        panels = self.panels
        if panels is None:
            panels = default_panels(list(dict.fromkeys(self._base.get(k, k) for k in self.history)))
        # metrics not logged yet (an occasional eval) get their subplot once they appear; a grouped metric has a line
        # per run
        panels = {t: [k for m in ms for k in self.history if k == m or self._base.get(k) == m] for t, ms in panels.items()}
        return {t: ms for t, ms in panels.items() if ms}

    def follow(self, path: str | os.PathLike, until: Callable[[], bool] | None = None, poll_s: float = 0.5,
               timeout_s: float | None = None) -> "LiveCurves":  # fmt: skip
        """Draw the rows of a metrics file (JSON lines) as they arrive: read what is there, then with `until`, keep
        reading every `poll_s` seconds until `until()` is true (e.g. the training process has ended) or `timeout_s`
        passes, read the last lines and draw."""
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"follow: path must be the metrics file's path (str or Path), got {path!r}")
        if isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or not 0 < poll_s < math.inf:
            raise ValueError(f"follow: poll_s must be a finite number of seconds > 0, got {poll_s!r}")
        if until is not None and not callable(until):
            raise ValueError(f"follow: until must be a function () -> bool (e.g. lambda: proc.poll() is not None), got {until!r:.40}")
        if self._tail is None or self._tail.path != os.fspath(path):
            self._tail = _Tail(os.fspath(path))
        self.poll()
        t0 = time.monotonic()
        while until is not None and not until() and (timeout_s is None or time.monotonic() - t0 < timeout_s):
            time.sleep(poll_s)
            self.poll()
        self.poll()
        return self.finish()

    def poll(self) -> int:
        """Record the whole lines added to the followed file since the last poll; returns how many rows came."""
        if self._tail is None:
            raise ValueError("poll: no metrics file is followed; call follow(path) first")
        rows, restarted = self._tail.read()
        if restarted:  # a resumed run rewrote the file: start over from its rows
            self.history, self._base, self.n_calls, self._shape = {}, {}, 0, None
        for line in self._tail.bad:
            self._note("line", f"{self._tail.path}: skipped a line that is not a JSON object: {line[:40]!r}")
        self._tail.bad.clear()
        for row in rows:
            self(row)
        return len(rows)

    def figure(self) -> go.Figure:
        """A static go.Figure of the history, which a notebook saves in its outputs."""
        return training_curves(self.history, self._panels(), smoothing=self.smoothing.value, log_y=self.log_y.value,
                               x=self.x, height=self.height)

    def __enter__(self) -> "LiveCurves":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class _Tail:
    """The new whole lines of a growing file of JSON lines; a file replaced (new inode) or cut shorter restarts it."""

    def __init__(self, path: str):
        self.path, self.offset, self.partial, self.inode = path, 0, b"", None
        self.bad: list[bytes] = []

    def read(self) -> tuple[list[dict], bool]:
        """(the rows of the lines completed since the last read, whether the file started over)."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                restarted = self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset)
                if restarted or self.inode is None:
                    self.offset, self.partial, self.inode = 0, b"", st.st_ino
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # not written yet
            return [], False
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        rows = []
        for line in lines:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                row = False
            if isinstance(row, dict):
                rows.append(row)
            elif row is not None:
                self.bad.append(line)
        return rows, restarted


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
