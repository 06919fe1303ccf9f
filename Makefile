# Two commands do all the set-up: `make lab` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
# The torch build to install. The default is the CPU wheel this project's machines
# carry; override for a CUDA build, e.g. `make test TORCH=torch==2.13.0`.
TORCH  ?= torch==2.13.0
EXTRAS ?= lab,dev,saelens
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(EXTRAS)
# Playwright drives Debian's chromium (`make chromium`); it must never download a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: install lab notebooks chromium test test-browser screenshots test-fast bench clean course
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
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) $(LAB_ARGS) notebooks/00_quickstart.ipynb  # the file browser shows notebooks/ and course/

# The tutorials are jupytext pairs: notebooks/NN_name.py (percent format) and NN_name.ipynb. Edit either, then
# sync; jupytext keeps the cells of the file modified last (and the .ipynb's cell ids). tests/test_notebooks_sync.py
# fails while a pair differs.
notebooks: install
	$(VENV)/bin/jupytext --sync notebooks/*.ipynb

# The course: each master course/masters/NN_name.py (jupytext percent, cells tagged stub / solution / hint / check)
# renders to course/student/NN_name.ipynb (stubs; hints and solutions folded) and course/solutions/NN_name.ipynb.
# tests/test_course_render.py fails while a render is stale, and runs both renders.
course: install
	$(PY) dev/render_course.py

# Debian's chromium for the browser tests: installed with apt-get when missing and we are root.
chromium:
	@if command -v chromium >/dev/null 2>&1 || [ -n "$$NBF_CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser tests (apt-get)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
	  echo "make chromium: no chromium on PATH and cannot install it here (needs root and apt-get)."; \
	  echo "  Install it yourself (Debian/Ubuntu: sudo apt-get install chromium) or set NBF_CHROMIUM=/path/to/chromium;"; \
	  echo "  without it the browser tests skip on this machine (and fail in CI)."; \
	fi

# The whole suite: unit tests, every tutorial notebook executed by nbmake, then every notebook
# run in JupyterLab in headless Chromium (tests/browser, see README "Browser tests").
test: install chromium
	$(PY) -m pytest tests --ignore=tests/browser
	$(PY) -m pytest --nbmake --nbmake-timeout=600 notebooks course/solutions
	$(PY) -m pytest tests/browser -m browser

# Only the browser suite; screenshots land in .pytest_cache/browser/ (listed at the end of the run).
test-browser: install chromium
	$(PY) -m pytest tests/browser -m browser

# A PNG of every notebook and panel fixture as a 1280 px wide browser window shows it: SHOTS/<notebook>/page.png (the
# whole notebook after Run All) and SHOTS/<notebook>/cellNN-K.png (cell NN's Kth output: each widget, plot, HTML).
# It runs each notebook in JupyterLab as the browser suite does, with only its render check.
SHOTS ?= screenshots
screenshots: install chromium
	$(PY) -m pytest tests/browser -m browser -k test_panels_render --browser-screenshots=$(SHOTS) -q

test-fast: install
	$(PY) -m pytest tests --ignore=tests/browser -x -q

bench: install
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
