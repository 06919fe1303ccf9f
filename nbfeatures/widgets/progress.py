"""A course chapter's exercises, each ticked once its checker has passed in this kernel.

    progress = CourseProgress(ch1.chapter)    # any callable returning [(exercise, status)], status a bool or a word
    progress                                  # redraws itself after every check when the source has .subscribe(fn)

The panel never imports the course (nor torch): it reads plain rows from the callable it was given, so the record
lives in the course's registry, and a panel made again by a re-run cell shows the same ticks. Statuses are the
checkers' words, "passed", "failed", "not implemented", "not tried"; True means passed, False or None not tried.
"""

from __future__ import annotations

import html
from typing import Callable, Sequence

import ipywidgets as ipw

MARKS = {"passed": ("✓", "#1a7f37"), "failed": ("✗", "#cf222e"), "not implemented": ("…", "#9a6700"), "not tried": ("○", "#6e7781")}
Rows = Sequence[tuple[str, "bool | str | None"]]


def as_status(state: bool | str | None) -> str:
    if state is True:
        return "passed"
    if state is False or state is None:
        return "not tried"
    if isinstance(state, str) and state in MARKS:
        return state
    raise ValueError(f"an exercise's status must be a bool, None or one of {list(MARKS)}; got {state!r}")


def progress_html(rows: Sequence[tuple[str, str]]) -> str:
    """One line per exercise: its mark (✓ passed, ✗ failed, … not implemented, ○ not tried), its name, its status."""
    lines = []
    for name, status in rows:
        mark, colour = MARKS[status]
        lines.append(f'<div><span style="color:{colour};font-weight:bold;display:inline-block;width:1.4em">{mark}</span>'
                     f'{html.escape(name)} <span style="color:#6e7781">({status})</span></div>')  # fmt: skip
    return "".join(lines) or "<div>no exercises</div>"


class CourseProgress(ipw.VBox):
    """The exercises of `rows()` with their marks; `refresh()` re-reads them (the source's subscribe calls it)."""

    def __init__(self, rows: Callable[[], Rows], *, title: str | None = None):
        if not callable(rows):
            raise TypeError(f"rows must be a callable returning [(exercise, status)] (e.g. a course chapter), got {type(rows).__name__}")
        self.source = rows
        self.title = title if title is not None else str(getattr(rows, "title", "Progress"))
        self.rows: list[tuple[str, str]] = []
        self.summary = ipw.HTML()
        self.table = ipw.HTML()
        self.refresh_button = ipw.Button(description="refresh", icon="refresh", layout=ipw.Layout(width="auto"))
        self.refresh_button.on_click(lambda _: self.refresh())
        self.header = ipw.HBox([self.summary, self.refresh_button])
        super().__init__([self.header, self.table])
        subscribe = getattr(rows, "subscribe", None)
        if callable(subscribe):
            subscribe(self.refresh)  # close() unsubscribes
        self.refresh()

    @property
    def passed(self) -> list[str]:
        return [name for name, status in self.rows if status == "passed"]

    def close(self) -> None:
        """Close the panel and its parts, and stop following the source (its `unsubscribe`, when it has one)."""
        unsubscribe = getattr(getattr(self, "source", None), "unsubscribe", None)  # None when __init__ refused its input
        if callable(unsubscribe):
            unsubscribe(self.refresh)
        for part in ("summary", "table", "refresh_button", "header"):
            if hasattr(self, part):
                getattr(self, part).close()
        super().close()

    def refresh(self) -> None:
        rows = [(str(name), as_status(state)) for name, state in self.source()]
        self.rows = rows
        self.summary.value = f"<b>{html.escape(self.title)}</b>: {len(self.passed)} of {len(rows)} passed"
        self.table.value = progress_html(rows)
