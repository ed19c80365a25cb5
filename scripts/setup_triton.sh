#!/usr/bin/env bash
# The Python environment Triton's Python backend runs in (drivers/triton_server.py): a venv made from
# Debian's own python3.11 (the stub bundled with nvidia-pytriton does not load models under the
# pyenv interpreter; ../shared/TOOLCHAIN.md), with nvidia-pytriton (which ships tritonserver 2.51 and
# its Python backend), onnxruntime and splitc's runtime. Idempotent. Where: $SPLITC_TRITON_VENV, else .venv-triton/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPLITC_TRITON_VENV:-.venv-triton}
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
if ! /usr/bin/python3.11 -c "import ensurepip, venv" 2>/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-venv >/dev/null
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3.11 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q nvidia-pytriton==0.7.0 onnxruntime numpy click rich urllib3
# splitc's runtime only (no compiler): model.py imports splitc.runtime.
"$VENV/bin/python" -m pip install -q --no-deps -e .
