#!/usr/bin/env bash
# The one script sent to the GPU machine (H200): install, GPU tests, benchmarks; logs to $OUT.
#   bash benchmarks/gpu_run.sh STAGE...   stages: probe cifar kcases fusedcheck swincheck taskcheck hfrepro swinprobe
#                                         tests deit_b deit_ts small deit_b_model fp8 swin_t swin_sb tasks hf_swin hf_vit
# Carry .whl (nvmath-python wheel) and .carry (cifar10-jpeg-20k.zip copied from ../shared/data).
# Searched cuSPARSELt algorithm ids persist across calls via .carry/cslt_algs.json (carried).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpusq_out}; mkdir -p "$OUT"
export GPUSQ_CACHE_DIR=/tmp/gpusq_cache; mkdir -p "$GPUSQ_CACHE_DIR"
[ -f .carry/cslt_algs.json ] && cp .carry/cslt_algs.json "$GPUSQ_CACHE_DIR/"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.txt 2>&1 || { cat /tmp/pip.txt; exit 1; }
# the gpu extra (nvmath-python) travels as a wheel in .whl/ (git-ignored; see docs/deploy.md)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/tmp/pipw.txt 2>&1 || { cat /tmp/pipw.txt; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
LOG="$OUT/log.txt"
summary() { cp -f "$GPUSQ_CACHE_DIR/cslt_algs.json" "$OUT/" 2>/dev/null; }
trap summary EXIT
for stage in "$@"; do
  echo "=== $stage $(date -u +%T)" | tee -a "$LOG"
  case "$stage" in
    probe)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
      python3 - <<'PY' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cusparselt", torch.backends.cusparselt.version(), torch.cuda.get_device_name())
print(torch.ops.aten._cslt_sparse_mm.default._schema)
print(torch.ops.aten._scaled_mm.default._schema)
from gpusq.deploy.cusparselt import epilogue_mode
for k in ("int8", "fp8", "bf16"):
    try:
        print("epilogue", k, epilogue_mode(k))
    except Exception as e:
        print("epilogue", k, "FAILED", str(e).splitlines()[0])
