"""Every notebook, run in a real JupyterLab page: what a user sees, not just what the kernel computed.

nbmake executes cells but never renders a widget or fires a front-end event, so a panel can pass
it and still show nothing. Here each notebook is opened in headless Chromium and run with
Run All; then, on the page: no error (in a cell, in an Output widget, or from a widget
callback), every cell executed, every plot drawn with SVG marks, every widget view built, the
outputs' text readable (not running out of its box, not on other text, no legend on a title; after
Run All and again after the controls were used), and each slider, compute button, text and number
box, used with the keyboard or mouse, changes a plot or an output in the page. Notebooks are
discovered (notebooks/*.ipynb and tests/browser/fixtures/*.ipynb), and so are their panels: nothing
here names a widget class.
"""

from __future__ import annotations

import os
import re

import pytest

from .checks import close, interaction_report, layout_problems, opened, render_problems, run_problems, start
from .labpage import HERE, REPO, SCREENSHOTS, missing_modules, notebooks

pytestmark = pytest.mark.browser

RUN_TIMEOUT = float(os.environ.get("NBF_BROWSER_RUN_TIMEOUT", "600"))  # nbmake's limit in make test
ACTION_TIMEOUT = float(os.environ.get("NBF_BROWSER_ACTION_TIMEOUT", "30"))
TIMEOUTS = {"run_timeout": RUN_TIMEOUT, "action_timeout": ACTION_TIMEOUT, "shots": SCREENSHOTS}
# Start the next notebook's Run All as soon as one has run, so its kernel computes while this one is checked.
PIPELINE = os.environ.get("NBF_BROWSER_PIPELINE", "1") != "0"


def _id(p) -> str:
    return str(p.relative_to(REPO))


def _params() -> list:
    """Every notebook; a fixture whose panel module has not landed yet is skipped, saying which."""
    out = []
    for p in notebooks():
        missing = missing_modules(p)
        marks = [pytest.mark.skip(reason=f"{_id(p)} needs {', '.join(missing)}, not in this checkout yet")] if missing else []
        out.append(pytest.param(p, id=_id(p), marks=marks))
    return out


class Pipeline:
    """The notebooks in the order the tests use them; `after(rel)` starts the one after rel (two kernels at most)."""

    def __init__(self, order: list[str], server, browser):
        self.order, self.server, self.browser = order, server, browser
        self.started: dict = {}

    def take(self, rel: str):
        return self.started.pop(rel, None)

    def after(self, rel: str) -> None:
        i = self.order.index(rel) if rel in self.order else len(self.order)
        if PIPELINE and i + 1 < len(self.order) and self.order[i + 1] not in self.started:
            nxt = self.order[i + 1]
            self.started[nxt] = start(nxt, self.server, self.browser, action_timeout=ACTION_TIMEOUT)

    def close(self) -> None:
        for nb in self.started.values():  # left over when a run stops early (-x, Ctrl-C)
            close(nb)
        self.started.clear()


@pytest.fixture(scope="session")
def pipeline(request, chromium, lab_server):
    order = []
    for item in request.session.items:  # the final order, after -k and pytest's grouping by notebook
        spec = getattr(item, "callspec", None)
        if spec is None or "lab_notebook" not in spec.params or item.get_closest_marker("skip") is not None:
            continue
        if _id(spec.params["lab_notebook"]) not in order:
            order.append(_id(spec.params["lab_notebook"]))
    p = Pipeline(order, lab_server, chromium)
    yield p
    p.close()


@pytest.fixture(scope="module", params=_params())
def lab_notebook(request, chromium, lab_server, browser_artifacts, browser_screenshots, pipeline):  # the browser first
    """One notebook opened in a fresh page and run with Run All (once for all the tests below)."""
    rel = _id(request.param)
    with opened(rel, lab_server, chromium, browser_artifacts, **TIMEOUTS, started=pipeline.take(rel),
                then=lambda: pipeline.after(rel), outputs_to=browser_screenshots) as nb:
        yield nb


def test_runs_without_errors(lab_notebook):
    """Run All ends with every code cell executed and no error from the kernel or in the page."""
    problems = run_problems(lab_notebook)
    assert not problems, f"{lab_notebook.path}:\n" + "\n\n".join(problems)


