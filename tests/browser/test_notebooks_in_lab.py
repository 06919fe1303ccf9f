"""Every notebook, run in a real JupyterLab page: what a user sees, not just what the kernel computed.

nbmake executes cells but never renders a widget or fires a front-end event, so a panel can pass
it and still show nothing. Here each notebook is opened in headless Chromium and run with
Run All; then, on the page: no error (in a cell, in an Output widget, or from a widget
callback), every cell executed, every plot drawn with SVG marks, every widget view built, and
each slider, compute button, text and number box, used with the keyboard or mouse, changes a
plot or an output in the page. Notebooks are discovered (notebooks/*.ipynb and
tests/browser/fixtures/*.ipynb), and so are their panels: nothing here names a widget class.
"""

from __future__ import annotations

import os

import pytest

from .checks import interaction_report, opened, render_problems, run_problems
from .labpage import HERE, REPO, SCREENSHOTS, notebooks

pytestmark = pytest.mark.browser

RUN_TIMEOUT = float(os.environ.get("NBF_BROWSER_RUN_TIMEOUT", "300"))
ACTION_TIMEOUT = float(os.environ.get("NBF_BROWSER_ACTION_TIMEOUT", "30"))
TIMEOUTS = {"run_timeout": RUN_TIMEOUT, "action_timeout": ACTION_TIMEOUT, "shots": SCREENSHOTS}


def _id(p) -> str:
    return str(p.relative_to(REPO))


@pytest.fixture(scope="module", params=notebooks(), ids=_id)
def lab_notebook(request, chromium, lab_server, browser_artifacts):  # the browser first: no server when it is missing
    """One notebook opened in a fresh page and run with Run All (once for the three tests below)."""
    with opened(_id(request.param), lab_server, chromium, browser_artifacts, **TIMEOUTS) as nb:
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


def test_panels_respond(lab_notebook):
    """Each slider, compute button, text and number box, used through the page, changes a plot or an output."""
    if not lab_notebook.run.finished:
        pytest.fail(f"{lab_notebook.path}: Run All did not finish: {lab_notebook.run.problem}", pytrace=False)
    if not lab_notebook.controls():
        pytest.skip(f"{lab_notebook.path}: no interactive panel (no slider, compute button, text or number box)")
    problems, report = interaction_report(lab_notebook.interact(ACTION_TIMEOUT))
    print(f"\n{lab_notebook.path}:\n{report}")
    assert not problems, f"{lab_notebook.path}:\n" + "\n".join(problems) + f"\n\nwhat was done:\n{report}"


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
        problems, report = interaction_report(nb.interact(5.0))  # short: two of its controls never change anything
        joined = "\n".join(problems)
        print(f"\nreported, as it should be:\n{ran}\n{rendered}\n{joined}")
        assert "slider 'dead' changed nothing in the page" in joined, report
        assert "compute 'Generate' raised ValueError: planted callback failure" in joined, report
        assert "slider 'live'" not in joined, report  # a working control next to broken ones still passes
