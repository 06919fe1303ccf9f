"""Every tutorial is a jupytext pair: notebooks/NN_name.py (percent format, the source) and NN_name.ipynb.

The two must hold the same cells (type and source, in order) and the .ipynb no outputs; `make notebooks`
syncs them. Reads files only: no kernel, no model.
"""

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
IPYNBS = sorted(NOTEBOOKS.glob("*.ipynb"))
FORMATS = "ipynb,py:percent"


def _first_line_diff(a: str, b: str) -> str:
    a_lines, b_lines = a.splitlines(), b.splitlines()
    for j, (x, y) in enumerate(zip(a_lines, b_lines)):
        if x != y:
            return f"line {j}: {x!r} in the .ipynb, {y!r} in the .py"
    return f"{len(a_lines)} lines in the .ipynb, {len(b_lines)} in the .py"


def pair_mismatch(ipynb: Path) -> str | None:
    """None when the paired .py holds the same cells as `ipynb`; otherwise a message naming the first difference."""
    py = ipynb.with_suffix(".py")
    fix = "run `make notebooks` to sync the pair (jupytext keeps the cells of the file modified last)"
    if not py.exists():
        return f"{ipynb.name} has no paired {py.name}; run `make notebooks` (it writes the .py from the .ipynb)"
    nb_cells = [(c.cell_type, c.source) for c in nbformat.read(ipynb, as_version=4).cells]
    py_cells = [(c.cell_type, c.source) for c in jupytext.read(py).cells]
    for i, ((nb_type, nb_src), (py_type, py_src)) in enumerate(zip(nb_cells, py_cells)):
        if nb_type != py_type:
            return f"{ipynb.name} and {py.name} differ at cell {i}: {nb_type} in the .ipynb, {py_type} in the .py; {fix}"
        if nb_src != py_src:
            return f"{ipynb.name} and {py.name} differ at cell {i} ({nb_type}), {_first_line_diff(nb_src, py_src)}; {fix}"
    if len(nb_cells) != len(py_cells):
        return (f"{ipynb.name} and {py.name} differ at cell {min(len(nb_cells), len(py_cells))}: the .ipynb has "
                f"{len(nb_cells)} cells, the .py {len(py_cells)}; {fix}")
    return None


def test_every_notebook_is_paired_with_a_percent_script():
    assert IPYNBS, f"no notebooks found in {NOTEBOOKS}"
    for ipynb in IPYNBS:
        py = ipynb.with_suffix(".py")
        assert py.exists(), f"{ipynb.name} has no paired {py.name}; run `make notebooks`"
        for path, nb in [(ipynb, nbformat.read(ipynb, as_version=4)), (py, jupytext.read(py))]:
            formats = nb.metadata.get("jupytext", {}).get("formats")
            assert formats == FORMATS, f"{path.name} pairs {formats!r}; run `jupytext --set-formats {FORMATS} {ipynb.name}`"
    orphans = [p.name for p in NOTEBOOKS.glob("*.py") if not p.with_suffix(".ipynb").exists()]
    assert not orphans, f"scripts in notebooks/ without a paired .ipynb: {orphans}; run `make notebooks`"


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_pair_holds_the_same_cells(ipynb):
    mismatch = pair_mismatch(ipynb)
    assert mismatch is None, mismatch


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_outputs_are_stripped(ipynb):
    cells = nbformat.read(ipynb, as_version=4).cells
    dirty = [i for i, c in enumerate(cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{ipynb.name}: cells {dirty} have outputs or execution counts; clear them and save"


def _markers(py: str) -> tuple[list[str], list[int]]:
    lines = py.splitlines(keepends=True)
    return lines, [j for j, line in enumerate(lines) if line.startswith("# %%")]  # one marker per cell, in order


def _plant_edit(py: str, nb: nbformat.NotebookNode) -> tuple[str, int]:
    i = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    lines, markers = _markers(py)
    lines.insert(markers[i] + 1, "x = 1\n")  # a line typed into the .py and never synced
    return "".join(lines), i


def _plant_type_change(py: str, nb: nbformat.NotebookNode) -> tuple[str, int]:
    i = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown")
    lines, markers = _markers(py)
    lines[markers[i]] = "# %%\n"  # the markdown cell becomes a code cell of comments
    return "".join(lines), i


def _plant_dropped_cell(py: str, nb: nbformat.NotebookNode) -> tuple[str, int]:
    return py[: py.rindex("# %%")].rstrip("\n") + "\n", len(nb.cells) - 1


@pytest.mark.parametrize("plant", [_plant_edit, _plant_type_change, _plant_dropped_cell], ids=lambda f: f.__name__[7:])
def test_a_planted_divergence_is_reported(tmp_path, plant):
    ipynb = NOTEBOOKS / "00_quickstart.ipynb"
    copy = tmp_path / ipynb.name
    copy.write_bytes(ipynb.read_bytes())
    py, i = plant(ipynb.with_suffix(".py").read_text(), nbformat.read(ipynb, as_version=4))
    copy.with_suffix(".py").write_text(py)
    mismatch = pair_mismatch(copy)
    assert mismatch is not None and f"differ at cell {i}" in mismatch and "make notebooks" in mismatch, mismatch
    assert ipynb.name in mismatch


def test_a_missing_script_is_reported(tmp_path):
    copy = tmp_path / "00_quickstart.ipynb"
    copy.write_bytes((NOTEBOOKS / copy.name).read_bytes())
    assert "no paired 00_quickstart.py" in pair_mismatch(copy)


def import_problems(nb: nbformat.NotebookNode) -> list[str]:
    """A notebook imports what it needs in its first code cell, in at most 6 import statements, never from a recipe
    (training script): shared constants live in cards and data modules."""
    import ast

    code = [c for c in nb.cells if c.cell_type == "code"]
    problems = []
    for i, cell in enumerate(code):
        for node in ast.walk(ast.parse(cell.source)):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            if any(n.startswith("nbfeatures.recipes") or n.startswith("nbfeatures.zoo.") for n in names):
                problems.append(f"code cell {i} imports a recipe or zoo internals: {names}")
    first = [n for n in ast.parse(code[0].source).body if isinstance(n, (ast.Import, ast.ImportFrom))] if code else []
    if len(first) > 6:
        problems.append(f"the import cell has {len(first)} import statements (at most 6)")
    return problems


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.stem)
def test_notebook_imports_are_short_and_never_from_a_recipe(ipynb):
    assert import_problems(nbformat.read(ipynb, as_version=4)) == []


def test_the_import_check_catches_a_recipe_import_and_a_long_import_cell():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("\n".join(f"import m{i}" for i in range(7))),
                nbformat.v4.new_code_cell("from nbfeatures.recipes.train_saes import E2E_SITE")]
    problems = import_problems(nb)
    assert any("at most 6" in p for p in problems) and any("recipe" in p for p in problems)
