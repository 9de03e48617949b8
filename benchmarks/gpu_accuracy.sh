#!/usr/bin/env bash
# Device run of the CIFAR-10 ablation (issue 15; copy the zip to .carry/ and carry .carry).
# usage: bash benchmarks/gpu_accuracy.sh TEACHER_ARGS -- SWEEP_ARGS
#   e.g. a DeiT-augmented teacher (RandAugment, Mixup/CutMix, random erasing; cifar10_accuracy.py --help):
#   bash benchmarks/gpu_accuracy.sh --teacher-augment deit --teacher-epochs 300 --teacher-compile --
# TEACHER_FIT_S=S: the teacher trains as many epochs as fit S seconds (4 probe epochs time one first).
# If .carry/teacher/ holds a trained teacher (teacher.tar split in parts), it is reused; else the teacher
# is trained (TEACHER_ARGS) and returned as $OUT/teacher.tar.part* (15 MB parts: a call returns at most
# 8 files), for the next call: mkdir -p .carry/teacher && cp OUT/teacher.tar.part* .carry/teacher/.
# The sweep claims no job that would end later than BUDGET_S (default 530) seconds after this script
# started, and its table is rewritten after every job: a 600-second device call always returns
# table.md / results.json with every finished job (rows say n).
set -o pipefail
start=$(date +%s)
deadline=$(( start + ${BUDGET_S:-530} ))
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
export PYTHONUNBUFFERED=1
targs=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do targs+=("$1"); shift; done; shift
mkdir -p /tmp/cifar/teacher
if ls .carry/teacher/teacher.tar.part* >/dev/null 2>&1; then
  cat .carry/teacher/teacher.tar.part* | tar -x -C /tmp/cifar/teacher
else
  if [ -n "${TEACHER_FIT_S:-}" ]; then
    # as many epochs as fit TEACHER_FIT_S seconds of training: 4 probe epochs measure one epoch's time
    timeout 150 python3 benchmarks/cifar10_accuracy.py --data .carry/cifar10-jpeg-20k.zip --out /tmp/probe \
      --teacher-only "${targs[@]}" --teacher-epochs 4 2>&1 | tee "$OUT/teacher_probe.log"
    fit=$(python3 - "$OUT/teacher_probe.log" "$TEACHER_FIT_S" <<'PY'
import re, sys
# "train epoch k/N: ... (X img/s)": X = images since the start / seconds since the start
r = [float(m) for m in re.findall(r"train epoch \d+/\d+:.*\((\d+) img/s\)", open(sys.argv[1]).read())]
s = 20000 * (4 / r[3] - 3 / r[2])
print(int(float(sys.argv[2]) / s), f"{s:.2f}")
PY
) || { echo "teacher probe failed"; exit 1; }
    echo "teacher: one epoch ${fit#* }s -> ${fit% *} epochs in ${TEACHER_FIT_S}s" | tee -a "$OUT/teacher_probe.log"
    targs+=(--teacher-epochs "${fit% *}")
  fi
  # a teacher that would not leave the call time to return its files is stopped (TEACHER_S, default BUDGET_S - 60)
  timeout "${TEACHER_S:-$(( ${BUDGET_S:-530} - 60 ))}" python3 benchmarks/cifar10_accuracy.py \
    --data .carry/cifar10-jpeg-20k.zip --out /tmp/cifar --teacher-only "${targs[@]}" 2>&1 | tee "$OUT/teacher.log"
  [ -f /tmp/cifar/teacher/model.safetensors ] || { echo "teacher not finished in time"; exit 1; }
  tar -c -C /tmp/cifar/teacher --exclude=checkpoints . | split -b 15M - "$OUT/teacher.tar.part"
fi
echo "teacher ready after $(( $(date +%s) - start ))s"
[ $# -gt 0 ] || exit 0
python3 benchmarks/cifar10_accuracy.py --data .carry/cifar10-jpeg-20k.zip --out /tmp/cifar --deadline "$deadline" \
  "$@" 2>&1 | tee "$OUT/accuracy.log"
cp /tmp/cifar/table.md /tmp/cifar/results.json "$OUT/" 2>/dev/null
echo "done after $(( $(date +%s) - start ))s"
