"""The machinery every chapter's checkers share: comparisons that speak the student's terms, named mistakes, progress.

A checker runs the student's function next to the reference on fixed-seed inputs and edge cases and then either
prints one line (`1.2 attention_pattern: passed (...)`) or raises `CheckFailed`, whose first line names the known
mistake and its fix when the student's output matches one, and whose second line says where (the case, both
shapes or the first differing element). A stub that raises NotImplementedError prints one line,
`1.2 attention_pattern: not implemented yet`, and raises nothing, so a student notebook runs top to bottom.

Every result is recorded in `REGISTRY` (chapter key -> Chapter), which lives as long as the kernel: re-running a
cell re-records, re-importing a chapter keeps what was recorded. `CourseProgress` (nbfeatures.widgets) draws it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sysconfig
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

STATUSES = ("not tried", "not implemented", "failed", "passed")
NOT_IMPLEMENTED = "{label}: not implemented yet"  # the whole line a stub prints (tests assert exactly this)


class CheckFailed(AssertionError):
    """A check failed. `mistake` is the known mistake the student's output matched (None when none did)."""

    def __init__(self, message: str, *, mistake: Mistake | None = None, exercise: Exercise | None = None):
        super().__init__(message)
        self.mistake, self.exercise = mistake, exercise


@dataclass(frozen=True)
class Mistake:
    """A known wrong turn, in the student's terms: what they did (`name`) and what to do instead (`fix`).

    `wrong` is that mistaken implementation: called with the reference's arguments, it returns what a student who
    made the mistake would return, and `compare` names the mistake when the student's output matches it. A mistake
    without `wrong` is a diagnostic the checker tests itself and raises with `raise mistake.failed(where)`.
    """

    name: str  # "your TopK keeps negative pre-activations"
    fix: str  # "apply ReLU after topk"
    wrong: Callable[..., Any] | None = None

    def failed(self, where: str = "") -> CheckFailed:
        return CheckFailed(f"{self.name}: {self.fix}" + (f"\n    ({where})" if where else ""), mistake=self)


# ----------------------------------------------------------------------------- comparing outputs


def _as_tensor(got: Any, want: Tensor) -> Tensor:
    if isinstance(got, Tensor):
        return got.detach().cpu()
    if isinstance(got, (tuple, list)) and got and all(isinstance(g, Tensor) for g in got):
        raise CheckFailed(f"your function returned a {type(got).__name__} of {len(got)} tensors (shapes "
                          f"{[list(g.shape) for g in got]}); expected one tensor of shape {list(want.shape)}")  # fmt: skip
    try:
        return torch.as_tensor(got).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise CheckFailed(f"your function returned {type(got).__name__} {got!r:.60}; expected a torch.Tensor of "
                          f"shape {list(want.shape)}") from None  # fmt: skip


def _close(a: Tensor, b: Tensor, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and bool(torch.isclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True).all())


def difference(got: Tensor, want: Tensor, *, atol: float = 1e-5, rtol: float = 1e-4) -> str:
    """Where `got` departs from `want`: both shapes, or the first differing element (row-major) and how many differ."""
    if got.shape != want.shape:
        note = ""
        if sorted(got.shape) == sorted(want.shape):
            note = ": the same sizes in another order (a transpose or a reshape where you meant a permute?)"
        elif got.dim() < want.dim():
            note = ": a dimension is missing (did you index or reduce one away?)"
        elif got.dim() > want.dim():
            note = ": one dimension too many (a head, batch or position left in?)"
        return f"your output has shape {list(got.shape)}, the reference {list(want.shape)}{note}"
    g, w = got.double(), want.double()
    bad = ~torch.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    idx = [int(i) for i in bad.nonzero()[0]]
    where = tuple(idx)
    n, total = int(bad.sum()), bad.numel()
    gap = (g - w).abs().nan_to_num(float("inf")).max().item()
    return (f"first difference at {list(idx)}: yours {g[where].item():.6g}, the reference {w[where].item():.6g} "
            f"({n} of {total} elements differ; largest gap {gap:.3g})")  # fmt: skip