PY
      ;;
    cifar)  # the trained CIFAR-10 DeiTs of the correctness tests, made here in seconds
      [ -f .carry/cifar_swin_int4/model.safetensors ] || timeout 300 python3 tests/gpu/make_cifar_model.py --device cuda \
        --zip .carry/cifar10-jpeg-20k.zip --out .carry 2>&1 | grep -vE "^  step" | tee -a "$LOG"
      ;;
    fusedcheck)  # each fused kernel against its reference, quick (before the whole suite)
      timeout ${T_FC:-240} python3 -m pytest -m gpu tests/gpu/test_fused_gpu.py -q -s -p no:cacheprovider 2>&1 \
        | tee "$OUT/fusedcheck.txt" | grep -E "CORRECTNESS|passed|failed|Error|error|assert" | tee -a "$LOG"
      ;;
    hfrepro)  # the open fused Hugging Face Swin fault (benchmarks/repro_hf_swin_fault.py), each mode in its own process
      for m in ${HFREPRO_MODES:-"eager up" "eager mr" "eagernc up" "nocompile up" "graphs up" "perlayer up"}; do
        case "$m" in eager*) env="PYTORCH_NO_CUDA_MEMORY_CACHING=1 CUDA_LAUNCH_BLOCKING=1" ;; *) env="" ;; esac
        env $env timeout 60 python3 benchmarks/repro_hf_swin_fault.py $m 2>&1 | tee -a "$OUT/hfrepro.txt" \
          | grep -E " OK | FAILED|File \"/|Error" | head -8 | tee -a "$LOG"
      done
      # memcheck names the faulting kernel and address (compute-sanitizer ships with the CUDA toolkit)
      san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
      if [ -n "$san" ]; then
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${T_SAN:-240} "$san" --tool memcheck --print-limit 20 \
          python3 benchmarks/repro_hf_swin_fault.py eager up >"$OUT/memcheck.txt" 2>&1
        grep -E "Invalid|at 0x|by thread|Address|ERROR SUMMARY| OK | FAILED" "$OUT/memcheck.txt" | head -30 | tee -a "$LOG"
      else
        echo "no compute-sanitizer" | tee -a "$LOG"
      fi
      ;;
    swinprobe)  # window-attention kernel configurations vs SDPA (Swin-T, batch 256)
      timeout 200 python3 benchmarks/swin_probe.py --json "$OUT/swin_probe.json" 2>&1 | tee -a "$LOG"
      ;;
    taskcheck)  # the task-model deploy tests and the task bench test
      timeout 300 python3 -m pytest -m gpu tests/gpu/test_deploy_gpu.py tests/gpu/test_bench_tasks_gpu.py -k "task" -q -s \
        -p no:cacheprovider 2>&1 | tee "$OUT/taskcheck.txt" | grep -E "CORRECTNESS|passed|failed|Error|error|assert" \
        | tee -a "$LOG"
      ;;
    kcases)  # the Triton kernels' interpreter cases, compiled
      timeout 300 python3 tests/test_kernels_interpret.py --worker --device cuda 2>&1 | grep -v "^RESULTS" | tee -a "$LOG"
      ;;
    swincheck)  # the Swin deploy tests only (random-init and trained CIFAR Swin)
      timeout ${T_SC:-300} python3 -m pytest -m gpu tests/gpu/test_deploy_gpu.py -k swin -q -s -p no:cacheprovider 2>&1 \
        | tee "$OUT/swincheck.txt" | grep -E "CORRECTNESS|passed|failed|Error|error|assert" | tee -a "$LOG"
      ;;
    swin_t)
      timeout ${T_SWINT:-500} gpusq bench --model swin_tiny_patch4_window7_224 --recipe int8 --batch 1,256 --profile \
        ${SWIN_VARIANTS:+--variants $SWIN_VARIANTS} --json "$OUT/swin_t.json" 2>&1 | tee -a "$LOG"
      ;;
    swin_sb)
      timeout ${T_SWINSB:-500} gpusq bench --model swin_small_patch4_window7_224,swin_base_patch4_window7_224 \
        --recipe int8 --batch 1,256 --variants bf16-compile,fp8-dense,gpusq --profile --json "$OUT/swin_sb.json" 2>&1 \
        | tee -a "$LOG"
      ;;
    tasks)
      timeout ${T_TASKS:-500} gpusq bench --model maskrcnn_swin_t --batch 1,8 --variants bf16-compile,fp8-dense,gpusq \
        --json "$OUT/tasks_maskrcnn.json" 2>&1 | tee -a "$LOG"
      timeout ${T_TASKS:-500} gpusq bench --model upernet_swin_t --batch 8 --variants bf16-compile,fp8-dense,gpusq \
        --fused ${UPERNET_FUSED:-auto} --json "$OUT/tasks_upernet.json" 2>&1 | tee -a "$LOG"
      ;;
    tests)
      timeout ${T_TESTS:-400} python3 -m pytest -m gpu tests/gpu ${PYTEST_X--x} -q -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | grep -E "CORRECTNESS|passed|failed|Error|error" | tee -a "$LOG"
      ;;
    deit_b)
      timeout ${T_DEITB:-500} gpusq bench --model deit_base_patch16_224 --recipe int8 --batch 1,256 --profile \
        --json "$OUT/deit_b.json" 2>&1 | tee -a "$LOG"
      ;;
    deit_ts)
      timeout ${T_DEITTS:-400} gpusq bench --model deit_tiny_patch16_224,deit_small_patch16_224 --recipe int8 \
        --batch 1,256 --profile --json "$OUT/deit_ts.json" 2>&1 | tee -a "$LOG"
      ;;
    small)
      timeout ${T_SMALL:-540} gpusq bench --model deit_tiny_patch16_224,deit_small_patch16_224,swin_tiny_patch4_window7_224 \
        --recipe int8 --batch 1,256 --profile --json "$OUT/bench_small.json" 2>&1 | tee -a "$LOG"
      ;;
    deit_b_model)
      timeout ${T_MODEL:-400} gpusq bench --model deit_base_patch16_224 --recipe int8 --batch 1,256 --compile-scope model \
        --variants bf16-compile,fp8-dense,gpusq --json "$OUT/bench_deit_b_model.json" 2>&1 | tee -a "$LOG"
      ;;
    fp8)
      timeout ${T_FP8:-300} gpusq bench --model deit_base_patch16_224 --recipe fp8 --batch 1,256 \
        --variants bf16-compile,fp8-dense,gpusq --profile --json "$OUT/bench_deit_b_fp8.json" 2>&1 | tee -a "$LOG"
      ;;
    hf_swin|hf_vit)  # Hugging Face classifiers (issue 14; random weights) beside their timm twins, 1000 classes each
      case "$stage" in hf_swin) pair=SwinForImageClassification,swin_tiny_patch4_window7_224 ;;
                       *) pair=ViTForImageClassification,vit_base_patch16_224 ;; esac
      timeout ${T_HF:-280} gpusq bench --model $pair --model-arg num_classes=1000 --recipe int8 --batch 1,256 \
        --variants bf16-compile,fp8-dense,gpusq --json "$OUT/$stage.json" 2>&1 | tee -a "$LOG"
      ;;
    *) echo "unknown stage $stage" | tee -a "$LOG" ;;
  esac
done
