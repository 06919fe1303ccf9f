"""FSM probing panel: pick a state to see its digits' codes per codebook; force a code to see where the model goes next.

The panel never sees a model; it calls

    codes(state) -> {codebook label: (code on the 1st digit, code on the 2nd digit)}
    next_states(state, forced) -> [n_states] next-state probabilities after reading the state, with
                                  forced = {site: code} forced on its 2nd digit ({}: no forcing)

`out_edges[s]` lists the true successors of state s; they are marked on the bar chart. "code of state"
copies another state's 2nd-digit code at the chosen site; the site ALL forces that state's codes at every
site at once (the paper's patching experiment).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import ipywidgets as ipw
import numpy as np
import plotly.graph_objects as go

from ..plots.fsm import next_state_bars, state_codes_table
from .figure import FigureSlot, reported


ALL = "all sites"


class FSMPanel(ipw.VBox):
    """Controls: state, site, code, source (a state whose code to copy), force button. Figures: codes_fig, dist_fig."""

    def __init__(self, codes: Callable[[int], Mapping[str, tuple[int, int]]],
                 next_states: Callable[[int, Mapping[str, int]], Sequence[float]],
                 out_edges: Sequence[Sequence[int]], sites: Sequence[str], n_codes: int, *, state: int = 0, digits: int = 2):
        self.codes_fn, self.next_fn, self.digits = codes, next_states, digits
        self.out_edges = [list(map(int, e)) for e in out_edges]
        self.n_states = len(self.out_edges)
        if not self.n_states:
            raise ValueError("out_edges must list the successors of at least one state")
        bad = [e for edges in self.out_edges for e in edges if not 0 <= e < self.n_states]
        if bad:
            raise ValueError(f"out_edges must hold states in [0, {self.n_states}), got {bad[:5]}")
        if isinstance(n_codes, bool) or not isinstance(n_codes, (int, np.integer)) or n_codes < 1:
            raise ValueError(f"n_codes must be an int >= 1 (the codebook size), got {n_codes!r}")
        if not sites:
            raise ValueError("sites must name at least one codebook the code can be forced at")
        if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
            raise ValueError(f"digits must be an int >= 1 (how states are written), got {digits!r}")
        if isinstance(state, bool) or not isinstance(state, (int, np.integer)) or not 0 <= state < self.n_states:
            raise ValueError(f"state must lie in [0, {self.n_states}), got {state}")
        self.state = ipw.BoundedIntText(value=state, min=0, max=self.n_states - 1, description="state")
        self.sites = list(sites)
        self.site = ipw.Dropdown(options=self.sites + ([ALL] if len(self.sites) > 1 else []), value=sites[0], description="force at")
        self.code = ipw.BoundedIntText(value=0, min=0, max=n_codes - 1, description="code")
        self.source = ipw.Dropdown(options=[("(pick a code by hand)", None)] + [(self._name(s), s) for s in range(self.n_states)],
                                   index=0, description="code of state", style={"description_width": "initial"})
        self.force_button = ipw.Button(description="Force", button_style="primary", icon="play")
        self.status = ipw.HTML()
        self._codes = FigureSlot(state_codes_table([], [], []))
        self._dist = FigureSlot(next_state_bars(np.zeros(self.n_states), None, []))
        self.before: np.ndarray | None = None  # last distributions drawn, as arrays
        self._shown: int | None = None  # the state `before` belongs to
        self.after: np.ndarray | None = None
        self.state.observe(lambda _: self.show_state(), names="value")
        self.source.observe(lambda _: self._copy_source(), names="value")
        # The first option's value is None, and ipywidgets reads `value = None` as "nothing selected" (a blank box):
        # show that option instead, so the dropdown always names what it does.
        self.source.observe(lambda ch: ch["new"] is None and setattr(self.source, "index", 0), names="index")
        self.site.observe(lambda _: self._copy_source(), names="value")
        self.force_button.on_click(lambda _: self.force())
        super().__init__([ipw.HBox([self.state, self.site]), ipw.HBox([self.source, self.code, self.force_button]), self.status,
                          self._codes.view, self._dist.view])
        self.show_state()

    @property
    def codes_fig(self) -> go.Figure:
        return self._codes.figure

    @property
    def dist_fig(self) -> go.Figure:
        return self._dist.figure

    def _name(self, s: int) -> str:
        return str(s).zfill(self.digits)

    def show_state(self) -> None:
        """Draw the picked state's codes and its unforced next-state distribution."""
        s = int(self.state.value)
        with reported(self.status):  # build both figures first: a failure leaves the last state on show
            table = dict(self.codes_fn(s))
            codes = state_codes_table(list(table), [v[0] for v in table.values()], [v[1] for v in table.values()], self._name(s))
            before = self._probs(self.next_fn(s, {}))
            dist = next_state_bars(before, None, self.out_edges[s], (), f"state {self._name(s)}: next-state distribution (no forcing)")
        self.status.value = ""
        self._codes.update(codes)
        self.before, self.after, self._shown = before, None, s
        self._dist.update(dist)
        self._copy_source()

    def _probs(self, p) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if len(p) != self.n_states:
            raise ValueError(f"next_states returned {len(p)} probabilities; expected one per state ({self.n_states})")
        return p

    def _copy_source(self) -> None:
        self.code.disabled = self.site.value == ALL
        if self.source.value is None:
            return
        with reported(self.status):
            table = dict(self.codes_fn(int(self.source.value)))
            missing = [x for x in self.sites if x not in table]
            if missing:
                raise ValueError(f"codes({self.source.value}) has no entry for sites {missing}; it has {list(table)}")
            if self.site.value != ALL:
                self.code.value = int(table[self.site.value][1])

    def forced(self) -> dict[str, int]:
        """What the next Force will force: {site: code}."""
        if self.site.value != ALL:
            return {self.site.value: int(self.code.value)}
        if self.source.value is None:
            raise ValueError(f"forcing at {ALL!r} copies a state's codes: pick the state under 'code of state'")
        table = dict(self.codes_fn(int(self.source.value)))
        return {x: int(table[x][1]) for x in self.sites}

    def force(self) -> None:
        """Run with the code(s) forced and draw before / after."""
        s, src = int(self.state.value), self.source.value
        if self._shown != s:  # the last show_state failed: try again (it reports its own error)
            self.show_state()
        with reported(self.status):
            forced = self.forced()
            after = self._probs(self.next_fn(s, forced))
            next_state_bars(self.before, after, self.out_edges[s])  # checks the values before anything is replaced
        self.after = after
        what = (f"state {self._name(src)}'s codes forced at every site" if self.site.value == ALL else
                f"code {forced[self.site.value]} forced at {self.site.value}" + (f" (the code of state {self._name(src)})" if src is not None else ""))
        self._draw(f"state {self._name(s)}, {what}", self.out_edges[src] if src is not None else ())
        on_edges = float(self.after[self.out_edges[s]].sum())
        on_target = float(self.after[self.out_edges[src]].sum()) if src is not None else None
        self.status.value = (f"P(true out-edge of {self._name(s)}): {float(self.before[self.out_edges[s]].sum()):.2f} → {on_edges:.2f}"
                             + (f"; P(out-edge of {self._name(src)}): {float(self.before[self.out_edges[src]].sum()):.2f} → {on_target:.2f}"
                                if on_target is not None else ""))

    def _draw(self, title: str, target_edges: Sequence[int] = ()) -> None:
        self._dist.update(next_state_bars(self.before, self.after, self.out_edges[int(self.state.value)], target_edges, title))