def test_panels_render(lab_notebook):
    """Every plot output is a drawn plotly plot and every widget output a built, visible view."""
    if not lab_notebook.run.finished:
        pytest.fail(f"{lab_notebook.path}: Run All did not finish: {lab_notebook.run.problem}", pytrace=False)
    problems, n_plots, n_views = render_problems(lab_notebook)
    assert not problems, f"{lab_notebook.path} ({n_plots} plots, {n_views} widget views):\n" + "\n".join(problems)


def test_layout_readable(lab_notebook):
    """After Run All, the outputs' text can be read: none runs out of its box, none lies on other text, and no
    plot's legend covers its title or a subplot title."""
    if not lab_notebook.run.finished:
        pytest.fail(f"{lab_notebook.path}: Run All did not finish: {lab_notebook.run.problem}", pytrace=False)
    problems = layout_problems(lab_notebook)
    assert not problems, f"{lab_notebook.path}, after Run All:\n" + "\n".join(problems)


def test_panels_respond(lab_notebook):
    """Each slider, compute button, text and number box, used through the page, changes a plot or an output."""
    if not lab_notebook.run.finished:
        pytest.fail(f"{lab_notebook.path}: Run All did not finish: {lab_notebook.run.problem}", pytrace=False)
    if not lab_notebook.controls():
        pytest.skip(f"{lab_notebook.path}: no interactive panel (no slider, compute button, text or number box)")
    # a fixture's panels are self-contained: each control must change its own panel, not just something on the page
    own_cell = lab_notebook.path.startswith("tests/browser/fixtures/")
    problems, report = interaction_report(lab_notebook.interact(ACTION_TIMEOUT), own_cell=own_cell)
    print(f"\n{lab_notebook.path}:\n{report}")
    assert not problems, f"{lab_notebook.path}:\n" + "\n".join(problems) + f"\n\nwhat was done:\n{report}"


def test_layout_readable_after_use(lab_notebook):
    """The same once test_panels_respond has used every control: a redraw must not break the layout either."""
    if not lab_notebook.interacted:
        pytest.skip(f"{lab_notebook.path}: its controls were not used (no panel, or test_panels_respond not selected)")
    problems = layout_problems(lab_notebook)
    assert not problems, f"{lab_notebook.path}, after using its controls:\n" + "\n".join(problems)


def test_checks_catch_a_broken_notebook(chromium, lab_server, browser_artifacts):
    """The checks above can fail: fixtures/broken/ plants one of each fault and every one is reported."""
    rel = str((HERE / "fixtures" / "broken" / "broken_panels.ipynb").relative_to(REPO))
    with opened(rel, lab_server, chromium, browser_artifacts, **TIMEOUTS) as nb:
        assert nb.run.finished, nb.run.problem
        ran = "\n".join(run_problems(nb))
        assert "kernel error RuntimeError: planted failure" in ran, ran
        assert "cells without an execution count after Run All" in ran, ran
        rendered = "\n".join(render_problems(nb)[0])
        assert "plot 'empty' drawn empty" in rendered, rendered
        assert "plot 'off to the side' is off to the side" in rendered and "'in view'" not in rendered, rendered
        assert "not_a_real_widget_module" in rendered or "widget view" in rendered, rendered
        laid_out = "\n".join(layout_problems(nb))
        assert re.search(r"text runs out of its box: div.widget-html is 400 px wide .*'overflows:xxx", laid_out), laid_out
        assert re.search(r"text lies on other text: ('the line above' and 'pulled onto the line above'|"
                         r"'pulled onto the line above' and 'the line above')", laid_out), laid_out
        assert "plot 'legend on title': the legend covers the title 'legend on title'" in laid_out, laid_out
        assert ("plot 'legend on a subplot title': the legend covers the subplot title / annotation 'left subplot'"
                in laid_out), laid_out
        assert "live = 5" not in laid_out and "right subplot" not in laid_out, laid_out  # only the planted ones
        problems, report = interaction_report(nb.interact(5.0))  # short: two of its controls never change anything
        joined = "\n".join(problems)
        print(f"\nreported, as it should be:\n{ran}\n{rendered}\n{laid_out}\n{joined}")
        assert "slider 'dead' changed nothing in the page" in joined, report
        assert "compute 'Generate' raised ValueError: planted callback failure" in joined, report
        assert "slider 'live'" not in joined, report  # a working control next to broken ones still passes
