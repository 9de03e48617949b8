#!/usr/bin/env bash
# Device run: GPU test suite + a 1-GPU NCCL torchrun compress smoke test (carry .carry/).
set -o pipefail
export PYTHONUNBUFFERED=1 GPUSQ_CACHE_DIR=/tmp/gc
mkdir -p /tmp/gc /tmp/teacher; cp .carry/cslt_algs.json /tmp/gc/ 2>/dev/null
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
timeout 300 python3 -m pytest -m gpu tests/gpu -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | grep -E "CORRECTNESS|passed|failed|rror"
cat .carry/teacher/model.safetensors.part* > /tmp/teacher/model.safetensors
cp .carry/teacher/model.yaml /tmp/teacher/
args=(--teacher /tmp/teacher --data .carry/cifar-small.zip --recipe int8 --batch-size 256 --workers 4
      --set train.stage1.epochs=1 --set train.stage2.epochs=1 --json)
timeout 200 torchrun --standalone --nproc-per-node 1 -m gpusq compress "${args[@]}" --out /tmp/ddp1 2>&1 | tail -3 | tee "$OUT/torchrun_nccl1.txt"
timeout 200 gpusq compress "${args[@]}" --out /tmp/plain 2>&1 | tail -1 | tee "$OUT/plain.txt"
