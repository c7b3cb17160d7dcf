#!/usr/bin/env bash
# Everything a lent GPU runs, as ONE device call of time-boxed steps in priority order. Each
# step is independent: a failure or a time-out ends that step only, never a later one.
#
#   bash benchmarks/gpu_session.sh [STEP...]   # default: every step below, in this order
#   DRY=1 bash benchmarks/gpu_session.sh       # the CPU rehearsal: precheck, then every step
#                                              # at tiny sizes (small models, no compile)
#   PLAN=1 bash benchmarks/gpu_session.sh      # print the steps and their boxes, run nothing
#
# Device time: 15 minutes a session, the machine's start (~90 s) and any idle time included,
# at most 600 s a command, and no fresh machine starts with under 4 minutes left. So there
# is one call: ~90 s start + ~10 s install + this script (SESSION_S, 540 s) + transfers
# ≈ 660 s, then give the machine back at once. Steps, by what the open issues need most
# (the H200 session of 2026-11-28 measured the gate, concurrency and train_paths steps and
# passed the smoke: benchmarks/results/gpu_session-h200-20261128.md; they stay by name):
#   autoattack       240 s  bench_autoattack.py: the standard cascade on 500 images at
#                           batch 500, then at the default 250 (fp32), on the gate's
#                           Fashion-MNIST ResNet-18 (trained here first: ~20 s) (17)
#   autoattack_tf32  150 s  the same with TF32 (evaluate --tf32) (17)
#   smoke            135 s  tests/test_gpu.py: ResNet-18 with every knob, SIGKILL + resume,
#                           evaluate, diagnose on CUDA (issue 20's regression check)
# and by name only:
#   gate         135 s  bench_gate.py: bf16 and all knobs vs fp32 on real Fashion-MNIST (17)
#   concurrency   85 s  bench_concurrency.py: 1 vs 2 vs 4 ResNet-18 runs on the GPU (18)
#   train_paths   35 s  bench_train_paths.py: every knob without, then with compile (17)
#   precheck           (DRY only) gpu_precheck.py: the real specs' first steps and compiled
#                       graphs on this CPU, which the small rehearsal models cannot show
# A step's box is its own plus whatever the steps before it left unused (the later steps'
# own boxes stay reserved), so time one step does not need goes to the next, and so on.
# Each box ends its step with SIGTERM, SIGKILL 5 s later (GRACE, reserved per step). The
# autoattack steps' boxes may close during the batch-250 baseline, after the batch-500
# figure is in the record (at 2026-11-28's 3.3 images/s, 500 images take 150 s).
# `AUTOATTACK_S=300` (AUTOATTACK_TF32_S, SMOKE_S, GATE_S, CONCURRENCY_S, TRAIN_PATHS_S,
# PRECHECK_S) sets a box, `SESSION_S` the whole (default: the boxes' sum).
# Steps run one at a time: two compiling processes would share the 16 cores.
#
# Before the device call, here (once):
#   python benchmarks/gpu_pack.py            # the head of Fashion-MNIST into .gpu/ (2.5 MiB)
#   bash benchmarks/gpu_wheels.sh           # the wheels the GPU image lacks into .whl/ (2.7 MiB:
#                                            # pydantic, submitit, pyautoattack, ...)
# The device call: carry [".whl", ".gpu"], timeout 600, command
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
#     bash benchmarks/gpu_session.sh
# What comes back, written as the steps go: $OUT/gpu_session.txt (device, each step's exit
# status and seconds), $OUT/<step>.log (each step's output, as it is printed) and
# $OUT/gpu_session.tgz (every log and JSON record, repacked after each step): at most 8
# files, the device's limit. Without $OUT (a machine of your own) they go to
# benchmarks/results/.
set -u
DRY=${DRY:-0}
PY=${PY:-python3}
GRACE=5
declare -A BOX=([precheck]=300 [autoattack]=240 [autoattack_tf32]=150 [smoke]=135
                [gate]=135 [concurrency]=85 [train_paths]=35)
