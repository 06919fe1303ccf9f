"""The course in a real JupyterLab page: chapter 1's student and solution renders, run with Run All in headless Chromium.

tests/test_course_render.py runs every render with nbclient, which shows what the kernel printed but never what a
student sees. Here one student notebook and one solution notebook are opened in the page and run; then, on the page:
no error and every cell executed (checks.run_problems), plots drawn and widget views built (render_problems), the
outputs' text readable (layout_problems); each check cell shows exactly its one line, `N.M name: not implemented yet`
in the student render and `N.M name: passed (...)` in the solutions; the CourseProgress panel is drawn with one row
per exercise, none ticked in the student render and every one ticked (✓) in the solutions; and a folded hint opens:
its `<details>` body is hidden until its `<summary>` is clicked, then shown. Screenshots (after Run All, and with the
hint open) go to the browser artifacts folder like the tutorials'.

    .venv/bin/python -m pytest tests/browser -m browser -k course
"""

from __future__ import annotations

import os
import re

import pytest

from .checks import artifact_stem, close, layout_problems, opened, render_problems, run_problems, start
from .labpage import REPO, SCREENSHOTS

pytestmark = pytest.mark.browser

RUN_TIMEOUT = float(os.environ.get("NBF_BROWSER_RUN_TIMEOUT", "600"))
ACTION_TIMEOUT = float(os.environ.get("NBF_BROWSER_ACTION_TIMEOUT", "30"))
TIMEOUTS = {"run_timeout": RUN_TIMEOUT, "action_timeout": ACTION_TIMEOUT, "shots": SCREENSHOTS}

STUDENT, SOLUTIONS = "course/student/01_sites.ipynb", "course/solutions/01_sites.ipynb"
NOTEBOOKS = [STUDENT, SOLUTIONS]

# Every cell: its source and tags; a code cell also its outputs as the model holds them and the text the page shows.
JS_CELLS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  return w.content.widgets.map((cell, index) => {
    const c = {index, type: cell.model.type, source: cell.model.sharedModel.getSource(),
               tags: cell.model.getMetadata('tags') || []};
    if (cell.model.type !== 'code') return c;
    const text = (t) => Array.isArray(t) ? t.join('') : (t || '');
    c.outputs = cell.model.outputs.toJSON().map(o => ({type: o.output_type, name: o.name || null,
      text: o.output_type === 'stream' ? text(o.text) : text((o.data || {})['text/plain'])}));
    const area = cell.node.querySelector('.jp-Cell-outputArea');
    c.shown = area ? area.innerText : '';
    return c;
  });
}"""

# Every CourseProgress panel in the outputs (a widget view with a "k of n passed" summary and a refresh button): its
# cell, summary line, size, and rows (the mark in the row's first span, and the row's text).
JS_PROGRESS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const panels = [];
  w.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    cell.node.querySelectorAll('.jp-OutputArea-output').forEach(out => {
      if (!out.querySelector('.jupyter-widgets')) return;
      const summary = Array.from(out.querySelectorAll('.widget-html-content'))
        .map(h => h.innerText.trim()).find(t => /\\d+ of \\d+ passed/.test(t));
      const refresh = Array.from(out.querySelectorAll('button')).some(b => /refresh/i.test(b.innerText + ' ' + b.title));
      if (!summary || !refresh) return;
      const rows = Array.from(out.querySelectorAll('.widget-html-content div'))
        .filter(d => d.firstElementChild && d.firstElementChild.tagName === 'SPAN')
        .map(d => ({mark: d.firstElementChild.textContent.trim(),
                    text: Array.from(d.childNodes).slice(1).map(n => n.textContent).join('').trim()}));
      const r = out.getBoundingClientRect();
      panels.push({cell: index, summary, rows, size: [Math.round(r.width), Math.round(r.height)]});
    });
  });
  return panels;
}"""

CHECK_CALL = re.compile(r"(\w+)\.check_(\w+)\((\w+)\)")


def _order(request) -> list[str]:
    """The course notebooks this session runs, in the order its tests use them (after -k)."""
    out = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and "course_notebook" in spec.params and spec.params["course_notebook"] not in out:
            out.append(spec.params["course_notebook"])
    return out


