"""Write the README's support matrix (architecture x site: exact / absent) from tests/test_architectures.py.

    python dev/support_matrix.py          # runs the matrix tests, then rewrites the table between the README markers

A site is marked exact only when the matrix tests pass for that architecture (they compare every site with raw
torch hooks); tests/test_architectures.py::test_readme_support_matrix_is_current fails when the table is stale.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

COLUMNS = ["hook_embed", "hook_resid_pre", "ln1.hook_normalized", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
           "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out", "hook_resid_post", "ln_final.hook_normalized"]  # fmt: skip
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


def table() -> str:
    """The markdown table, from each architecture's site names (what exists); exactness is the tests' to prove."""
    from test_architectures import CONFIGS, build

    from nbfeatures import sites

    head = "| architecture (model_type) | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name in sorted(CONFIGS):
        names = set(sites.site_names(sites.wrap(build(name))))
        blocks = {n.split(".")[1] for n in names if n.startswith("blocks.")}
        cells = []
        for c in COLUMNS:
            where = [b for b in blocks if f"blocks.{b}.{c}" in names]
            cells.append("exact" if c in names or len(where) == len(blocks) else f"exact in blocks {', '.join(sorted(where))}" if where else "absent")
        rows.append(f"| {name} (`{CONFIGS[name][0]}`) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not readme",
                           str(ROOT / "tests" / "test_architectures.py")])
    if done.returncode != 0:
        sys.exit("the matrix tests fail: the table would claim what is not true; fix them first")
    readme = (ROOT / "README.md").read_text()
    start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    (ROOT / "README.md").write_text(readme[:start] + "\n" + table() + "\n" + readme[stop:])
    print("README.md support matrix rewritten")  # script output


if __name__ == "__main__":
    main()
