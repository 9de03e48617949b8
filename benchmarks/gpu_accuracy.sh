#!/usr/bin/env bash
# Device run of the CIFAR-10 accuracy benchmark (copy the zip to .carry/ and carry it).
set -o pipefail
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 benchmarks/cifar10_accuracy.py --data .carry/cifar10-jpeg-20k.zip --out "$OUT/cifar" "$@" 2>&1 | tee "$OUT/accuracy.log"
cp "$OUT/cifar/table.md" "$OUT/" 2>/dev/null
for s in 0 1; do cp "$OUT/cifar/seed$s/results.json" "$OUT/results_seed$s.json" 2>/dev/null; done
cp "$OUT/cifar/teacher/report.json" "$OUT/teacher_report.json" 2>/dev/null
cp "$OUT/cifar/seed0/int8/report.json" "$OUT/int8_report.json" 2>/dev/null
rm -rf "$OUT/cifar"
