"""The checks, as functions from a notebook's page to a list of problems (empty: it passes).

They are separate from the tests so that test_checks_catch_a_broken_notebook can show that each
one fails where it should (fixtures/broken/), and the notebook tests stay short.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import uuid
from pathlib import Path

from .labpage import BROKEN_CONSOLE, LabNotebook, NotebookRun, clean

VIEWPORT = {"width": 1280, "height": 900}  # a laptop's browser window; JupyterLab's side bars are collapsed
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"


def artifact_stem(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", rel.removesuffix(".ipynb"))


def shots_name(rel: str) -> str:
    """A notebook's folder under the screenshots folder: 00_quickstart, fixtures_nbfeatures_panels."""
    return artifact_stem(rel.removeprefix("notebooks/").removeprefix("tests/browser/"))


def start(rel: str, server, browser, *, action_timeout: float) -> LabNotebook:
    """A fresh page with notebook `rel` (relative to the server root) opened and Run All started, not waited for.

    A failure to open is kept in `run.problem` (reported by the tests, with a screenshot), not raised.
    """
    run = NotebookRun(rel)
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(action_timeout * 1000)
    nb = LabNotebook(context.new_page(), server, rel, run)
    try:
        nb.open(f"nbf-{artifact_stem(rel)}-{uuid.uuid4().hex[:6]}", timeout_s=120)
        nb.start_run()
    except Exception as e:
        run.problem = f"{type(e).__name__}: {clean(str(e), 600)}"
    return nb


def close(nb: LabNotebook, artifacts=None) -> None:
    """Save the browser console (when artifacts is given), shut this page's kernel down, close the page."""
    run = nb.run
    kernel_id = nb.current_kernel_id()
    cpu = nb.server.kernel_cpu_seconds(kernel_id)
    if cpu is not None:
        run.timings["kernel_cpu"] = round(cpu, 1)
    try:
        if artifacts is not None:
            print(f"\n{run.path}: seconds {run.timings}")
            (artifacts / f"{artifact_stem(run.path)}-console.log").write_text(
                "\n".join(run.console + ["--- uncaught page errors ---"] + run.page_errors) + "\n")
    finally:
        nb.server.shutdown_kernel(kernel_id)  # each tutorial's kernel holds a model; free it now
        nb.page.context.close()


@contextlib.contextmanager
def opened(rel: str, server, browser, artifacts, *, run_timeout: float, action_timeout: float, shots: list,
           started: LabNotebook | None = None, then=None, outputs_to: Path | None = None):
    """Notebook `rel` opened and run with Run All (`started`: one that `start` opened before), yielded once done.

    `then()` is called as soon as the run has finished (the suite starts the next notebook there, so its
    kernel computes while this one is checked). A screenshot is taken after the run and again at the end if
    the panels were used; the browser console is saved next to them; the kernel is shut down and the page
    closed on the way out. With `outputs_to` (`make screenshots`), the page after the run and each of its rich
    outputs are also saved as outputs_to/<notebook>/page.png and cellNN-K.png.
    """
    stem = artifact_stem(rel)
    nb = started or start(rel, server, browser, action_timeout=action_timeout)
    run = nb.run

    def shot(name: str) -> None:
        try:
            path = nb.screenshot(artifacts / f"{stem}{name}.png")
        except Exception as e:  # a screenshot must not hide the real result
            run.console.append(f"screenshot failed: {e}")
            return
        run.screenshots.append(path)
        shots.append(path)
        print(f"\nscreenshot of {rel}: {path}")

    try:
        if run.problem is None:
            try:
                nb.wait_run(run_timeout)
            except Exception as e:  # reported by the tests (with the screenshot), not as a fixture error
                run.problem = run.problem or f"{type(e).__name__}: {clean(str(e), 600)}"
        if then is not None:
            then()
        shot("")
        if outputs_to is not None:
            keep_outputs(nb, outputs_to / shots_name(rel), artifacts / f"{stem}.png")
        yield nb
        if nb.interacted:
            shot("-after-interaction")
    finally:
        close(nb, artifacts)


def keep_outputs(nb: LabNotebook, folder: Path, page_shot: Path) -> None:
    """The page's screenshot as folder/page.png and one PNG per rich output (LabNotebook.screenshot_outputs)."""
    try:
        paths = nb.screenshot_outputs(folder)
        (folder / "page.png").unlink(missing_ok=True)
        if page_shot.exists():
            shutil.copyfile(page_shot, folder / "page.png")
    except Exception as e:  # a screenshot must not hide the real result
        nb.run.console.append(f"output screenshots failed: {e}")
        return
    print(f"\n{nb.run.path}: {len(paths)} output screenshots in {folder}")


