"""Real-browser tests: every tutorial notebook run in JupyterLab, in headless Chromium, driven by Playwright.

    make test-browser                       # or: .venv/bin/python -m pytest tests/browser -m browser
    pytest tests/browser --browser-artifacts=DIR -k quickstart

One JupyterLab server (free localhost port, random token, temporary config) and one Chromium
serve the whole session; each notebook gets a fresh page and its kernel is shut down after it.
Chromium is Debian's (`/usr/bin/chromium`, or $NBF_CHROMIUM); Playwright never downloads one.
Where Chromium, Playwright or JupyterLab is missing the tests skip with the reason, except in
CI (CI=true), where they fail with it. Screenshots go to --browser-artifacts (default
.pytest_cache/browser/); their paths are listed at the end of the run. With --browser-screenshots=DIR
(`make screenshots`) each notebook's page and each rich output also go to DIR/<notebook>/ as PNGs.

Environment: NBF_CHROMIUM (browser binary), NBF_BROWSER_RUN_TIMEOUT (seconds per notebook's
Run All, default 300), NBF_BROWSER_ACTION_TIMEOUT (seconds for the page to change after one
action, default 30), NBF_BROWSER_SCREENSHOTS (the same as --browser-screenshots).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from .labpage import REPO, SCREENSHOTS

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
    """Fail in CI, where the browser suite must run; skip on a developer machine that lacks a piece."""
    msg = f"browser tests cannot run: {reason}"
    if in_ci():
        pytest.fail(msg + " (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(msg)


def chromium_path() -> str | None:
    """$NBF_CHROMIUM when set (no fallback then), else Debian's /usr/bin/chromium or one on PATH."""
    cands = [os.environ["NBF_CHROMIUM"]] if os.environ.get("NBF_CHROMIUM") else \
        ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def pytest_addoption(parser):
    parser.addoption("--browser-artifacts", default=None,
                     help="folder for the browser tests' screenshots and logs (default .pytest_cache/browser)")
    parser.addoption("--browser-screenshots", default=None,
                     help="also save each notebook's page and each of its rich outputs as PNGs in DIR/<notebook>/ "
                          "(make screenshots)")


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: runs notebooks in JupyterLab in headless Chromium (make test-browser)")


def screenshots_dir(config) -> Path | None:
    """--browser-screenshots or $NBF_BROWSER_SCREENSHOTS (relative to the repository root); None when neither is set."""
    # getoption with a default: this conftest is not an "initial" one under `pytest tests`, so the option may be unregistered
    opt = config.getoption("--browser-screenshots", default=None) or os.environ.get("NBF_BROWSER_SCREENSHOTS")
    return None if not opt else (Path(config.rootpath) / opt).resolve()


def pytest_terminal_summary(terminalreporter, config):
    if SCREENSHOTS:
        terminalreporter.write_sep("-", "browser screenshots")
        for p in SCREENSHOTS:
            terminalreporter.write_line(p)
    folder = screenshots_dir(config)
    if folder is not None and folder.is_dir():
        n = len(list(folder.glob("*/*.png")))
        terminalreporter.write_line(f"{n} PNGs of the notebooks and their outputs in {folder}/<notebook>/")


@pytest.fixture(scope="session")
def browser_artifacts(pytestconfig) -> Path:
    # getoption with a default: this conftest is not an "initial" one under `pytest tests`, so the option may be unregistered
    opt = pytestconfig.getoption("--browser-artifacts", default=None) or os.environ.get("NBF_BROWSER_ARTIFACTS")
    path = Path(opt) if opt else Path(pytestconfig.rootpath) / ".pytest_cache" / "browser"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@pytest.fixture(scope="session")
def browser_screenshots(pytestconfig) -> Path | None:
    """Where `make screenshots` wants each notebook's page and outputs as PNGs (screenshots_dir); else None."""
    path = screenshots_dir(pytestconfig)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def lab_server(browser_artifacts):
    """JupyterLab on a free port, serving the repository root; stopped (process group and kernels) at the end."""
    if importlib.util.find_spec("jupyterlab") is None:
        unavailable("JupyterLab is not installed in this environment (pip install -e '.[lab]')")
    from .labserver import LabServer

    work = Path(tempfile.mkdtemp(prefix="nbf-lab-"))
    server = LabServer(REPO, work, browser_artifacts / "jupyterlab.log")
    # A SIGTERM (a CI job's timeout) becomes SystemExit, so this finally block and the atexit guard still run.
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main else None
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        if main:
            signal.signal(signal.SIGTERM, old)
    # autosave is off and nothing here saves: the server's log must show no save (a file hash would also catch
    # someone else editing a notebook in a shared working tree meanwhile, which is not this run's doing)
    log = (browser_artifacts / "jupyterlab.log").read_text(errors="replace")
    changed = sorted(set(re.findall(r"Saving file at (\S+)", log)))
    assert not changed, f"the browser run wrote into the repository's notebooks: {changed}"


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium through Playwright (no browser download, ever)."""
    if importlib.util.find_spec("playwright") is None:
        unavailable("the playwright package is not installed (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install playwright)")
    exe = chromium_path()
    if exe is None:
        where = f"NBF_CHROMIUM={os.environ['NBF_CHROMIUM']}" if os.environ.get("NBF_CHROMIUM") else "/usr/bin/chromium or on PATH"
        unavailable(f"no Chromium executable at {where} (Debian: apt-get install chromium; `make test-browser` does it)")
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        try:
            browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        except PlaywrightError as e:
            unavailable(f"Chromium at {exe} did not start: {str(e).splitlines()[0]}")
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()
