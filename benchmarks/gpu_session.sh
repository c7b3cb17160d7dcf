#!/usr/bin/env bash
# Everything a lent GPU runs, as one script: the GPU smoke test (tests/test_gpu.py) and the
# GPU figures of the benchmarks. Each step is independent and time-boxed, so one failure
# leaves the others' records. Records and logs go to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_session.sh            # on a machine with CUDA and this package
#
# Sizes are chosen to finish in about 8 minutes on one H100/H200.
set -u
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPU_SMOKE_OUT="$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
  >>"$OUT/gpu.txt" 2>&1

# 1. smoke: 2 epochs ResNet-18 with every knob, SIGKILL + resume, evaluate, diagnose
#    (the training subprocess streams to $OUT/train.log)
timeout "${SMOKE_S:-260}" "$PY" -m pytest -m gpu -v -s -p no:cacheprovider tests/test_gpu.py \
  >"$OUT/smoke.log" 2>&1
echo "smoke: exit $?" >>"$OUT/gpu.txt"

# 2. training step: exact vs official (fp32), each knob and all knobs, CIFAR-100-shaped
# (torch.compile's knobs: KNOBS=tf32,bf16,channels_last,compile,all and a longer TRAIN_S)
timeout "${TRAIN_S:-90}" "$PY" benchmarks/bench_train_paths.py --device cuda \
  --workloads resnet --resnet-batch 256 --resnet-steps 8 --rounds 3 --warmup 2 \
  --knobs "${KNOBS:-tf32,bf16,channels_last,all_eager}" --out-dir "$OUT" \
  >"$OUT/train_paths.log" 2>&1
echo "train_paths: exit $?" >>"$OUT/gpu.txt"

# 3. AutoAttack: standard cascade images/s at its default batch (250) and at 500
timeout "${AA_S:-90}" "$PY" benchmarks/bench_autoattack.py --device cuda --workload cifar \
  --n 500 --batch-sizes 500 --attacks standard --out-dir "$OUT" >"$OUT/autoattack.log" 2>&1
echo "autoattack: exit $?" >>"$OUT/gpu.txt"
