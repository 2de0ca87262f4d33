# The two commands: `make demo` and `make test`. Both bootstrap .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.tbd-ready

.PHONY: venv demo test test-all lint format clean-venv

$(READY): pyproject.toml scripts/bootstrap.sh scripts/install_detectron2.py
	bash scripts/bootstrap.sh $(VENV)
	touch $(READY)

venv: $(READY)

demo: $(READY)
	$(VENV)/bin/tbd demo

test: $(READY)
	$(PY) -m pytest

test-all: $(READY)
	$(PY) -m pytest --runslow

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(READY)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
