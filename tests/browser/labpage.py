"""Drive one notebook in a JupyterLab page: open it, run every cell, read what the page shows, poke its panels.

The page is read as a user sees it (rendered outputs, drawn plots, widget views), with two reads
of JupyterLab's own state through `window.jupyterapp` (LabApp.expose_app_in_browser): each code
cell's execution count / state, and every `error` message the kernel publishes on IOPub. The
latter catches what the DOM cannot tell from stderr: a traceback in a cell, inside an Output
widget, or from a widget callback that JupyterLab sends to its log console.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .pagejs import (JS_ERRORS, JS_INSPECT, JS_KERNEL_ID, JS_LAYOUT, JS_MARK_OUTPUTS, JS_OPENED, JS_RUN_ALL, JS_SCROLL_TOP,
                     JS_SETUP, JS_SNAPSHOT, JS_STATE)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCREENSHOTS: list[str] = []  # written by the notebook fixture, listed by conftest's terminal summary


def notebooks() -> list[Path]:
    """The tutorials, then the fixture notebooks that exercise the interaction checks themselves."""
    return sorted((REPO / "notebooks").glob("*.ipynb")) + sorted((HERE / "fixtures").glob("*.ipynb"))


def missing_modules(path: Path) -> list[str]:
    """Modules a fixture notebook needs (metadata nbfeatures_browser.requires) that this checkout lacks:
    a panel another branch is still writing; its notebook is skipped until the module lands."""
    meta = json.loads(path.read_text()).get("metadata", {}).get("nbfeatures_browser", {})
    out = []
    for name in meta.get("requires", []):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a missing parent package
            found = False
        if not found:
            out.append(name)
    return out


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Browser console lines that mean a panel failed to render.
BROKEN_CONSOLE = re.compile(r"Error displaying widget|Could not create (a )?view|Failed to (load|create)|"
                            r"Class \S+ not found in (module|registry)|No version of module", re.IGNORECASE)

# Buttons the generic strategy clicks (no "Train", "Stop", "Delete" ...): ones that compute from the inputs
# around them, and ones that step through something.
COMPUTE_LABEL = re.compile(r"^\s*(generate|run|apply|update|show|sample|force|go)\b", re.IGNORECASE)
STEP_LABEL = re.compile(r"^\s*(step|next|prev(ious)?|append|add|more)\b|[◀▶←→‹›]", re.IGNORECASE)


@dataclass
class NotebookRun:
    """What one notebook's run in the page produced; filled in by `LabNotebook.run_all`."""

    path: str
    finished: bool = False
    seconds: float = 0.0
    state: dict = field(default_factory=dict)
    cells: list = field(default_factory=list)
    kernel_errors: list = field(default_factory=list)
    page_errors: list = field(default_factory=list)
    console: list = field(default_factory=list)
    screenshots: list = field(default_factory=list)
    problem: str | None = None  # why the run did not finish, if it did not
    timings: dict = field(default_factory=dict)  # seconds: open, run, interact, screenshots


