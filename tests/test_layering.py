"""The package's layering: every import points down, none goes round in a circle, imports inside functions included.

Layers, bottom up (a module may import from its own layer or a lower one):
    base     edits, metrics, data/, plots/, _io, _versions      no model wrapping
    sites    architectures.py (the site table), sites.py       sites.py is the only module that imports nnsight
    zoo      zoo/                                              shipped assets and the one checked loader
    methods  harvest, train, train_many, distributed, sae/, codebook/, inversion/, evals, features, steering, course/
    widgets  widgets/                                          only plots/ and widgets/ from nbfeatures; no torch
    recipes  recipes/                                          the scripts that rebuild the zoo
    api      nbfeatures/__init__.py
Besides: plots/ imports only the standard library, numpy, plotly and nbfeatures._checks.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "nbfeatures"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("nbfeatures._checks", "nbfeatures._hub", "nbfeatures._io", "nbfeatures._versions", "nbfeatures.edits", "nbfeatures.metrics", "nbfeatures.data", "nbfeatures.plots")),
    ("sites", ("nbfeatures.architectures", "nbfeatures.attention_patterns", "nbfeatures.sites")),
    ("zoo", ("nbfeatures.zoo",)),
    ("methods", ("nbfeatures.harvest", "nbfeatures.train", "nbfeatures.train_many", "nbfeatures.distributed", "nbfeatures.sae",
                 "nbfeatures.codebook", "nbfeatures.inversion", "nbfeatures.evals", "nbfeatures.features", "nbfeatures.steering",
                 "nbfeatures.course", "nbfeatures.prompt_features")),
    ("widgets", ("nbfeatures.widgets",)),
    ("recipes", ("nbfeatures.recipes",)),
    ("api", ("nbfeatures",)),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "nbfeatures") or module in prefixes:
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, root: pathlib.Path, modules: set[str]) -> set[str]:
    """Every module `path` imports (at any depth, inside functions too): nbfeatures modules by full name, others by top name."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name` the package itself
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found |= subs or {target}
    return found


def check(root: pathlib.Path) -> list[str]:
    """Every violation of the layering under `root` (a package folder), as readable lines."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    pkg = root.name
    graph, problems = {}, []
    for path in paths:
        me = module_name(path, root)
        mine = layer_of(me.replace(pkg, "nbfeatures", 1))
        deps = imports_of(path, root, modules)
        ours = {d for d in deps if d == pkg or d.startswith(pkg + ".")}
        graph[me] = ours & modules
        for dep in sorted(ours):
            if dep not in modules:
                problems.append(f"{me} imports {dep}, which does not exist")
                continue
            theirs = layer_of(dep.replace(pkg, "nbfeatures", 1))
            if RANK[theirs] > RANK[mine]:
                problems.append(f"upward import: {me} ({mine}) imports {dep} ({theirs})")
            if mine == "widgets" and theirs not in ("base", "widgets") or (mine == "widgets" and theirs == "base" and ".plots" not in dep):
                problems.append(f"widgets take data or callables: {me} imports {dep}")
            if ".plots" in me and ".plots" not in dep and not dep.endswith("._checks"):
                problems.append(f"plots are pure figure functions: {me} imports {dep}")
        for dep in sorted(deps - ours):
            top = dep.split(".")[0]
            if top == "nnsight" and not me.endswith(".sites"):
                problems.append(f"only sites.py imports nnsight: {me} imports {dep}")
            if ".plots" in me and top not in sys.stdlib_module_names and top not in ("numpy", "plotly"):
                problems.append(f"plots import only the standard library, numpy and plotly: {me} imports {dep}")
            if ".widgets" in me and top in ("torch", "nnsight"):
                problems.append(f"widgets never touch a model: {me} imports {dep}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self-import)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_is_layered():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def _plant(tmp_path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "nbfeatures"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "sites.py": "def f():\n    from .zoo import x\n", "zoo/__init__.py": "x = 1\n"}, "upward import: nbfeatures.sites"),
    ({"__init__.py": "", "train.py": "from .harvest import h\n", "harvest.py": "def h():\n    from . import train\n"}, "import cycle"),
    ({"__init__.py": "", "harvest.py": "import nnsight\n"}, "only sites.py imports nnsight"),
    ({"__init__.py": "", "widgets/__init__.py": "", "widgets/p.py": "from .. import sites\n", "sites.py": ""}, "widgets take data"),
    ({"__init__.py": "", "plots/__init__.py": "", "plots/f.py": "import torch\n"}, "plots import only"),
    ({"__init__.py": "", "newthing.py": ""}, "in no layer"),
])  # fmt: skip
def test_a_planted_fault_is_caught(tmp_path, files, expected):
    root = _plant(tmp_path, files)
    try:
        problems = check(root)
    except AssertionError as e:
        problems = [str(e)]
    assert any(expected in p for p in problems), problems
