# The two commands: `make demo` and `make test`. Both bootstrap .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.tbd-ready

# The demo's short schedule: a quick teacher trained here (cached for the next run), a short
# distillation, on a reduced embedded dataset. Real numbers come from scripts/ (docs/BENCHMARKS.md).
DEMO_ARGS ?= --teacher-iters 100 --iters 80 --batch-size 4 --num-train-images 600 \
	--num-val-images 60 --eval-period 0 --output runs/demo --overwrite

.PHONY: venv demo test test-slow test-all lint format clean-venv

$(READY): pyproject.toml scripts/bootstrap.sh scripts/install_detectron2.py
	bash scripts/bootstrap.sh $(VENV)
	touch $(READY)

venv: $(READY)

demo: $(READY)
	$(VENV)/bin/tbd distill --teacher r101 --student r18 $(DEMO_ARGS)

test: $(READY)
	$(PY) -m pytest

# the long end-to-end tests (@pytest.mark.slow) alone: `make test` skips them, CI runs both
test-slow: $(READY)
	$(PY) -m pytest -m slow --runslow

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
