# Everything a fresh machine needs: `make test` and `make demo` create .venv and install the project first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 / torchvision 0.29.1 are the builds this machine's pip finds on local disk; 2.13.0+cpu must not be
# picked because PyPI's torchvision does not import beside it. Override TORCH_SPEC elsewhere (e.g. aarch64).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo

.PHONY: install test demo lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,phones]'
	touch $@

# -n auto: one pytest-xdist worker per core, each test file on one worker (its module fixtures built once);
# --durations: the slowest tests are printed, to keep the suite within its 15 minutes on 2 cores
test: install
	$(PY) -m pytest -q -ra -n auto --dist loadfile --durations=15

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/mobiledistill quickstart --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
