#!/usr/bin/env bash
# Device run of the CIFAR-10 accuracy benchmark (copy the zip to .carry/ and carry it).
# usage: bash benchmarks/gpu_accuracy.sh TEACHER_ARGS -- VARIANT_ARGS
# If .carry/teacher/ holds a trained teacher (model.safetensors split in parts), it is reused.
set -o pipefail
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
export PYTHONUNBUFFERED=1
targs=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do targs+=("$1"); shift; done; shift
mkdir -p /tmp/cifar/teacher
if [ -f .carry/teacher/model.yaml ]; then
  cat .carry/teacher/model.safetensors.part* > /tmp/cifar/teacher/model.safetensors
  cp .carry/teacher/model.yaml .carry/teacher/report.json /tmp/cifar/teacher/
else
  python3 benchmarks/cifar10_accuracy.py --data .carry/cifar10-jpeg-20k.zip --out /tmp/cifar --teacher-only \
    "${targs[@]}" 2>&1 | tee "$OUT/teacher.log"
  mkdir -p "$OUT/teacher"
  split -b 15M /tmp/cifar/teacher/model.safetensors "$OUT/teacher/model.safetensors.part"
  cp /tmp/cifar/teacher/model.yaml /tmp/cifar/teacher/report.json "$OUT/teacher/"
fi
[ $# -gt 0 ] || exit 0
python3 benchmarks/cifar10_accuracy.py --data .carry/cifar10-jpeg-20k.zip --out /tmp/cifar "$@" 2>&1 | tee "$OUT/accuracy.log"
cp /tmp/cifar/table.md "$OUT/" 2>/dev/null
for s in 0 1 2; do cp /tmp/cifar/seed$s/results.json "$OUT/results_seed$s.json" 2>/dev/null; done
cp /tmp/cifar/seed0/int8/report.json "$OUT/int8_report.json" 2>/dev/null