def compare(got: Any, want: Tensor, *, case: str, args: Sequence[Any] = (), mistakes: Sequence[Mistake] = (),
            atol: float = 1e-5, rtol: float = 1e-4) -> None:  # fmt: skip
    """Pass when `got` matches `want` (same shape, close values); otherwise raise CheckFailed.

    On a mismatch each mistake's `wrong(*args)` is computed (only then: mistakes cost nothing on a pass); the first
    whose output the student's matches, and the reference's does not, is named with its fix.
    """
    want = want.detach().cpu()
    got_t = _as_tensor(got, want)
    if _close(got_t, want, atol, rtol):
        return
    where = f"on {case}: {difference(got_t, want, atol=atol, rtol=rtol)}"
    for mistake in mistakes:
        if mistake.wrong is None:
            continue
        try:
            wrong = _as_tensor(mistake.wrong(*args), want)
        except Exception:  # a mistake that does not apply to this case (e.g. a layer past the last)
            continue
        if _close(got_t, wrong, atol, rtol) and not _close(wrong, want, atol, rtol):
            raise mistake.failed(where)
    raise CheckFailed(f"your output differs from the reference {where}")


# ----------------------------------------------------------------------------- calling the student's code


class _StubCalled(Exception):
    """The student's function raised NotImplementedError from their own code: the stub is still there."""


class _StudentRaised(Exception):
    def __init__(self, error: BaseException, case: str | None):
        super().__init__(error)
        self.error, self.case = error, case


