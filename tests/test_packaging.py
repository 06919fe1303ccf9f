"""The install files agree with each other and with what was tested."""

import pathlib
import re
import tomllib

from packaging.requirements import Requirement

import nbfeatures
from nbfeatures._versions import TESTED_WITH

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def conda_pip_requirements():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s+- pip:\s*$", line))
    reqs = []
    for line in lines[start + 1:]:
        m = re.match(r"\s+- (.+)$", line)
        if not m or m.group(1).startswith("-e"):
            continue
        reqs.append(Requirement(m.group(1)))
    return {r.name: r for r in reqs}


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = pyproject()
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in ("lab", "dev", "saelens") for r in project["optional-dependencies"][extra]]
    conda = conda_pip_requirements()
    assert sorted(conda) == sorted(r.name for r in declared)
    for r in declared:
        if r.name == "torch":  # conda pins the CPU build; the pin must lie inside the library's range
            pinned = str(conda["torch"].specifier).removeprefix("==")
            assert r.specifier.contains(pinned), (r, pinned)
        else:
            assert conda[r.name].specifier == r.specifier, (r, conda[r.name])


def test_tested_versions_lie_inside_declared_ranges():
    declared = {Requirement(r).name: Requirement(r) for r in pyproject()["dependencies"]}
    for name, version in TESTED_WITH.items():
        assert declared[name].specifier.contains(version), (name, version, declared[name].specifier)


def test_makefile_pins_the_tested_torch_and_can_be_overridden():
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH  ?= torch=={TESTED_WITH['torch']}" in makefile
    assert '"$(TORCH)"' in makefile


def test_version_matches_pyproject():
    assert nbfeatures.__version__ == pyproject()["version"]


def test_readme_names_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme


def test_package_data_ships_every_zoo_file():
    """The zoo's model folders have no __init__.py, so only the recursive globs put them in a wheel."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nbfeatures.zoo"]
    zoo = root / "nbfeatures" / "zoo"
    shipped = {p for pat in patterns for p in zoo.glob(pat) if p.is_file()}
    data = {p for p in zoo.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert data, "no zoo files found"
    assert data <= shipped, f"zoo files a wheel would miss: {sorted(str(p.relative_to(zoo)) for p in data - shipped)[:10]}"
