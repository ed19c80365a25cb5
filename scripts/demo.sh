#!/usr/bin/env bash
# The main job on the example model: export it, compile for a Raspberry Pi 4 and an A100,
# verify every artifact against torch (the aarch64 library under qemu), and run it chained.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/demo}
mkdir -p "$out"
python3 examples/small_resnet.py "$out"
splitc inspect "$out/small_resnet.pt2" --targets rpi4,a100 --limit 12
splitc compile "$out/small_resnet.pt2" --targets rpi4,a100 -o "$out/small_resnet.splitc"
splitc verify "$out/small_resnet.splitc" --json "$out/verify.json" --junit "$out/verify.xml"
splitc run "$out/small_resnet.splitc" --input "$out/x.npy" -o "$out/y.npz"
