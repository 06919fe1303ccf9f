# Two commands do all the set-up: `make lab` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
# The torch build to install. The default is the CPU wheel this project's machines
# carry; override for a CUDA build, e.g. `make test TORCH=torch==2.13.0`.
TORCH  ?= torch==2.13.0
EXTRAS ?= lab,dev,saelens
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(EXTRAS)

.PHONY: install lab test test-fast bench clean
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# Extra JupyterLab flags, e.g. `make lab LAB_ARGS="--no-browser --port 8899"`.
LAB_ARGS ?=
ROOT_FLAG = $(if $(filter 0,$(shell id -u)),--allow-root)
lab: install
	cd notebooks && ../$(VENV)/bin/jupyter lab $(ROOT_FLAG) $(LAB_ARGS) 00_quickstart.ipynb

# The whole suite: unit tests, then every tutorial notebook executed by nbmake.
test: install
	$(PY) -m pytest tests --ignore=tests/browser
	$(PY) -m pytest --nbmake --nbmake-timeout=600 notebooks

test-fast: install
	$(PY) -m pytest tests --ignore=tests/browser -x -q

bench: install
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