def run_problems(nb: LabNotebook) -> list[str]:
    """Run All finished, every code cell has an execution count, no error from the kernel or the page."""
    run = nb.run
    if not run.finished:
        return [f"Run All did not finish: {run.problem}"]
    cells = nb.inspect()
    # nbmake's convention: a cell tagged raises-exception is meant to raise (JupyterLab then runs on, too)
    expected = {(o["ename"], o["evalue"]) for c in cells if "raises-exception" in c["tags"]
                for o in c["outputs"] if o["type"] == "error"}
    errors = [e for e in run.kernel_errors if (e["ename"], e["evalue"]) not in expected]
    problems = [f"kernel error {e['ename']}: {e['evalue']}\n{clean(e['traceback'])}" for e in errors]
    for c in cells:
        for o in c["outputs"]:
            if o["type"] == "error" and not errors and "raises-exception" not in c["tags"]:  # normally seen on IOPub
                problems.append(f"cell {c['index']} shows {o['ename']}: {o['evalue']}")
    not_run = [c["index"] for c in run.state["cells"] if c["count"] is None]
    if not_run:
        problems.append(f"cells without an execution count after Run All: {not_run}")
    problems += [f"uncaught JavaScript error in the page: {clean(e, 600)}" for e in run.page_errors]
    return problems


def render_problems(nb: LabNotebook) -> tuple[list[str], int, int]:
    """Every plotly output is drawn with marks, every widget output is a visible widget view; (problems, plots, views)."""
    problems, n_plots, n_views = [], 0, 0
    for c in nb.inspect():
        where = f"cell {c['index']}"
        if len(c["shown"]) != len(c["outputs"]):
            problems.append(f"{where}: the model has {len(c['outputs'])} outputs, the page shows {len(c['shown'])}")
            continue
        for o, s in zip(c["outputs"], c["shown"]):
            if s["broken"]:
                problems.append(f"{where}: {s['broken']}")
            if PLOTLY in o["mimes"] and not s["plots"]:
                problems.append(f"{where}: a plotly figure output with no .js-plotly-plot in the page")
            for p in s["plots"]:
                n_plots += 1
                if not p["svg"] or p["size"][0] < 50 or p["size"][1] < 50:
                    problems.append(f"{where}: plot {p['title']!r} not drawn (svg {p['svg']}, size {p['size']})")
                elif p["traces"] == 0 or p["marks"] == 0:
                    problems.append(f"{where}: plot {p['title']!r} drawn empty ({p['traces']} traces, {p['marks']} marks)")
                elif p["visible"] < 0.25 * p["size"][0]:
                    problems.append(f"{where}: plot {p['title']!r} is off to the side: {p['visible']} of its {p['size'][0]} px "
                                    f"are in view in a {VIEWPORT['width']} px wide window (the rest is clipped by its container)")
            if WIDGET in o["mimes"]:
                n_views += 1
                if not s["widget"] or s["size"][1] < 5:
                    problems.append(f"{where}: widget output not shown as a widget view (size {s['size']}, "
                                    f"text {s['text'][:160]!r})")
    problems += [f"browser console: {clean(line, 400)}" for line in nb.run.console if BROKEN_CONSOLE.search(line)]
    return problems, n_plots, n_views


def interaction_report(results: list[dict], own_cell: bool = False) -> tuple[list[str], str]:
    """(problems, one line per control) from LabNotebook.interact's results; own_cell: a control must change
    something in its own cell (its panel), not only elsewhere on the page."""
    lines, problems = [], []
    for r in results:
        what = f"{r['kind']} {r['label']!r}"
        lines.append(f"  {what}: {r['action']} -> "
                     + (f"changed {', '.join(r['changed'])}" if r["changed"] else "NOTHING changed"))
        raised: dict[str, int] = {}  # one line per distinct error, with a count (a slider fires once per step)
        for e in r["errors"]:
            key = f"{e['ename']}: {e['evalue']}"
            raised[key] = raised.get(key, 0) + 1
        lines += [f"    error {k}" + (f" (x{n})" if n > 1 else "") for k, n in raised.items()]
        if not r["changed"]:
            problems.append(f"{what} changed nothing in the page")
        elif own_cell and not any(part.startswith(f"cell {r['cell']} ") for part in r["changed"]):
            problems.append(f"{what} (cell {r['cell']}) changed only other cells: {', '.join(r['changed'])}")
        problems += [f"{what} raised {k}" for k in raised]
    return problems, "\n".join(lines)


def layout_problems(nb: LabNotebook, n_shown: int = 4) -> list[str]:
    """The text in the outputs can be read: none runs out of a box that neither scrolls nor clips it, none lies on
    other text, no plot's legend covers its title or a subplot title (what is measured: pagejs.JS_LAYOUT)."""
    m = nb.layout()
    problems = [f"cell {o['cell']}: text runs out of its box: {o['what']} is {o['box']} px wide and its content "
                f"{o['width']} px ({o['text']!r})" for o in m["overflows"]]
    pairs: dict[tuple[int, int], list[dict]] = {}
    for o in m["overlaps"]:
        pairs.setdefault((o["cell"], o["other"]), []).append(o)
    for (a, b), found in pairs.items():
        shown = "; ".join(f"{o['a']!r} and {o['b']!r} ({o['size'][0]} x {o['size'][1]} px)" for o in found[:n_shown])
        more = f"; and {len(found) - n_shown} more pairs" if len(found) > n_shown else ""
        problems.append(f"{f'cell {a}' if a == b else f'cells {a} and {b}'}: text lies on other text: {shown}{more}")
    problems += [f"cell {o['cell']}: plot {o['plot']!r}: the legend covers the {o['covers']} {o['text']!r} "
                 f"({o['size'][0]} x {o['size'][1]} px)" for o in m["legends"]]
    return problems
