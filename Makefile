# The two commands: `make demo` and `make test`. Both bootstrap .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.tbd-ready

# The demo: an ImageNet MobileNetV2 teacher (256-ch FPN, 128-192 px) trained here for 400 steps and
# cached, then the ImageNet MobileNetV2 student (128-ch FPN, 128 px) distilled from it for 200 steps
# beside itself trained alone on the same batches (--with-baseline): teacher, student alone,
# distilled student and the gain in one table, and a picture (runs/demo/plots). A short schedule:
# converged numbers are in docs/BENCHMARKS.md §1d. DEMO_SEED=1 make demo for another seed.
DEMO_SEED ?= 0
DEMO_ARGS ?= --teacher mnv2in --teacher-iters 400 --student mnv2 --student-weights torchvision://mobilenet_v2 \
	--with-baseline --iters 200 --batch-size 8 --eval-period 0 --harmony-score-thresh 0.3 \
	--seed $(DEMO_SEED) --output runs/demo --overwrite

.PHONY: venv demo test test-slow test-all lint format clean-venv

$(READY): pyproject.toml scripts/bootstrap.sh scripts/install_detectron2.py
	bash scripts/bootstrap.sh $(VENV)
	touch $(READY)

venv: $(READY)

demo: $(READY)
	$(PY) scripts/plant_offline_weights.py
	$(VENV)/bin/tbd distill $(DEMO_ARGS)
	$(VENV)/bin/tbd plot --run demo=runs/demo --output runs/demo/plots --format png

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
