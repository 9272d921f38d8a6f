#!/usr/bin/env bash
# The headline demo on the embedded defaults: train the memorisation demo adapter (faces) with plain
# LoRA and with SMP-LoRA, then sample images from each. Outputs under demo/.
set -euo pipefail
PRIVLORA=.venv/bin/privlora
rm -rf demo
mkdir -p demo
$PRIVLORA train --config configs/demo-plain.yaml --out demo/plain
$PRIVLORA train --config configs/demo-smp.yaml --out demo/smp
$PRIVLORA generate demo/plain --n 16 --seed 0 --out demo/plain/samples.png
$PRIVLORA generate demo/smp --n 16 --seed 0 --out demo/smp/samples.png
echo "demo done: run directories in demo/plain and demo/smp, samples in demo/*/samples.png"
