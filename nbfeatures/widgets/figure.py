"""A figure inside a panel: a go.FigureWidget where one can be built, a static go.Figure where it cannot.

plotly >= 6 builds FigureWidget on anywidget and raises ImportError at construction (not import)
when anywidget is missing, so we probe by constructing one. Without it a panel still works: its
figures are plain go.Figure objects, updated in place and re-shown in an ipywidgets.Output.

A panel redraws by handing its slot a new figure, as a go.Figure or as plotly's figure dict (what
`fig.to_dict()` gives, and the `plots.*_spec` functions build). The slot sets only what differs: same traces,
new data is a restyle of the changed properties; an unchanged layout key (the template above all, whose
validation is most of a go.Figure's cost) is left alone.
"""

from __future__ import annotations

import html
import json
import math
from contextlib import contextmanager
from copy import deepcopy
from typing import Any, Iterator

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.basedatatypes import BaseFigure

USE_FIGURE_WIDGET: bool | None = None  # None: probe once; True / False: force it (tests, or a front end without anywidget)
_probed: bool | None = None


def figure_widgets_available() -> bool:
    """Whether go.FigureWidget can be constructed here (honours USE_FIGURE_WIDGET when set)."""
    global _probed
    if USE_FIGURE_WIDGET is not None:
        return USE_FIGURE_WIDGET
    if _probed is None:
        try:
            go.FigureWidget()
            _probed = True
        except ImportError:
            _probed = False
    return _probed


def json_safe(value):
    """Plain lists with None for NaN / inf: what a FigureWidget can send to the page.

    Not numpy arrays: when the page echoes an update back, plotly compares values with `==`, and an
    array there raises "truth value of an array is ambiguous". Not NaN: the widget message is JSON,
    and a NaN in it is refused ("Out of range float values are not JSON compliant"). Both seen in the browser.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def error_html(e: BaseException) -> str:
    """An exception as a panel's status line: its type and message, in red."""
    return f"<span style='color:#d62728'>{type(e).__name__}: {html.escape(str(e))}</span>"


@contextmanager
def reported(status: ipw.HTML) -> Iterator[None]:
    """Run a panel's callback: if it raises, show the message in `status` and re-raise (a panel never swallows an error).

    From a front end, ipywidgets logs the re-raised exception; the status line is what the user sees. The panel
    stays usable: state is only replaced once a callback has returned.
    """
    try:
        yield
    except Exception as e:
        status.value = error_html(e)
        raise


def sync_widget_state(fig: go.Figure) -> None:
    """Make a FigureWidget's synced snapshot match its figure.

    plotly 7 refreshes the state a new view starts from (`_widget_data` / `_widget_layout`) only when the
    figure itself is displayed; a FigureWidget inside a VBox is not, so a view created after an update
    (the cell's output, a re-render) started from the construction-time figure: empty axes, dead controls.
    """
    if hasattr(fig, "_widget_data") and hasattr(fig, "_layout_obj"):  # a FigureWidget (the class may be absent)
        # Copy only what changed since the last snapshot (deep-copying a template or a 4096-point overview on every
        # click cost more than the rest of the update); an unchanged snapshot is then not sent to the page again.
        old_data = list(fig._widget_data or ())
        fig._widget_layout = _snapshot(fig._layout_obj._props, fig._widget_layout)
        fig._widget_data = [_snapshot(t, old_data[i] if i < len(old_data) else None) for i, t in enumerate(fig._data)]


def _snapshot(props: dict, old: dict | None) -> dict:
    """A copy of `props` that shares each top-level value with `old` where they are equal."""
    old = old if isinstance(old, dict) else {}
    return {k: old[k] if k in old and _same(old[k], v) else deepcopy(v) for k, v in props.items()}


