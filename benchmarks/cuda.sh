#!/usr/bin/env bash
# --device cuda end to end on one GPU, and the engine's rate against the teacher's raw forward rate.
#
#   bash benchmarks/cuda.sh [TEACHER] [FASHION_MNIST_DIR]
#
# TEACHER: a Fashion-MNIST LeNet-5 weights file (default runs/bench-teachers/fashion-mnist-lenet5.safetensors,
# which benchmarks/budget.py trains). Writes into $OUT (default runs/cuda-check):
#   tests.log               the CUDA tests (oracle, estimators, synthesis, training on the GPU)
#   throughput-cuda.json    benchmarks/throughput.py: engine / raw at several chunk and batch sizes
#   profile-cuda.txt        where the host's time goes in the first configuration (torch.profiler)
#   throughput-http.json    the same through 'zsdb3kd serve --device cuda' on 127.0.0.1
#   extract-cuda.log        'zsdb3kd extract' (the budgeted student, 50,000 queries) on the GPU, timed
# Each step has its own time limit, so a failing step still leaves the others' results.
set -u
TEACHER=${1:-runs/bench-teachers/fashion-mnist-lenet5.safetensors}
DATA=${2:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/cuda-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

echo "== CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py -k cuda -rs 2>&1 | tee "$OUT/tests.log" | tail -5

echo "== engine / raw, local teacher on the GPU"
timeout 150 $PY benchmarks/throughput.py --teacher "$TEACHER" --data-root "$DATA" --device cuda \
  --configs 512:4096 8:256 88:256 2048:16384 --batches 256 4096 16384 --out "$OUT/throughput-cuda.json" \
  --profile "$OUT/profile-cuda.txt" 2>&1 \
  | grep -v '^robustness\['

echo "== engine / raw, the teacher behind zsdb3kd serve --device cuda"
timeout 100 $PY benchmarks/throughput.py --teacher "$TEACHER" --data-root "$DATA" --device cuda --via-http \
  --queries-per-pair 200 --configs 88:256 512:1024 --chunks 1 --batches --out "$OUT/throughput-http.json" 2>&1 | grep -v '^robustness\['

echo "== budgeted student, 50,000 queries, on the GPU"
start=$SECONDS
timeout 240 $PY -m zsdb3kd extract --teacher "$TEACHER" --data-root "$DATA" --budget 50000 --device cuda \
  --out "$OUT/student-50k.safetensors" > "$OUT/extract-cuda.log" 2>&1
echo "rc $? in $((SECONDS - start)) s"
tail -4 "$OUT/extract-cuda.log"
