"""A figure inside a panel: a go.FigureWidget where one can be built, a static go.Figure where it cannot.

plotly >= 6 builds FigureWidget on anywidget and raises ImportError at construction (not import)
when anywidget is missing, so we probe by constructing one. Without it a panel still works: its
figures are plain go.Figure objects, updated in place and re-shown in an ipywidgets.Output.
"""

from __future__ import annotations

import html
import json
import math
from contextlib import contextmanager
from copy import deepcopy
from typing import Iterator

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go

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
        fig._widget_layout = deepcopy(fig._layout_obj._props)
        fig._widget_data = deepcopy(fig._data)


def replace_figure(target: go.Figure, new: go.Figure) -> None:
    """Make `target` show `new`, in place (a FigureWidget then sends one batched update to the front end)."""
    with target.batch_update():
        if len(target.data) == len(new.data) and all(a.type == b.type for a, b in zip(target.data, new.data)):
            for a, b in zip(target.data, new.data):
                props = {k: json_safe(v) for k, v in b.to_plotly_json().items()}
                props.pop("type", None)
                props.update({k: None for k in a.to_plotly_json() if k not in props and k not in ("type", "uid")})
                a.update(props, overwrite=True)
        else:
            target.data = ()
            target.add_traces([_safe_trace(t) for t in new.data])
        target.layout = new.layout
    sync_widget_state(target)


def _safe_trace(trace):
    props = {k: json_safe(v) for k, v in trace.to_plotly_json().items()}
    return type(trace)(props)


class FigureSlot:
    """`figure`: a FigureWidget (or, without one, a go.Figure); `view`: the widget that shows it in a container."""

    def __init__(self, fig: go.Figure):
        self.live = figure_widgets_available()
        if self.live:
            self.figure = go.FigureWidget(data=[_safe_trace(t) for t in fig.data], layout=fig.layout)
            self.view: ipw.Widget = self.figure
        else:
            self.figure = go.Figure(fig)
            self.view = ipw.Output()
            self._show()

    def update(self, new: go.Figure) -> None:
        """Show `new` instead (in place)."""
        replace_figure(self.figure, new)
        self.refresh()

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
