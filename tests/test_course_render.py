"""The course's notebooks: committed renders match their masters, the renders keep and fold the right cells, and both
run top to bottom: the solutions with every check passing, the student's with every check printing exactly its one
`not implemented yet` line (executed here with nbclient, as nbmake would).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import re
import shutil
import time

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from test_notebooks_sync import import_problems

from nbfeatures.course import NOT_IMPLEMENTED

ROOT = pathlib.Path(__file__).resolve().parents[1]
COURSE = ROOT / "course"
MASTERS = sorted((COURSE / "masters").glob("*.py"))
SOLUTION_SECONDS = 120  # each solutions notebook on 2 CPU cores

_spec = importlib.util.spec_from_file_location("render_course", ROOT / "dev" / "render_course.py")
render_course = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_course)


def tags(cell) -> list[str]:
    return list(cell.metadata.get("tags", []))


def chapter_of(nb: nbformat.NotebookNode):
    """(chapter module, the name the notebook calls it by), from its import cell."""
    first = next(c for c in nb.cells if c.cell_type == "code")
    for node in ast.parse(first.source).body:
        if isinstance(node, ast.ImportFrom) and node.module == "nbfeatures.course":
            alias = node.names[0]
            return importlib.import_module(f"nbfeatures.course.{alias.name}"), alias.asname or alias.name
    raise AssertionError("the first code cell must import the chapter: from nbfeatures.course import chN_topic as chN")


def checked(nb: nbformat.NotebookNode) -> list[tuple[nbformat.NotebookNode, object]]:
    """Each check cell with the exercise it checks."""
    module, alias = chapter_of(nb)
    out = []
    for cell in nb.cells:
        if "check" in tags(cell):
            m = re.fullmatch(rf"{alias}\.check_(\w+)\((\w+)\)", cell.source.strip())
            assert m, f"a check cell holds one call, {alias}.check_<name>(<name>); got {cell.source!r}"
            out.append((cell, getattr(module, f"check_{m[1]}").exercise))
    return out


# ----------------------------------------------------------------------------- rendering


def test_there_is_a_master_per_render_and_the_committed_renders_are_current():
    assert MASTERS, "no masters in course/masters"
    stale = render_course.stale()
    assert stale == [], "\n".join(stale)


def test_rendering_is_deterministic_with_stable_unique_cell_ids():
    for master in MASTERS:
        first, second = render_course.render(master), render_course.render(master)
        assert first == second
        for variant, text in first.items():
            ids = [c.id for c in nbformat.reads(text, as_version=4).cells]
            assert len(set(ids)) == len(ids) and ids[0] == f"{variant}-000"


def _course_copy(tmp_path) -> pathlib.Path:
    copy = tmp_path / "course"
    shutil.copytree(COURSE, copy)
    return copy


def _edit_master(course):
    master = sorted((course / "masters").glob("*.py"))[0]
    master.write_text(master.read_text() + "\n# %% [markdown]\n# A paragraph added to the master and never rendered.\n")
    return [f"student/{master.stem}.ipynb is stale", f"solutions/{master.stem}.ipynb is stale"]


def _edit_render(course):
    render = sorted((course / "student").glob("*.ipynb"))[0]
    nb = nbformat.read(render, as_version=4)
    nb.cells[0].source += " (edited in the render)"
    nbformat.write(nb, render)
    return [f"student/{render.stem}.ipynb is stale"]


def _delete_render(course):
    render = sorted((course / "solutions").glob("*.ipynb"))[0]
    render.unlink()
    return [f"solutions/{render.stem}.ipynb is missing"]


def _orphan_render(course):
    shutil.copy(sorted((course / "student").glob("*.ipynb"))[0], course / "student" / "99_gone.ipynb")
    return ["student/99_gone.ipynb has no master"]


@pytest.mark.parametrize("plant", [_edit_master, _edit_render, _delete_render, _orphan_render], ids=lambda f: f.__name__[1:])
def test_a_planted_stale_render_is_detected(tmp_path, plant):
    course = _course_copy(tmp_path)
    assert render_course.stale(course) == []
    expected = plant(course)
    found = render_course.stale(course)
    assert len(found) == len(expected), found
    for want, got in zip(expected, found):
        assert want in got and "make course" in got or "no master" in got, got
    render_course.write(course)  # what `make course` does
    assert render_course.stale(course) == ([] if plant is not _orphan_render else found)


def test_renders_keep_fold_and_drop_the_right_cells():
    for master_path in MASTERS:
        master = jupytext.read(master_path)
        texts = render_course.render(master_path)
        student, solutions = (nbformat.reads(texts[v], as_version=4) for v in ("student", "solutions"))
        for nb in (student, solutions):
            assert all(c.cell_type == "markdown" or (not c.outputs and c.execution_count is None) for c in nb.cells)
            assert all(f"<details><summary>Hint</summary>\n\n{c.source.strip()}\n\n</details>" in [d.source for d in nb.cells]
                       for c in master.cells if "hint" in tags(c))  # fmt: skip
            assert [c.source for c in nb.cells if "check" in tags(c)] == [c.source for c in master.cells if "check" in tags(c)]
        stubs = [c.source for c in master.cells if "stub" in tags(c)]
        solved = [c.source for c in master.cells if "solution" in tags(c)]
        assert stubs and solved
        assert [c.source for c in student.cells if c.cell_type == "code" and "stub" in tags(c)] == stubs
        assert not any(c.cell_type == "code" and "solution" in tags(c) for c in student.cells)
        folded = [c.source for c in student.cells if c.cell_type == "markdown" and "solution" in tags(c)]
        assert folded == [f"<details><summary>Solution</summary>\n\n```python\n{s.strip()}\n```\n\n</details>" for s in solved]
        assert [c.source for c in solutions.cells if c.cell_type == "code" and "solution" in tags(c)] == solved
        assert not any("stub" in tags(c) for c in solutions.cells)
        assert all("raise NotImplementedError" in s for s in stubs)


@pytest.mark.parametrize("source, expected", [
    ('# %% tags=["answer"]\nx = 1\n', "unknown tag 'answer'"),
    ('# %% tags=["hint"]\nx = 1\n', "tag 'hint' belongs on a markdown cell"),
    ('# %% tags=["stub"]\ndef f():\n    raise NotImplementedError\n', "the stub defines ['f'] and no solution cell defines them all"),
])  # fmt: skip
def test_a_master_with_bad_tags_is_refused(tmp_path, source, expected):
    path = tmp_path / "00_bad.py"
    path.write_text(source)
    with pytest.raises(ValueError, match=re.escape(expected)):
        render_course.render(path)


@pytest.mark.parametrize("master", MASTERS, ids=lambda p: p.stem)
def test_a_master_states_each_exercise_of_its_chapter_once(master):
    nb = jupytext.read(master)
    assert nb.cells[0].source.startswith("# ") and "\n> " in nb.cells[0].source, "a chapter opens with '# Title' and '> subtitle'"
    assert import_problems(nb) == []
    module, _ = chapter_of(nb)
    checks = [ex for _, ex in checked(nb)]
    assert [ex.id for ex in checks] == list(module.chapter.exercises), "one check cell per exercise, in the chapter's order"
    headings = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for ex in checks:
        dots = "●" * ex.difficulty + "○" * (3 - ex.difficulty)
        assert re.search(rf"^## {re.escape(ex.id)} ", headings, re.M), f"no heading '## {ex.id} ...' in {master.name}"
        assert f"**Difficulty** {dots} · **about {ex.minutes} minutes**" in headings, (ex, master.name)
    assert "CourseProgress(" in next(c for c in nb.cells if c.cell_type == "code").source


# ----------------------------------------------------------------------------- running the renders


def execute(path: pathlib.Path, cwd: pathlib.Path) -> tuple[nbformat.NotebookNode, float]:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb, time.perf_counter() - start


def printed(cell) -> list[tuple[str, str]]:
    return [(o.output_type, o.get("name", "") + ":" + o.get("text", "")) for o in cell.outputs]


def check_problems(nb: nbformat.NotebookNode, expect: str) -> list[str]:
    """What is wrong with an executed render's check cells: each must print exactly its one line, `passed (...)` in the
    solutions (expect="passed") or `not implemented yet` in the student's (expect="todo"), and no cell may hold an error."""
    module, _ = chapter_of(nb)
    cells = checked(nb)
    out = [] if [ex.id for _, ex in cells] == list(module.chapter.exercises) else ["the check cells do not cover the chapter's exercises"]
    for cell, ex in cells:
        line = rf"{re.escape(ex.label)}: passed \(.+\)" if expect == "passed" else re.escape(NOT_IMPLEMENTED.format(label=ex.label))
        shown = printed(cell)
        if len(shown) != 1 or not re.fullmatch(rf"stdout:{line}\n", shown[0][1]) or shown[0][0] != "stream":
            out.append(f"check {ex.label} printed {shown}")
    out += [f"cell {i} raised {o.ename}" for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    return out


def test_check_problems_catches_a_second_line_a_traceback_and_a_missing_check():
    nb = nbformat.read(COURSE / "student" / f"{MASTERS[0].stem}.ipynb", as_version=4)
    cells = checked(nb)
    for cell, ex in cells:
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=NOT_IMPLEMENTED.format(label=ex.label) + "\n")]
    assert check_problems(nb, "todo") == []
    assert len(check_problems(nb, "passed")) == len(cells)
    cells[0][0].outputs.append(nbformat.v4.new_output("stream", name="stderr", text="Loading weights: 100%\n"))
    cells[1][0].outputs = [nbformat.v4.new_output("error", ename="CheckFailed", evalue="1.2 ...", traceback=[])]
    nb.cells.remove(cells[2][0])
    problems = check_problems(nb, "todo")
    assert "the check cells do not cover the chapter's exercises" in problems and any("Loading weights" in p for p in problems)
    assert any("raised CheckFailed" in p for p in problems) and any(f"check {cells[1][1].label} printed" in p for p in problems)


@pytest.mark.parametrize("master", MASTERS, ids=lambda p: p.stem)
def test_the_solutions_notebook_runs_with_every_check_passing(master, tmp_path, record_property):
    nb, seconds = execute(COURSE / "solutions" / f"{master.stem}.ipynb", tmp_path)  # a failing cell raises here
    record_property("seconds", round(seconds, 1))
    print(f"{master.stem} solutions: {seconds:.1f} s")
    assert check_problems(nb, "passed") == []
    assert seconds < SOLUTION_SECONDS, f"{master.stem} solutions took {seconds:.0f} s, more than {SOLUTION_SECONDS} s"


@pytest.mark.parametrize("master", MASTERS, ids=lambda p: p.stem)
def test_the_student_notebook_runs_with_every_check_not_implemented(master, tmp_path):
    nb, seconds = execute(COURSE / "student" / f"{master.stem}.ipynb", tmp_path)  # a failing cell raises here
    print(f"{master.stem} student: {seconds:.1f} s")
    assert check_problems(nb, "todo") == []
