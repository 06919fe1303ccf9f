"""Helpers the course checker tests share (tests/test_course*.py): the masters' solutions, and a check that fails naming a mistake."""

from __future__ import annotations

import pathlib

import jupytext
import pytest
import torch

import nbfeatures as nbf
from nbfeatures.course import CheckFailed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def master_solutions(stem: str, **names) -> dict:
    """The solution cells of course/masters/<stem>.py executed (with torch, nbf and `names` in scope): its functions."""
    master = jupytext.read(ROOT / "course" / "masters" / f"{stem}.py")
    namespace = {"torch": torch, "nbf": nbf, **names}
    for cell in master.cells:
        if "solution" in cell.metadata.get("tags", []):
            exec(compile(cell.source, f"{stem}.py solution", "exec"), namespace)
    return namespace


def fails(check, fn) -> CheckFailed:
    with pytest.raises(CheckFailed) as info:
        check(fn)
    return info.value


def named(check, fn, words: str, where: str = "\n    (on ") -> CheckFailed:
    """The check fails on `fn` and names the known mistake whose name contains `words`; `where` starts its second line."""
    err = fails(check, fn)
    assert err.mistake is not None and words in err.mistake.name, str(err)
    assert str(err).startswith(check.exercise.label + ": " + err.mistake.name + ": " + err.mistake.fix), str(err)
    assert where in str(err), str(err)  # the second line says on which case
    return err


def stub(*args):
    raise NotImplementedError


def passes_and_stub_says_so(check, solution, capsys) -> None:
    """The reference passes, printing one line `label: passed (...)` and nothing on stderr; a stub prints exactly
    `label: not implemented yet`; the exercise's status follows each."""
    check(solution)
    out = capsys.readouterr()
    assert out.out.startswith(f"{check.exercise.label}: passed (") and out.out.count("\n") == 1 and out.err == "", out
    assert check.exercise.status == "passed"
    check(stub)
    assert capsys.readouterr().out == f"{check.exercise.label}: not implemented yet\n"
    assert check.exercise.status == "not implemented"
