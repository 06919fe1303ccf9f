"""Versions this package was last tested with (recorded in saved files' metadata too)."""

__version__ = "0.1.0"

# What `make test` installed when the suite last passed; tests/test_packaging.py checks
# that each lies inside the range pyproject.toml declares.
TESTED_WITH = {
    "torch": "2.13.0",
    "nnsight": "0.8.1",
    "transformers": "5.23.0",
}
