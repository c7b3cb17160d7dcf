#!/usr/bin/env bash
# Everything a lent GPU runs, as one script of time-boxed steps. Each step is independent,
# so one failure or time-out leaves the others' results.
#
#   bash benchmarks/gpu_session.sh [STEP...]   # default: smoke+gate concurrency
#   DRY=1 bash benchmarks/gpu_session.sh ...   # rehearse every step here, on the CPU, tiny
#
# Steps, in the order of what the open issues need, with their default time boxes:
#   smoke        360 s  tests/test_gpu.py: ResNet-18 with every knob, SIGKILL + resume,
#                       evaluate, diagnose (issue 20)
#   gate         280 s  bench_gate.py: bf16 and all knobs vs fp32 on real Fashion-MNIST (17)
#   concurrency  150 s  bench_concurrency.py: 1 vs 2 vs 4 ResNet-18 runs on the GPU (18)
#   autoattack   150 s  bench_autoattack.py: the standard cascade at batch 250 vs 500 on the
#                       gate's fp32 ResNet-18 (trained here if the gate did not run) (17)
#   train_paths  100 s  bench_train_paths.py with torch.compile's knobs (17)
# `a+b` runs two steps at once: smoke and gate share the GPU, since neither one's figures
# are times (the smoke's seconds are only for information), while the benchmarks of
# throughput run alone. The default takes 510 s at most: one device call (timeout 600)
# with the wheels' install. The summary is written as steps end and the archive after each
# group, so a call stopped at its limit still returns what finished. If device time is
# left: `autoattack train_paths` (250 s).
#
# Before the device call, here (once):
#   python benchmarks/gpu_pack.py            # the head of Fashion-MNIST into .gpu/ (2.5 MiB)
#   bash benchmarks/gpu_wheels.sh           # the wheels the GPU image lacks into .whl/ (2.7 MiB:
#                                            # pydantic, submitit, pyautoattack, ...)
# The device call: carry [".whl", ".gpu"], timeout 600, command
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
#     bash benchmarks/gpu_session.sh
# What comes back: $OUT/gpu_session.txt (device, each step's exit status and seconds) and
# $OUT/gpu_session.tgz (every log and JSON record): two files, inside the device's limit of
# eight. Without $OUT (a machine of your own) both go to benchmarks/results/.
set -u
DRY=${DRY:-0}
PY=${PY:-python3}
STEPS=("$@")
[ ${#STEPS[@]} = 0 ] && STEPS=(smoke+gate concurrency)
for name in ${STEPS[@]//+/ }; do
  case $name in
    smoke|concurrency|gate|autoattack|train_paths) ;;
    *) echo "gpu_session: unknown step '$name' (of: smoke concurrency gate autoattack" \
            "train_paths; a+b runs two at once)" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/gpu_session_dry} NAME=gpu_session_dry DEVICE=cpu
  export GPU_SMOKE_DRY=1
else
  OUT=${OUT:-benchmarks/results} NAME=gpu_session DEVICE=cuda
fi
WORK=$(mktemp -d)  # logs and records: archived
RUNS=${RUNS:-/tmp/gpu_session_runs}  # trained runs (weights): shared by gate and autoattack
DATA=.gpu/fashion-mnist  # from gpu_pack.py; this machine's copy otherwise
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
SUMMARY="$OUT/$NAME.txt"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPU_SMOKE_OUT="$WORK"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  git rev-parse HEAD 2>/dev/null || true
} >"$SUMMARY" 2>&1

step() {  # step NAME SECONDS COMMAND...: run COMMAND time-boxed, log to $WORK/NAME.log
  local name=$1 box=$2 start=$SECONDS code
  shift 2
  [ "$DRY" = 1 ] && box=$((box * 3))  # a 2-core CPU, the small versions
  timeout "$box" "$@" >"$WORK/$name.log" 2>&1
  code=$?
  [ $code = 124 ] && echo "(stopped by its ${box} s time box)" >>"$WORK/$name.log"
  echo "$name: exit $code after $((SECONDS - start)) s (box ${box} s)" | tee -a "$SUMMARY"
}

pack() {
  cp "$SUMMARY" "$WORK/" && tar czf "$OUT/$NAME.tgz.part" -C "$WORK" . &&
    mv "$OUT/$NAME.tgz.part" "$OUT/$NAME.tgz"
}

run_smoke() {
  step smoke "${SMOKE_S:-360}" "$PY" -m pytest -m gpu -v -s -p no:cacheprovider \
    tests/test_gpu.py
}

run_concurrency() {
  if [ "$DRY" = 1 ]; then
    step concurrency "${CONCURRENCY_S:-110}" "$PY" benchmarks/bench_concurrency.py --quick \
      --per-gpu 1,2 --out-dir "$WORK"
  else
    step concurrency "${CONCURRENCY_S:-150}" "$PY" benchmarks/bench_concurrency.py \
      --device cuda --per-gpu 1,2,4 --epochs 1 --repeats 1 --out-dir "$WORK"
  fi
}

run_gate() {
  local quick=()
  [ "$DRY" = 1 ] && quick=(--quick)
  step gate "${GATE_S:-280}" "$PY" benchmarks/bench_gate.py --device "$DEVICE" \
    --data-root "$DATA" --runs-dir "$RUNS" "${quick[@]}" --out-dir "$WORK"
}

run_autoattack() {  # attacks the gate's fp32 model when the gate ran first (same digest)
  local sizes=(--n 500 --batch-sizes 500 --attacks standard)
  [ "$DRY" = 1 ] && sizes=(--quick)
  step autoattack "${AA_S:-150}" "$PY" benchmarks/bench_autoattack.py --device "$DEVICE" \
    --workload fashion --runs-dir "$RUNS" --data-root "$DATA" "${sizes[@]}" --out-dir "$WORK"
}

run_train_paths() {
  local sizes=(--workloads resnet --resnet-batch 256 --resnet-steps 8 --rounds 3 --warmup 2
               --knobs "${KNOBS:-compile,all}")
  [ "$DRY" = 1 ] && sizes=(--quick)
  step train_paths "${TRAIN_S:-100}" "$PY" benchmarks/bench_train_paths.py \
    --device "$DEVICE" "${sizes[@]}" --out-dir "$WORK"
}

for group in "${STEPS[@]}"; do  # a+b: a and b at once (neither one's figures are times)
  for name in ${group//+/ }; do
    "run_$name" &
  done
  wait
  pack  # after every group, so a call stopped at its limit still returns the ones before
done

pack && rm -rf "$WORK"
echo "results: $SUMMARY and $OUT/$NAME.tgz"