def figure_parts(fig: go.Figure | dict) -> tuple[list[dict], dict]:
    """A figure's traces and layout as plain, JSON-safe dicts (plotly's nested form), from a go.Figure or a figure dict."""
    if isinstance(fig, BaseFigure):
        data, layout = [t.to_plotly_json() for t in fig.data], fig.layout.to_plotly_json()
    elif isinstance(fig, dict) and set(fig) <= {"data", "layout", "frames"}:
        data = [t.to_plotly_json() if hasattr(t, "to_plotly_json") else dict(t) for t in fig.get("data") or ()]
        layout = fig.get("layout") or {}
        layout = layout.to_plotly_json() if hasattr(layout, "to_plotly_json") else dict(layout)
    else:
        raise TypeError(f"a figure must be a go.Figure or a dict with 'data' and 'layout', got {type(fig).__name__}")
    template = layout.pop("template", None)  # kept as it is: big, already valid, no NaN
    layout = json_safe(layout)
    if template is not None:
        layout["template"] = template
    return [json_safe(t) for t in data], layout


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (ValueError, TypeError):  # an array against a list: compare by setting it again
        return False


def _same_template(current: Any, new: Any) -> bool:
    if isinstance(new, str):  # a name, as a figure dict gives it: compare with what it resolves to
        new = pio.templates[new]
    return _same(current, new.to_plotly_json() if hasattr(new, "to_plotly_json") else new)


def replace_figure(target: go.Figure, new: go.Figure | dict) -> None:
    """Make `target` show `new` (a go.Figure or a figure dict), in place, setting only what differs.

    The same number and types of traces: each trace gets the properties that changed (a FigureWidget sends one
    batched restyle); otherwise the traces are replaced. Layout keys are compared one by one, so an unchanged
    template is not validated again; a key `new` lacks is cleared (zoom included), as replacing the layout would.
    """
    data, layout = figure_parts(new)
    skip = ("type", "uid")
    with target.batch_update():
        if len(target.data) == len(data) and all(t.type == d.get("type", "scatter") for t, d in zip(target.data, data)):
            for trace, props in zip(target.data, data):
                current = trace._props  # read only: the trace's dict inside the figure, no copy
                changes = {k: None for k in current if k not in props and k not in skip}
                changes.update({k: v for k, v in props.items() if k not in skip and not _same(current.get(k), v)})
                if changes:
                    trace.update(changes, overwrite=True)
        else:
            target.data = ()
            target.add_traces([{k: v for k, v in props.items() if k != "uid"} for props in data])
        current = target.layout._props
        changes = {k: None for k in current if k not in layout and k != "template"}
        for k, v in layout.items():
            same = _same_template(current.get(k), v) if k == "template" else _same(current.get(k), v)
            if not same:
                changes[k] = v
        if changes:
            target.layout.update(changes, overwrite=True)
    sync_widget_state(target)


class FigureSlot:
    """`figure`: a FigureWidget (or, without one, a go.Figure); `view`: the widget that shows it in a container."""

    def __init__(self, fig: go.Figure | dict):
        self.live = figure_widgets_available()
        data, layout = figure_parts(fig)
        if self.live:
            self.figure = go.FigureWidget(data=data, layout=layout)
            self.view: ipw.Widget = self.figure
        else:
            self.figure = go.Figure(data=data, layout=layout)
            self.view = ipw.Output()
            self._show()

    def update(self, new: go.Figure | dict) -> None:
        """Show `new` (a go.Figure or a figure dict) instead, in place, changing only what differs."""
        replace_figure(self.figure, new)  # a FigureWidget's snapshot is refreshed there
        if not self.live:
            self._show()

    def refresh(self) -> None:
        """After changing `figure` in place: a FigureWidget's view snapshot is refreshed; a static figure is shown again."""
        if self.live:
            sync_widget_state(self.figure)
        else:
            self._show()

    def _show(self) -> None:
        # The message an Output widget holds for a display(fig) call, built without needing a running IPython.
        spec = json.loads(self.figure.to_json())
        self.view.outputs = ({"output_type": "display_data", "metadata": {},
                              "data": {"application/vnd.plotly.v1+json": {**spec, "config": {}},
                                       "text/plain": f"<plotly figure: {len(self.figure.data)} traces>"}},)
