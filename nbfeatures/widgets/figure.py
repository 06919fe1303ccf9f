"""A figure inside a panel: a go.FigureWidget where one can be built, a static go.Figure where it cannot.

plotly >= 6 builds FigureWidget on anywidget and raises ImportError at construction (not import)
when anywidget is missing, so we probe by constructing one. Without it a panel still works: its
figures are plain go.Figure objects, updated in place and re-shown in an ipywidgets.Output.
"""

from __future__ import annotations

import json

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


def replace_figure(target: go.Figure, new: go.Figure) -> None:
    """Make `target` show `new`, in place (a FigureWidget then sends one batched update to the front end)."""
    with target.batch_update():
        if len(target.data) == len(new.data) and all(a.type == b.type for a, b in zip(target.data, new.data)):
            for a, b in zip(target.data, new.data):
                # plain lists, not numpy arrays: when the page echoes the update back, plotly compares values
                # with `==`, and an array there raises "truth value of an array is ambiguous" (seen in the browser)
                props = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in b.to_plotly_json().items()}
                props.pop("type", None)
                props.update({k: None for k in a.to_plotly_json() if k not in props and k not in ("type", "uid")})
                a.update(props, overwrite=True)
        else:
            target.data = ()
            target.add_traces(list(new.data))
        target.layout = new.layout


class FigureSlot:
    """`figure`: a FigureWidget (or, without one, a go.Figure); `view`: the widget that shows it in a container."""

    def __init__(self, fig: go.Figure):
        self.live = figure_widgets_available()
        if self.live:
            self.figure = go.FigureWidget(fig)
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
        """After changing `figure` in place: a FigureWidget has already synced; a static figure is shown again."""
        if not self.live:
            self._show()

    def _show(self) -> None:
        # The message an Output widget holds for a display(fig) call, built without needing a running IPython.
        spec = json.loads(self.figure.to_json())
        self.view.outputs = ({"output_type": "display_data", "metadata": {},
                              "data": {"application/vnd.plotly.v1+json": {**spec, "config": {}},
                                       "text/plain": f"<plotly figure: {len(self.figure.data)} traces>"}},)