_LIBRARY_DIRS = tuple({os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
                       *(sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib", "stdlib"))})  # fmt: skip


def _student_file(filename: str) -> bool:
    return not os.path.abspath(filename).startswith(_LIBRARY_DIRS)


def _raised_in_student_code(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and _student_file(tb.tb_frame.f_code.co_filename)


def is_student_code(fn: Any) -> bool:
    """Whether `fn` (a hook, say) was written by the student: defined outside the installed libraries and this package."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None:  # a callable object: judge by its class's call
        code = getattr(getattr(type(fn), "__call__", None), "__code__", None)
    return code is not None and _student_file(code.co_filename)


def call(fn: Any, *args: Any, case: str | None = None) -> Any:
    """Call the student's function. What it raises is reported as theirs; a NotImplementedError from their own code
    (the stub) makes the check print `not implemented yet`, one from deep inside a library is an ordinary error."""
    if not callable(fn):
        raise CheckFailed(f"expected your function, got {type(fn).__name__} {fn!r:.40}: pass the function itself "
                          "(its name, without parentheses)")  # fmt: skip
    try:
        return fn(*args)
    except NotImplementedError as e:
        if _raised_in_student_code(e):
            raise _StubCalled() from e
        raise _StudentRaised(e, case) from e
    except CheckFailed:
        raise
    except Exception as e:
        raise _StudentRaised(e, case) from e


def student_hooks(model: Any) -> dict[tuple[int, int, int], tuple]:
    """Every forward hook and pre-hook the student's code put on the model (transformers keeps hooks of its own)."""
    from .. import sites  # the methods layer may import sites; kept local so checking stays light to import

    found = {}
    for name, m in sites.unwrap(model).named_modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for hid, fn in hooks.items():
                if is_student_code(fn):
                    found[(id(m), id(hooks), hid)] = (name or "the model", hooks, hid)
    return found


def call_without_leaks(model: Any, fn: Any, *args: Any, case: str, left_hook: Mistake) -> Any:
    """`call(fn, model, *args)`; any hook it leaves on the model is removed, and reported as `left_hook` if it returned."""
    before = student_hooks(model)

    def remove_leaks() -> list[str]:
        leaked = {k: v for k, v in student_hooks(model).items() if k not in before}
        for _, hooks, hid in leaked.values():
            del hooks[hid]
        return sorted({name for name, _, _ in leaked.values()})

    try:
        out = call(fn, model, *args, case=case)
    except BaseException:
        remove_leaks()
        raise
    leaked = remove_leaks()
    if leaked:
        raise left_hook.failed(f"on {case}: left on {leaked}; removed now")
    return out


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Silence output, warnings and transformers' progress bars while a checker loads what it compares against."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _say(line: str) -> None:
    print(line)  # the one place the course talks: a checker's verdict is for the student to read


# ----------------------------------------------------------------------------- chapters, exercises, progress


@dataclass
class Exercise:
    """One exercise of a chapter, as its master notebook's heading states it."""

    id: str  # "1.2": the number in the heading
    name: str  # the function the student writes: "attention_pattern"
    goal: str  # one line
    difficulty: int  # 1 easy .. 3 hard
    minutes: int
    status: str = "not tried"  # the latest check's result in this kernel, one of STATUSES

    @property
    def label(self) -> str:
        return f"{self.id} {self.name}"


class Chapter:
    """A chapter's exercises and their latest results in this kernel. Calling it gives the rows a progress panel
    draws: [(\"1.1 read_resid: goal\", status), ...]; `subscribe(fn)` calls fn() after every recorded result."""

    def __init__(self, key: str, title: str):
        self.key, self.title = key, title
        self.exercises: dict[str, Exercise] = {}
        self._listeners: list[weakref.ref] = []

    def __call__(self) -> list[tuple[str, str]]:
        return [(f"{e.label}: {e.goal}", e.status) for e in self.exercises.values()]

    def __repr__(self) -> str:
        done = sum(e.status == "passed" for e in self.exercises.values())
        return f"Chapter({self.key!r}, {self.title!r}: {done} of {len(self.exercises)} passed)"

    def passed(self) -> dict[str, bool]:
        return {e.label: e.status == "passed" for e in self.exercises.values()}

    def reset(self) -> None:
        for e in self.exercises.values():
            e.status = "not tried"
        self._notify()

    def subscribe(self, fn: Callable[[], Any]) -> None:
        """Call `fn()` after each result; held weakly (a bound method lives as long as its object)."""
        ref = weakref.WeakMethod(fn) if hasattr(fn, "__self__") else weakref.ref(fn)
        self._listeners.append(ref)

    def unsubscribe(self, fn: Callable[[], Any]) -> None:
        self._listeners = [ref for ref in self._listeners if ref() is not None and ref() != fn]

    def record(self, exercise: Exercise, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        exercise.status = status
        self._notify()

    def _notify(self) -> None:
        alive = []
        for ref in self._listeners:
            fn = ref()
            if fn is not None:
                alive.append(ref)
                fn()
        self._listeners = alive

    def exercise(self, id: str, name: str, *, goal: str, difficulty: int, minutes: int):
        """Decorate a checker `checker(student, ...) -> str | None` (a detail for the success line) into `check_<name>`.

        The checker calls the student's code through `call` and compares with `compare`; this wrapper turns the
        outcome into one printed line or a CheckFailed that starts with the exercise's label, and records it.
        """
        if difficulty not in (1, 2, 3) or not isinstance(minutes, int) or minutes < 1:
            raise ValueError(f"exercise {id}: difficulty must be 1, 2 or 3 and minutes an int >= 1, got {difficulty!r}, {minutes!r}")
        ex = self.exercises.setdefault(id, Exercise(id, name, goal, difficulty, minutes))
        ex.name, ex.goal, ex.difficulty, ex.minutes = name, goal, difficulty, minutes  # a re-import keeps the result

        def decorate(checker: Callable[..., str | None]) -> Callable[..., None]:
            @functools.wraps(checker)
            def check(student: Any, *args: Any, **kwargs: Any) -> None:
                try:
                    detail = checker(student, *args, **kwargs)
                except _StubCalled:
                    self.record(ex, "not implemented")
                    _say(NOT_IMPLEMENTED.format(label=ex.label))
                    return
                except CheckFailed as e:
                    self.record(ex, "failed")
                    e.args, e.exercise = (f"{ex.label}: {e.args[0]}",), ex
                    raise e.with_traceback(None) from None  # the student's cell, not the checker's insides
                except _StudentRaised as e:
                    self.record(ex, "failed")
                    on = f" on {e.case}" if e.case else ""
                    raise CheckFailed(f"{ex.label}: your {ex.name} raised {type(e.error).__name__}{on}: {e.error}",
                                      exercise=ex) from e.error  # fmt: skip
                self.record(ex, "passed")
                _say(f"{ex.label}: passed" + (f" ({detail})" if detail else ""))

            check.exercise = ex
            return check

        return decorate


REGISTRY: dict[str, Chapter] = {}  # chapter key -> Chapter, for the life of the kernel


def register(key: str, title: str) -> Chapter:
    """The chapter registered under `key`, created on first use (a re-import gets the same one, results kept)."""
    if key not in REGISTRY:
        REGISTRY[key] = Chapter(key, title)
    REGISTRY[key].title = title
    return REGISTRY[key]