STEPS=("$@")
if [ ${#STEPS[@]} = 0 ]; then
  STEPS=(autoattack autoattack_tf32 smoke)
  [ "$DRY" = 1 ] && STEPS=(precheck "${STEPS[@]}")
fi
for name in "${STEPS[@]}"; do
  if [ -z "${BOX[$name]+set}" ]; then
    echo "gpu_session: unknown step '$name' (of: autoattack autoattack_tf32 smoke gate" \
         "concurrency train_paths precheck)" >&2
    exit 2
  fi
done
if [ ${#STEPS[@]} -gt 6 ]; then  # a log per step, the summary and the archive: 8 files back
  echo "gpu_session: at most 6 steps in one call (the device returns 8 files), not" \
       "${#STEPS[@]}" >&2
  exit 2
fi
if [ "$DRY" = 1 ]; then  # a 2-core CPU at tiny sizes: three times each box (not precheck's)
  for name in autoattack autoattack_tf32 smoke gate concurrency train_paths; do
    BOX[$name]=$((BOX[$name] * 3))
  done
fi
for name in "${!BOX[@]}"; do  # AUTOATTACK_S=300 ... TRAIN_PATHS_S=60: a box of your own
  own=${name^^}_S
  [ -n "${!own:-}" ] && BOX[$name]=${!own}
done
PLANNED=0
for name in "${STEPS[@]}"; do PLANNED=$((PLANNED + BOX[$name] + GRACE)); done
SESSION_S=${SESSION_S:-$PLANNED}  # 540 s on the GPU
if [ "${PLAN:-0}" = 1 ]; then
  for name in "${STEPS[@]}"; do echo "$name ${BOX[$name]}"; done
  echo "grace $GRACE per step; session $SESSION_S s"
  exit 0
fi
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/gpu_session_dry} NAME=gpu_session_dry DEVICE=cpu
  export GPU_SMOKE_DRY=1
else
  OUT=${OUT:-benchmarks/results} NAME=gpu_session DEVICE=cuda
fi
WORK=$(mktemp -d)  # records and the smoke's logs: archived
OWN_RUNS=$([ -z "${RUNS:-}" ] && echo 1)
RUNS=${RUNS:-$(mktemp -d)}  # trained runs (weights): shared by gate and the autoattack steps
DATA=.gpu/fashion-mnist  # from gpu_pack.py; this machine's copy otherwise
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
SUMMARY="$OUT/$NAME.txt"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPU_SMOKE_OUT="$WORK"
# Whole seconds really elapsed since $1 (µs from now_us): $SECONDS counts clock-second
# boundaries crossed, so 10 ms across one read as 1 s and took a 1 s box to 0.
now_us() { echo "${EPOCHREALTIME/[.,]/}"; }
since() { echo $((($(now_us) - $1) / 1000000)); }
START=$(now_us)

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  git rev-parse HEAD 2>/dev/null || true
  echo "steps: ${STEPS[*]}; session ${SESSION_S} s"
} >"$SUMMARY" 2>&1

box_for() {  # box_for INDEX: the step's box, with what earlier steps left unused
  local i=$1 later=0 j
  for ((j = i + 1; j < ${#STEPS[@]}; j++)); do
    later=$((later + BOX[${STEPS[j]}] + GRACE))
  done
  echo $((SESSION_S - $(since "$START") - later - GRACE))
}

step() {  # step NAME BOX COMMAND...: run COMMAND time-boxed, its output to $OUT/NAME.log
  local name=$1 box=$2 start code
  start=$(now_us)
  shift 2
  if [ "$box" -lt 1 ]; then
    echo "$name: skipped, no time left (box $box s)" | tee -a "$SUMMARY"
    return
  fi
  timeout -k "$GRACE" "$box" "$@" >"$OUT/$name.log" 2>&1
  code=$?
  [ $code = 124 ] || [ $code = 137 ] && echo "(stopped by its ${box} s time box)" >>"$OUT/$name.log"
  echo "$name: exit $code after $(since "$start") s (box ${box} s)" | tee -a "$SUMMARY"
}

pack() {  # every record and log so far, as one archive beside the summary
  local logs=()
  for name in "${STEPS[@]}"; do [ -f "$OUT/$name.log" ] && logs+=("$name.log"); done
  cp "$SUMMARY" "$WORK/" && tar czf "$OUT/$NAME.tgz.part" -C "$WORK" . -C "$OUT" "${logs[@]}" &&
    mv "$OUT/$NAME.tgz.part" "$OUT/$NAME.tgz"
}

run_precheck() {
  step precheck "$1" "$PY" benchmarks/gpu_precheck.py --data-root "$DATA" --out-dir "$WORK"
}

run_smoke() {
  step smoke "$1" "$PY" -m pytest -m gpu -v -s -p no:cacheprovider tests/test_gpu.py
}

run_gate() {
  local quick=()
  [ "$DRY" = 1 ] && quick=(--quick)
  step gate "$1" "$PY" benchmarks/bench_gate.py --device "$DEVICE" --data-root "$DATA" \
    --runs-dir "$RUNS" "${quick[@]}" --out-dir "$WORK"
}

run_concurrency() {
  local sizes=(--device cuda --per-gpu 1,2,4 --epochs 1 --repeats 1)
  [ "$DRY" = 1 ] && sizes=(--quick --per-gpu 1,2)
  step concurrency "$1" "$PY" benchmarks/bench_concurrency.py "${sizes[@]}" --out-dir "$WORK"
}

run_autoattack() {  # the gate's fp32 model (same digest): trained by whichever step is first
  local sizes=(--n 500 --batch-sizes 500 --attacks standard) name=${2:-autoattack}
  [ "$DRY" = 1 ] && sizes=(--quick --attacks standard)
  step "$name" "$1" "$PY" benchmarks/bench_autoattack.py --device "$DEVICE" \
    --workload fashion --runs-dir "$RUNS" --data-root "$DATA" "${sizes[@]}" "${@:3}" \
    --out-dir "$WORK"
}

run_autoattack_tf32() {
  run_autoattack "$1" autoattack_tf32 --tf32
}

run_train_paths() {  # all_eager first: a compile that outlasts the box leaves the rest
  local sizes=(--workloads resnet --resnet-batch 256 --resnet-classes 10 --resnet-steps 6
               --rounds 2 --warmup 1 --knobs "${KNOBS:-all_eager,all}")
  [ "$DRY" = 1 ] && sizes=(--quick)
  step train_paths "$1" "$PY" benchmarks/bench_train_paths.py --device "$DEVICE" \
    "${sizes[@]}" --out-dir "$WORK"
}

for i in "${!STEPS[@]}"; do
  "run_${STEPS[i]}" "$(box_for "$i")"
  pack  # after every step, so a call stopped at its limit still returns the ones before
done

echo "total $(since "$START") s of ${SESSION_S} s" | tee -a "$SUMMARY"
pack && rm -rf "$WORK"
[ "$OWN_RUNS" = 1 ] && rm -rf "$RUNS"
echo "results: $SUMMARY, $OUT/<step>.log and $OUT/$NAME.tgz"
