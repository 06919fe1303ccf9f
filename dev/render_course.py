"""Render the course: each master course/masters/NN_name.py becomes course/student/NN_name.ipynb and
course/solutions/NN_name.ipynb.

    python dev/render_course.py            # (re)write every render (`make course`)
    python dev/render_course.py --check    # exit 1, naming each stale, missing or orphaned render

A master is a jupytext percent script whose cell headers carry tags (`# %% tags=["stub"]`):
    stub      code: the student's starting point (raises NotImplementedError); student render only
    solution  code: the answer; the solutions render runs it, the student render shows it folded in <details>
    hint      markdown: folded in <details> in both renders
    check     code: the checker call, kept in both (tests/test_course_render.py reads its output)
Untagged cells go to both renders unchanged. Renders carry no outputs, and cell ids derived from the position, so
rendering twice writes the same bytes; tests/test_course_render.py fails while a committed render is stale.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import jupytext
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
COURSE = ROOT / "course"
VARIANTS = ("student", "solutions")
TAGS = {"stub": "code", "solution": "code", "hint": "markdown", "check": "code"}


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body.strip()}\n\n</details>"


def _defined(source: str) -> set[str]:
    return {n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def problems(master: nbformat.NotebookNode, name: str) -> list[str]:
    """What is wrong with a master's tags: unknown tags, a tag on the wrong kind of cell, a stub without its solution."""
    out, stubs, solutions = [], [], []
    for i, cell in enumerate(master.cells):
        tags = list(cell.metadata.get("tags", []))
        for tag in tags:
            if tag not in TAGS:
                out.append(f"{name} cell {i}: unknown tag {tag!r}; allowed are {sorted(TAGS)}")
            elif TAGS[tag] != cell.cell_type:
                out.append(f"{name} cell {i}: tag {tag!r} belongs on a {TAGS[tag]} cell, this is a {cell.cell_type} cell")
        if sum(t in ("stub", "solution", "hint") for t in tags) > 1:
            out.append(f"{name} cell {i}: at most one of stub, solution, hint per cell, got {tags}")
        if "stub" in tags and cell.cell_type == "code":
            stubs.append((i, _defined(cell.source)))
        if "solution" in tags and cell.cell_type == "code":
            solutions.append(_defined(cell.source))
    for i, names in stubs:
        if not names or not any(names <= s for s in solutions):
            out.append(f"{name} cell {i}: the stub defines {sorted(names)} and no solution cell defines them all")
    return out


def render(master_path: pathlib.Path) -> dict[str, str]:
    """variant -> the .ipynb text of that render of one master."""
    master = jupytext.read(master_path)
    bad = problems(master, master_path.name)
    if bad:
        raise ValueError("\n".join(bad))
    out = {}
    for variant in VARIANTS:
        cells = []
        for cell in master.cells:
            tags = list(cell.metadata.get("tags", []))
            meta = {"tags": tags} if tags else {}
            if "stub" in tags and variant == "solutions":
                continue
            if "solution" in tags and variant == "student":
                new = nbformat.v4.new_markdown_cell(_details("Solution", f"```python\n{cell.source.strip()}\n```"), metadata=meta)
            elif "hint" in tags:
                new = nbformat.v4.new_markdown_cell(_details("Hint", cell.source), metadata=meta)
            elif cell.cell_type == "code":
                new = nbformat.v4.new_code_cell(cell.source, metadata=meta)
            else:
                new = nbformat.v4.new_markdown_cell(cell.source, metadata=meta)
            new.id = f"{variant}-{len(cells):03d}"  # stable: a re-render writes the same bytes
            cells.append(new)
        nb = nbformat.v4.new_notebook(cells=cells, metadata={
            "kernelspec": dict(master.metadata.get("kernelspec", {"display_name": "Python 3", "language": "python", "name": "python3"})),
            "language_info": {"name": "python"}})  # fmt: skip
        nbformat.validate(nb)
        out[variant] = nbformat.writes(nb) + "\n"
    return out


def stale(course: pathlib.Path = COURSE) -> list[str]:
    """Every render under `course` that differs from what its master renders to, is missing, or has no master."""
    out = []
    masters = sorted((course / "masters").glob("*.py"))
    for master in masters:
        for variant, text in render(master).items():
            path = course / variant / f"{master.stem}.ipynb"
            rel = path.relative_to(course.parent)
            if not path.exists():
                out.append(f"{rel} is missing; run `make course`")
            elif path.read_text() != text:
                out.append(f"{rel} is stale (it differs from rendering {master.relative_to(course.parent)}); run `make course`")
    stems = {m.stem for m in masters}
    for variant in VARIANTS:
        for path in sorted((course / variant).glob("*.ipynb")):
            if path.stem not in stems:
                out.append(f"{path.relative_to(course.parent)} has no master {path.stem}.py in course/masters; delete it or add the master")
    return out


def write(course: pathlib.Path = COURSE) -> list[pathlib.Path]:
    written = []
    for master in sorted((course / "masters").glob("*.py")):
        for variant, text in render(master).items():
            path = course / variant / f"{master.stem}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                written.append(path)
    return written


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        found = stale()
        print("\n".join(found) or "every course render is current")
        sys.exit(1 if found else 0)
    for path in write():
        print("wrote", path.relative_to(ROOT))
