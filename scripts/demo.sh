#!/usr/bin/env bash
# The headline demo on the embedded defaults (issue 4): train plain, SMP-LoRA and DP-LoRA adapters on the
# same 32 private faces, then audit all three against the same 36 evaluation non-members with every
# attack (two reference adapters for LiRA/RMIA, shared) and write one comparison report + terminal table.
# Outputs under demo/: demo/{plain,smp,dp}/ run directories, demo/references/, demo/report.html; first, a
# sanitize example (demo/sanitize/, demo/sanitize-before-after.png); last, a short federated run (demo/federated/).
set -euo pipefail
PRIVLORA=.venv/bin/privlora
rm -rf demo
mkdir -p demo
start=$(date +%s)
# issue 5: clean a dataset first (faces, printed text, EXIF/GPS, PII in the caption) → before/after picture
.venv/bin/python scripts/sanitize_example.py --work demo/sanitize --out demo/sanitize-before-after.png
for mode in plain smp dp; do
  $PRIVLORA train --config "configs/demo-$mode.yaml" --out "demo/$mode"
  $PRIVLORA generate "demo/$mode" --n 16 --seed 0 --steps 20 --out "demo/$mode/samples.png"
done
# the shared reference adapters are trained with the plain run's recipe, then reused for SMP and DP
$PRIVLORA audit --run demo/plain --run demo/smp --run demo/dp --references 2 --reference-dir demo/references \
  --report demo/report.html
# issue 6: federated FFA-LoRA on Flower's simulation engine, 5 non-IID banks/clinics of tweets, 3 rounds
$PRIVLORA federate --config configs/fed-ffa.yaml --rounds 3 --out demo/federated
echo "demo done in $(( $(date +%s) - start ))s: open demo/report.html (per-image scores in demo/*/audit/scores.csv)"
