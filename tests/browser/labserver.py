"""A JupyterLab server for the browser tests: free localhost port, random token, isolated config.

Only the user-level config, data, runtime, settings and workspace folders are replaced by
temporary ones; the venv's share/jupyter (sys.prefix), where the ipywidgets, plotly and anywidget
lab extensions and the python3 kernel live, stays on the search path. Autosave is off, so running
a tutorial in the page never writes its outputs back into the repository.

The server runs in its own process group. Kernels are started by jupyter_client in sessions of
their own, so `stop()` also ends every descendant process it saw, by process id.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# JupyterLab settings a test run needs (user settings folder, one file per plugin).
LAB_SETTINGS = {
    # Never write a notebook back: outputs from the browser run must not land in git.
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False, "confirmClosingDocument": False},
    # Attach every cell to the DOM, so off-screen plots are drawn and can be checked.
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    # No news / update toasts over the page (and no requests to the internet).
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False,
                                                    "doNotDisturbMode": True},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time in clock ticks) of a process, from /proc (Linux); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every process below `pid`; the start time guards against a reused pid."""
    tree: dict[int, list[tuple[int, int]]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        st = _stat(int(d.name))
        if st is not None:
            tree.setdefault(st[0], []).append((int(d.name), st[2]))
    out, todo = set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.add(child)
            todo.append(child[0])
    return out


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


class LabServer:
    """`start()` returns once /api/status answers; `url(path)` adds the token; `stop()` is idempotent."""

    def __init__(self, root_dir: Path, work_dir: Path, log_path: Path, *, start_timeout: float = 120.0):
        self.root_dir, self.work_dir, self.log_path = Path(root_dir), Path(work_dir), Path(log_path)
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(24)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._seen: set[tuple[int, int]] = set()  # descendants (kernels) ever seen, ended by pid at stop()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base}/{path.lstrip('/')}{sep}token={self.token}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON"))}
        dirs = {name: self.work_dir / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for plugin, values in LAB_SETTINGS.items():
            f = dirs["settings"] / f"{plugin}.jupyterlab-settings"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(values))
        env.update(JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
                   JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
                   JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
                   PYTHONUNBUFFERED="1")
        # One torch thread per kernel: the suite runs the next notebook while it checks this one, and two
        # kernels of two threads each would fight over two cores.
        threads = os.environ.get("NBF_BROWSER_KERNEL_THREADS", "1")
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env.pop("BROWSER", None)
        return env

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
               "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly", "--ServerApp.open_browser=False"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        return cmd

    def start(self) -> LabServer:
        last_error = ""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")  # this session's log only
        for _ in range(3):  # a free port can be taken between picking and binding it
            self.port = free_port()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self.command(), cwd=self.root_dir, env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            atexit.register(self.stop)
            try:
                self._wait_ready()
                return self
            except RuntimeError as e:
                last_error = str(e)
                self.stop()
        raise RuntimeError(f"JupyterLab did not start: {last_error}; its log: {self.log_path}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"no answer on port {self.port} within {self.start_timeout:.0f} s")

    def api(self, method: str, path: str) -> object:
        req = urllib.request.Request(self.url(path), method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def remember_children(self) -> None:
        """Note the server's current descendants (kernels), so stop() can end them even after a SIGKILL."""
        if self.proc is not None:
            self._seen.update(descendants(self.proc.pid))

    def kernel_cpu_seconds(self, kernel_id: str | None) -> float | None:
        """CPU time (user + system) the kernel process has used so far, from /proc (Linux); None if not found."""
        if not kernel_id or self.proc is None:
            return None
        for pid, _ in descendants(self.proc.pid):
            try:
                if f"kernel-{kernel_id}.json" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    continue
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return None

    def shutdown_kernel(self, kernel_id: str | None) -> None:
        """Shut one kernel down (a notebook's, once it has been checked), leaving the others running."""
        self.remember_children()
        if not kernel_id:
            return
        try:
            self.api("DELETE", f"api/kernels/{kernel_id}")
        except (urllib.error.URLError, OSError, ValueError):
            pass

    def shutdown_kernels(self) -> None:
        """Ask the server to shut every kernel down (each tutorial's kernel holds a model in memory)."""
        self.remember_children()
        try:
            for k in self.api("GET", "api/kernels"):
                self.api("DELETE", f"api/kernels/{k['id']}")
        except (urllib.error.URLError, OSError, ValueError):
            pass

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        self._seen.update(descendants(proc.pid))
        if proc.poll() is None:
            try:  # SIGTERM: the server shuts its kernels down and exits
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        for pid, start in sorted(self._seen):  # kernels live in sessions of their own; end them by pid
            while _alive(pid, start) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._seen.clear()