def clean(text: str, n: int = 1200) -> str:
    text = ANSI.sub("", text or "")
    return text if len(text) <= n else text[: n // 3] + "\n[...]\n" + text[-2 * n // 3:]


def changed_parts(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


class LabNotebook:
    """One notebook open in its own page."""

    def __init__(self, page, server, path: str, run: NotebookRun):
        self.page, self.server, self.path, self.run = page, server, path, run
        self.interacted = False
        self.kernel_id: str | None = None
        self._run_t0: float | None = None
        page.on("console", lambda m: run.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: run.page_errors.append(str(e)))

    # -- opening and running -------------------------------------------------------------------
    def open(self, workspace: str, timeout_s: float) -> dict:
        t0 = time.monotonic()
        self.page.goto(self.server.url(f"lab/workspaces/{workspace}/tree/{self.path}"), wait_until="domcontentloaded")
        self.page.wait_for_function(JS_OPENED, timeout=timeout_s * 1000, polling=250)
        info = self.page.evaluate(JS_SETUP)
        self.kernel_id = info.get("kernelId")
        self.run.timings["open"] = round(time.monotonic() - t0, 1)
        return info

    def current_kernel_id(self) -> str | None:
        """The page's kernel now (a restart keeps the id, a kernel change does not); the one seen at open otherwise."""
        try:
            self.kernel_id = self.page.evaluate(JS_KERNEL_ID) or self.kernel_id
        except Exception:  # the page is gone or broken: keep what open() saw
            pass
        return self.kernel_id

    def state(self) -> dict:
        return self.page.evaluate(JS_STATE)

    def busy(self, st: dict | None = None) -> bool:
        st = st or self.state()
        return st["kernel"] not in ("idle", "dead", "unknown") or any(c["state"] == "running" for c in st["cells"])

    def run_all(self, timeout_s: float) -> None:
        """Run > Run All Cells, then wait until it has finished (see `wait_run`)."""
        self.start_run()
        self.wait_run(timeout_s)

    def start_run(self) -> None:
        """Run > Run All Cells, without waiting: the kernel computes while the suite checks another page."""
        self._run_t0 = time.monotonic()
        self.page.evaluate(JS_RUN_ALL)

    def wait_run(self, timeout_s: float) -> None:
        """Wait (timeout_s from start_run) until the command has returned, the kernel is idle and no cell runs."""
        t0 = self._run_t0 if self._run_t0 is not None else time.monotonic()
        quiet = 0
        while time.monotonic() - t0 < timeout_s:
            st = self.run.state = self.state()
            if st["dialog"]:
                self.run.problem = f"a dialog opened in the page: {st['dialog'][:300]!r}"
                break
            if st["kernel"] == "dead":
                self.run.problem = "the kernel died (out of memory?)"
                break
            quiet = quiet + 1 if st["runDone"] and not self.busy(st) else 0
            if quiet >= 3:  # three polls in a row, so a comm round-trip after the last cell is not missed
                self.run.finished = True
                break
            time.sleep(0.5)
        else:
            running = [c["index"] for c in self.run.state.get("cells", []) if c["state"] == "running"]
            self.run.problem = f"still running after {timeout_s:.0f} s (cells running: {running})"
        self.run.seconds = time.monotonic() - t0
        self.settle(quiet_s=1.5)
        self.run.timings["run"] = round(time.monotonic() - t0, 1)
        self.run.kernel_errors = self.page.evaluate(JS_ERRORS)

    def settle(self, quiet_s: float = 1.0, max_s: float = 30.0) -> dict:
        """Wait until what the page shows stops changing (plotly and widget views draw asynchronously)."""
        t0, last, since = time.monotonic(), None, time.monotonic()
        snap = {}
        while time.monotonic() - t0 < max_s:
            snap = self.snapshot()
            if snap != last:
                last, since = snap, time.monotonic()
            elif time.monotonic() - since >= quiet_s and not self.busy():
                break
            time.sleep(0.25)
        return snap

    # -- reading the page ----------------------------------------------------------------------
    def inspect(self) -> list[dict]:
        return self.page.evaluate(JS_INSPECT)

    def snapshot(self) -> dict:
        return self.page.evaluate(JS_SNAPSHOT)

    def errors(self) -> list[dict]:
        return self.page.evaluate(JS_ERRORS)

    def layout(self) -> dict:
        return self.page.evaluate(JS_LAYOUT)

    @contextlib.contextmanager
    def tall(self, max_height: int = 12000):
        """The viewport made as tall as the notebook (same width), so every output is drawn in view; then restored."""
        size, t0 = self.page.viewport_size, time.monotonic()
        try:
            height = int(self.page.evaluate(JS_SCROLL_TOP)) + 60  # the last cell's bottom, + the status bar
            self.page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(height, max_height))})
            self.page.wait_for_timeout(700)  # plotly relayouts on resize
            yield
        finally:
            self.page.set_viewport_size(size)
            self.run.timings["screenshots"] = round(self.run.timings.get("screenshots", 0) + time.monotonic() - t0, 1)

    def screenshot(self, path) -> str:
        """The whole notebook in one picture."""
        with self.tall():
            self.page.screenshot(path=str(path))
        return str(path)

    def screenshot_outputs(self, folder: Path) -> list[str]:
        """A picture of each rich output (widget view, plot, HTML, image; not printed text), as
        folder/cellNN-K.png: cell NN of the notebook (counting every cell from 0), its Kth output."""
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("cell*.png"):  # from an earlier run, when the notebook had other outputs
            old.unlink()
        paths = []
        with self.tall():
            for name in self.page.evaluate(JS_MARK_OUTPUTS):
                path = folder / f"{name}.png"
                self.page.locator(f'[data-nbf-shot="{name}"]').screenshot(path=str(path))
                paths.append(str(path))
        return paths

    # -- interacting ---------------------------------------------------------------------------
    def _wait_change(self, before: dict, timeout_s: float, quiet_s: float = 2.0) -> list[str]:
        """Parts of the page that changed after an action; empty once the kernel has been idle for quiet_s
        with nothing changed (a callback that runs a model keeps it busy, so slow work is waited for)."""
        t0 = time.monotonic()
        idle_since = None
        while time.monotonic() - t0 < timeout_s:
            now = self.snapshot()
            if now != before:
                after = self.settle(max_s=timeout_s)
                return changed_parts(before, after) or changed_parts(before, now)
            t = time.monotonic()
            idle_since = None if self.busy() else (idle_since or t)
            if idle_since is not None and t - idle_since >= quiet_s and t - t0 >= 1.5 * quiet_s:
                return []
            time.sleep(0.25)
        return []

    def controls(self) -> list[dict]:
        """Every slider, compute or step button, toggle, text and number box in the outputs, inputs first:
        dicts of kind, label, cell (its index in the notebook) and loc (a Playwright locator)."""
        root = self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell-outputArea")
        found = []

        def add(kind: str, label: str, loc) -> None:
            cell = loc.evaluate("e => Array.from(e.closest('.jp-Notebook').querySelectorAll(':scope > .jp-Cell, "
                                ".jp-WindowedPanel-viewport > .jp-Cell')).indexOf(e.closest('.jp-Cell'))")
            found.append({"kind": kind, "label": label, "cell": cell, "loc": loc})

        handles = root.locator(".widget-slider .noUi-handle, .jupyter-widget-slider .noUi-handle")
        for i in range(handles.count()):
            h = handles.nth(i)
            label = h.locator("xpath=ancestor::*[contains(@class,'widget-slider')][1]//label").first
            add("slider", (label.inner_text() if label.count() else "").strip() or f"slider {i}", h)
        buttons = root.locator("button.jupyter-button")
        for i in range(buttons.count()):
            b = buttons.nth(i)
            text = (b.inner_text() or b.get_attribute("title") or "").strip()
            toggle = "widget-toggle-button" in (b.get_attribute("class") or "")
            if (toggle or COMPUTE_LABEL.search(text) or STEP_LABEL.search(text)) and b.is_enabled():
                add("toggle" if toggle else "compute" if COMPUTE_LABEL.search(text) else "button", text, b)
        for kind, sel in (("text", ".widget-text input[type=text], .widget-textarea textarea"),
                          ("number", ".widget-text input[type=number]")):
            boxes = root.locator(sel)
            for i in range(boxes.count()):
                box = boxes.nth(i)
                if box.is_editable():
                    label = box.get_attribute("placeholder") or ""
                    lab = box.locator("xpath=ancestor::*[contains(@class,'widget-inline-hbox')][1]/label").first
                    if lab.count():
                        label = lab.inner_text().strip() or label
                    add(kind, label or f"{kind} {i}", box)
        # inputs before the buttons that compute from them, as a user would (set a prompt, then Generate)
        order = ["slider", "toggle", "button", "text", "number", "compute"]
        return sorted(found, key=lambda c: order.index(c["kind"]))

    def poke(self, kind: str, loc, attempt: int) -> str:
        """One user action on a control; returns what was done, for the report."""
        loc.scroll_into_view_if_needed()
        if kind == "slider":
            def value() -> str | None:
                return loc.get_attribute("aria-valuenow")

            done, moved = self._keys(loc, ("ArrowRight", "ArrowLeft")[:: 1 if attempt == 0 else -1], 3, value, "on the handle")
            if not moved:  # noUiSlider's arrow keys can stick at either end of a range: tap the track instead
                before = value()
                track = loc.locator("xpath=ancestor::*[contains(@class,'noUi-target')][1]").bounding_box()
                x = track["x"] + track["width"] * (0.35 if attempt == 0 else 0.65)
                self.page.mouse.click(x, track["y"] + track["height"] / 2)
                self.page.wait_for_timeout(300)
                done += f", tapped the track at {35 if attempt == 0 else 65}% ({before} -> {value()})"
            return done
        if kind in ("button", "compute", "toggle"):
            loc.click()
            return "clicked"
        if kind == "text":
            word = ["e", "zqx"][attempt % 2]
            is_area = loc.evaluate("e => e.tagName") == "TEXTAREA"
            loc.click()
            if is_area:
                loc.press("End")
                loc.press_sequentially(" " + word, delay=30)
            else:
                loc.fill("")
                loc.press_sequentially(word, delay=30)
                loc.press("Enter")
            loc.press("Tab")  # blur: continuous_update=False boxes sync on Enter or blur
            return f"typed {word!r}"
        if kind == "number":
            loc.click()
            return self._keys(loc, ("ArrowUp", "ArrowDown")[:: 1 if attempt == 0 else -1], 1, loc.input_value,
                              "in the box", then=("Enter", "Tab"))[0]
        raise ValueError(kind)

    def _keys(self, loc, keys: tuple[str, str], n: int, value, where: str, then: tuple[str, ...] = ()) -> tuple[str, bool]:
        """Press keys[0] n times; if the value did not move (the end of its range), keys[1] instead."""
        before = after = value()
        loc.focus()
        pressed = []
        for key in keys:
            pressed.append(f"{key} x{n}")
            for _ in range(n):
                loc.press(key)
            for k in then:
                loc.press(k)
            self.page.wait_for_timeout(300)
            after = value()
            if after != before:
                break
        return f"pressed {', then '.join(pressed)} {where} ({before} -> {after})", after != before

    def interact(self, timeout_s: float) -> list[dict]:
        """Use every control once, in the order of `controls()`. One that changed nothing gets a second try after all the
        others, the other way (a slider at the end of its range, a number box at its max, a search that
        matched everything), and with the buttons of its cell that worked: a step button just after them
        (◀ at the start of a list, after ▶), an input followed by the compute button (a feature number,
        then Generate). Each result says what was done and what changed in the page."""
        self.interacted, t0 = True, time.monotonic()
        controls = self.controls()
        results = [self._one(i, c, 0, timeout_s) for i, c in enumerate(controls)]
        for i, r in enumerate(results):
            if r["changed"]:
                continue
            now = self.controls()
            if len(now) != len(controls):  # the panels rebuilt themselves; page order no longer matches
                continue
            c, worked = now[i], [now[o["index"]] for o in results if o["changed"] and o["cell"] == r["cell"]]
            before = [p for p in worked if c["kind"] == "button" and p["kind"] == "button"]
            after = [p for p in worked if c["kind"] in ("slider", "text", "number", "toggle") and p["kind"] == "compute"]
            again = self._one(i, c, 1, timeout_s, before, after)
            again["action"] = r["action"] + "; then " + again["action"]
            again["errors"] = r["errors"] + again["errors"]
            results[i] = again
        self.run.timings["interact"] = round(time.monotonic() - t0, 1)
        return results

    def _one(self, idx: int, c: dict, attempt: int, timeout_s: float, before: list = (), after: list = ()) -> dict:
        """Use control c (after clicking `before`, and clicking `after` too) and see what changes."""
        n_errors = len(self.errors())
        done = []
        for p in before:
            done.append(f"clicked {p['label']!r}")
            snap = self.settle(max_s=timeout_s)
            self.poke(p["kind"], p["loc"], 0)
            self._wait_change(snap, timeout_s)
        snap = self.settle(max_s=timeout_s)
        done.append(self.poke(c["kind"], c["loc"], attempt))
        for p in after:
            self._wait_change(snap, min(timeout_s, 5.0))  # the input reaches the kernel before the click
            done.append(f"clicked {p['label']!r}")
            self.poke(p["kind"], p["loc"], 0)
        changed = self._wait_change(snap, timeout_s)
        return {"index": idx, "kind": c["kind"], "label": c["label"], "cell": c["cell"],
                "action": ", ".join(done), "changed": changed, "errors": self.errors()[n_errors:]}