@pytest.fixture(scope="module")
def course_pipeline(chromium, lab_server):
    """rel -> a page whose Run All was started early: the next notebook's kernel computes while one is checked."""
    started: dict = {}
    yield started
    for nb in started.values():  # left over when a run stops early (-x, Ctrl-C)
        close(nb)


@pytest.fixture(scope="module", params=NOTEBOOKS)
def course_notebook(request, chromium, lab_server, browser_artifacts, browser_screenshots, course_pipeline):
    """One course notebook opened in a fresh page and run with Run All (once for all the tests below)."""
    rel = request.param
    path = REPO / rel
    assert path.is_file(), f"{rel} is missing; run `make course`"
    root = lab_server.root_dir.resolve()
    assert root in path.resolve().parents, f"the lab server's root {root} does not hold {rel}"
    order = _order(request)

    def start_next() -> None:
        i = order.index(rel) if rel in order else len(order)
        if i + 1 < len(order) and order[i + 1] not in course_pipeline:
            course_pipeline[order[i + 1]] = start(order[i + 1], lab_server, chromium, action_timeout=ACTION_TIMEOUT)

    with opened(rel, lab_server, chromium, browser_artifacts, **TIMEOUTS, started=course_pipeline.pop(rel, None),
                then=start_next, outputs_to=browser_screenshots) as nb:
        yield nb


def _finished(nb) -> None:
    if not nb.run.finished:
        pytest.fail(f"{nb.path}: Run All did not finish: {nb.run.problem}", pytrace=False)


def _student(nb) -> bool:
    return nb.path.startswith("course/student/")


def _checks(nb) -> list[tuple[dict, str]]:
    """(cell, the exercise's function name) of every check cell."""
    out = []
    for c in nb.page.evaluate(JS_CELLS):
        if "check" in c["tags"]:
            m = CHECK_CALL.fullmatch(c["source"].strip())
            assert m, f"{nb.path} cell {c['index']}: a check cell holds one call chN.check_<name>(<name>), got {c['source']!r}"
            out.append((c, m[2]))
    return out


def test_runs_without_errors(course_notebook):
    """Run All ends with every code cell executed and no error from the kernel or in the page."""
    problems = run_problems(course_notebook)
    assert not problems, f"{course_notebook.path}:\n" + "\n\n".join(problems)


def test_panels_render(course_notebook):
    """Every plot output is a drawn plotly plot and every widget output a built, visible view."""
    _finished(course_notebook)
    problems, n_plots, n_views = render_problems(course_notebook)
    assert not problems, f"{course_notebook.path} ({n_plots} plots, {n_views} widget views):\n" + "\n".join(problems)


def test_layout_readable(course_notebook):
    """The outputs' text can be read: none runs out of its box, none lies on other text, no legend covers a title."""
    _finished(course_notebook)
    problems = layout_problems(course_notebook)
    assert not problems, f"{course_notebook.path}, after Run All:\n" + "\n".join(problems)


def test_check_cells_print_their_one_line(course_notebook):
    """Each check cell prints one stdout line and the page shows it: `N.M name: not implemented yet` in the student
    render (its stubs raise NotImplementedError), `N.M name: passed (...)` in the solutions."""
    _finished(course_notebook)
    checks = _checks(course_notebook)
    assert len(checks) >= 2, f"{course_notebook.path}: only {len(checks)} check cells"
    want = "not implemented yet" if _student(course_notebook) else r"passed( \(.*\))?"
    problems, labels = [], []
    for cell, name in checks:
        where = f"cell {cell['index']} ({cell['source'].strip()})"
        others = [o for o in cell["outputs"] if not (o["type"] == "stream" and o["name"] == "stdout")]
        printed = "".join(o["text"] for o in cell["outputs"] if o["type"] == "stream" and o["name"] == "stdout")
        if others:
            problems.append(f"{where}: outputs besides its stdout line: {[(o['type'], o['name'], o['text'][:200]) for o in others]}")
        m = re.fullmatch(rf"(\d+(?:\.\d+)+) {re.escape(name)}: {want}\n?", printed)
        if not m:
            problems.append(f"{where}: printed {printed!r}, want one line '<N.M> {name}: {want}'")
            continue
        labels.append(m[1])
        if cell["shown"].strip() != printed.strip():
            problems.append(f"{where}: the page shows {cell['shown']!r}, the kernel printed {printed!r}")
    if len(set(labels)) != len(labels):
        problems.append(f"two check cells report the same exercise: {labels}")
    assert not problems, f"{course_notebook.path}:\n" + "\n".join(problems)


