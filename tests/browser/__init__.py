"""Real-browser tests (see conftest.py). A package, so that its conftest does not shadow tests/conftest.py as `conftest`."""
