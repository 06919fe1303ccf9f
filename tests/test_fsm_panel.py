"""FSMPanel and its figures, driven headless with a fake FSM 'model' (callables only)."""

import numpy as np
import plotly.graph_objects as go
import pytest

import nbfeatures.widgets.figure as figure_mod
from nbfeatures.plots.fsm import next_state_bars, state_codes_table
from nbfeatures.widgets.fsm import ALL, FSMPanel

N = 12  # states 00..11
EDGES = [[(s + 1) % N, (s + 5) % N] for s in range(N)]
SITES = ["mlp0", "mlp1"]


class FakeFSM:
    """State s fires code 10 + s on its 2nd digit at every site; forcing code 10 + b at mlp1 alone moves half the mass
    to b's out-edges, forcing it at both sites all of it."""

    def __init__(self):
        self.calls = []

    def codes(self, s):
        return {site: (s % 10, 10 + s) for site in SITES}

    def next_states(self, s, forced):
        self.calls.append((s, dict(forced)))
        p = np.zeros(N)
        p[EDGES[s]] = 0.5
        targets = [c - 10 for c in forced.values()]
        if "mlp1" in forced:
            p *= 0.5 if len(set(targets)) == 2 or len(forced) == 1 else 0
            p[EDGES[forced["mlp1"] - 10]] += 0.25 if len(forced) == 1 else 0.5
        return p


def make(**kw):
    fake = FakeFSM()
    return fake, FSMPanel(fake.codes, fake.next_states, EDGES, SITES, n_codes=40, **kw)


@pytest.mark.parametrize("live", [True, False])
def test_picking_a_state_shows_its_codes_and_distribution(monkeypatch, live):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", live)
    fake, panel = make(state=3)
    table = panel.codes_fig.data[0]
    assert list(table.cells.values[0]) == SITES and list(table.cells.values[2]) == [13, 13]
    panel.state.value = 7
    assert fake.calls[-1] == (7, {})
    assert list(panel.codes_fig.data[0].cells.values[2]) == [17, 17]
    before, edges = panel.dist_fig.data[0], panel.dist_fig.data[-1]
    assert before.name == "before" and [before.x[i] for i in np.flatnonzero(before.y)] == ["00", "08"]
    assert edges.name == "true out-edges" and sorted(edges.x) == ["00", "08"]
    assert "no forcing" in panel.dist_fig.layout.title.text


def test_forcing_another_states_code_moves_the_mass_to_its_out_edges(monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", True)
    fake, panel = make(state=2)
    panel.site.value = "mlp1"
    panel.source.value = 9  # copies state 9's 2nd-digit code at mlp1
    assert panel.code.value == 19
    panel.force_button.click()
    assert fake.calls[-1] == (2, {"mlp1": 19})
    names = [t.name for t in panel.dist_fig.data]
    assert names == ["before", "after", "true out-edges", "target state's out-edges"]
    after = np.asarray(panel.dist_fig.data[1].y)
    assert after[EDGES[9]].sum() == 0.5 and after[EDGES[2]].sum() == 0.5
    assert sorted(panel.dist_fig.data[3].x) == ["02", "10"]  # EDGES[9]
    assert "P(out-edge of 09): 0.00 → 0.50" in panel.status.value
    panel.site.value = ALL  # state 9's codes at every site: all the mass moves
    assert panel.code.disabled
    panel.force_button.click()
    assert fake.calls[-1] == (2, {"mlp0": 19, "mlp1": 19})
    assert np.asarray(panel.dist_fig.data[1].y)[EDGES[9]].sum() == 1.0 and "→ 1.00" in panel.status.value
    assert "codes forced at every site" in panel.dist_fig.layout.title.text
    panel.site.value = "mlp0"
    panel.source.value = None  # a code by hand: no target marked
    panel.code.value = 14
    panel.force_button.click()
    assert fake.calls[-1] == (2, {"mlp0": 14}) and [t.name for t in panel.dist_fig.data][-1] == "true out-edges"
    panel.site.value = ALL
    with pytest.raises(ValueError, match="pick the state under 'code of state'"):
        panel.force()
    assert "pick the state" in panel.status.value


def test_static_fallback_without_anywidget(monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", False)
    _, panel = make()
    panel.code.value = 15
    panel.force_button.click()
    assert isinstance(panel.dist_fig, go.Figure) and not isinstance(panel.dist_fig, go.FigureWidget)
    spec = panel.children[-1].outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert [t["name"] for t in spec["data"]][:2] == ["before", "after"]


def test_bad_input(monkeypatch):
    monkeypatch.setattr(figure_mod, "USE_FIGURE_WIDGET", False)
    with pytest.raises(ValueError, match=r"state must lie in \[0, 12\), got 12"):
        make(state=12)
    with pytest.raises(ValueError, match="sites must name at least one"):
        FSMPanel(FakeFSM().codes, FakeFSM().next_states, EDGES, [], n_codes=4)
    with pytest.raises(ValueError, match="one probability per state, got 3 and 2"):
        next_state_bars([0.1, 0.2, 0.7], [0.5, 0.5], [0])
    with pytest.raises(ValueError, match=r"edges must be states in \[0, 3\)"):
        next_state_bars([0.1, 0.2, 0.7], None, [3])
    with pytest.raises(ValueError, match="one entry per codebook"):
        state_codes_table(["a"], [1, 2], [3])
    fake = FakeFSM()
    with pytest.raises(ValueError, match="expected one per state"):
        FSMPanel(fake.codes, lambda s, forced: np.ones(3), EDGES, SITES, n_codes=40)


def test_source_dropdown_never_blank_and_descriptions_fit():
    _, panel = make()
    assert panel.source.label == "(pick a code by hand)" and panel.source.value is None  # not a blank box
    panel.source.value = 3
    panel.source.value = None
    assert panel.source.index == 0 and panel.source.label == "(pick a code by hand)"
    assert panel.source.style.description_width == "initial"  # "code of state", not "code of st…"