def test_progress_panel(course_notebook):
    """The CourseProgress panel is drawn with one row per check cell: none ticked in the student render (each says
    not implemented), every one ticked ✓ in the solutions."""
    _finished(course_notebook)
    panels = course_notebook.page.evaluate(JS_PROGRESS)
    assert len(panels) == 1, f"{course_notebook.path}: want one drawn CourseProgress panel, found {panels}"
    panel, n = panels[0], len(_checks(course_notebook))
    rows = "\n".join(f"  {r['mark']} {r['text']}" for r in panel["rows"])
    said = f"{course_notebook.path}: panel in cell {panel['cell']}, {panel['summary']!r}, {panel['size']} px:\n{rows}"
    print(f"\n{said}")
    assert panel["size"][0] > 100 and panel["size"][1] > 20 * n, said
    assert len(panel["rows"]) == n, f"{n} check cells but {len(panel['rows'])} rows\n{said}"
    ticked = [r for r in panel["rows"] if r["mark"] == "✓"]
    if _student(course_notebook):
        assert not ticked, said
        assert all(r["mark"] == "…" and r["text"].endswith("(not implemented)") for r in panel["rows"]), said
        assert re.search(rf"\b0 of {n} passed", panel["summary"]), said
    else:
        assert len(ticked) == n and all(r["text"].endswith("(passed)") for r in ticked), said
        assert re.search(rf"\b{n} of {n} passed", panel["summary"]), said


def test_hint_expands(course_notebook, browser_artifacts):
    """Hints (and, in the student render, solutions) are folded: a `<details>` body is hidden until its `<summary>`
    is clicked. The first hint is opened by a click, and a screenshot taken with it open."""
    _finished(course_notebook)
    nb = course_notebook
    details = nb.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-MarkdownCell .jp-RenderedMarkdown details")
    summaries = [details.nth(i).locator(":scope > summary").inner_text().strip() for i in range(details.count())]
    assert "Hint" in summaries, f"{nb.path}: no rendered <details> with a 'Hint' summary; summaries: {summaries}"
    assert ("Solution" in summaries) == _student(nb), f"{nb.path}: summaries {summaries}"
    for i in range(details.count()):  # every fold starts closed
        body = details.nth(i).locator(":scope > :not(summary)").first
        assert body.count() and not body.is_visible(), f"{nb.path}: <details> {i} ({summaries[i]}) is open before any click"

    hint = details.nth(summaries.index("Hint"))
    body = hint.locator(":scope > :not(summary)").first
    text = (body.text_content() or "").strip()  # inner_text() is empty while the fold hides it
    assert text, f"{nb.path}: the hint has no text"
    box = body.bounding_box()
    assert not body.is_visible() and (box is None or box["height"] == 0), f"{nb.path}: hint body shown before the click: {box}"
    hint.locator(":scope > summary").click()
    body.wait_for(state="visible", timeout=5000)
    box = body.bounding_box()
    assert body.is_visible() and box is not None and box["height"] > 0, f"{nb.path}: hint body not shown after the click: {box}"
    assert hint.evaluate("d => d.open"), f"{nb.path}: the clicked <details> is not open"
    try:
        path = nb.screenshot(browser_artifacts / f"{artifact_stem(nb.path)}-hint-open.png")
        SCREENSHOTS.append(path)
        print(f"\nscreenshot of {nb.path} with its first hint open: {path}")
    except Exception as e:  # a screenshot must not hide the real result
        print(f"\nscreenshot failed: {e}")
    print(f"{nb.path}: opened the hint ({box['height']:.0f} px): {text[:100]!r}...")
