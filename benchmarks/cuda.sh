#!/usr/bin/env bash
# --device cuda end to end on one GPU, and the engine's rate against the teacher's raw forward rate.
#
#   bash benchmarks/cuda.sh [TEACHER] [FASHION_MNIST_DIR]
#
# TEACHER: a Fashion-MNIST LeNet-5 weights file (default runs/bench-teachers/fashion-mnist-lenet5.safetensors,
# which benchmarks/budget.py trains). STEPS picks the steps (default "tests throughput http extract"); each
# writes into $OUT (default runs/cuda-check):
#   tests       tests.log: the CUDA tests (oracle, estimators, synthesis, training on the GPU)
#   throughput  throughput-cuda.json: benchmarks/throughput.py, engine / raw at several chunk and batch
#               sizes; profile-cuda.txt: where the host's time goes in the first one (torch.profiler)
#   quick       throughput-{mbd,hybrid}.json: engine / raw at 2048:16384 only, MBD and hybrid
#   http        throughput-http.json: the same through 'zsdb3kd serve --device cuda' on 127.0.0.1
#   extract     extract-cuda.log: 'zsdb3kd extract' (the budgeted student, EXTRACT_BUDGET queries, default
#               50,000, within EXTRACT_LIMIT seconds, default 240), timed
#   budget      budget-gpu.json, cell-*.log: benchmarks/budget.py cells on the GPU, one process each, all
#               at once; CELLS lists METHOD:BUDGET:SEED, CELL_LIMIT is each one's time limit (s)
# Each step has its own time limit, so a failing step still leaves the others' results.
set -u
TEACHER=${1:-runs/bench-teachers/fashion-mnist-lenet5.safetensors}
DATA=${2:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/cuda-check}
STEPS=${STEPS:-tests throughput http extract}
CELLS=${CELLS:-"budgeted:50000:0 budgeted:50000:1 budgeted:50000:2"}
CELL_LIMIT=${CELL_LIMIT:-400}
EXTRACT_BUDGET=${EXTRACT_BUDGET:-50000}
EXTRACT_LIMIT=${EXTRACT_LIMIT:-240}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

for step in $STEPS; do
  case $step in
  tests)
    echo "== CUDA tests"
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_robustness.py -k cuda -rs \
      2>&1 | tee "$OUT/tests.log" | tail -5 ;;
  throughput)
    echo "== engine / raw, local teacher on the GPU"
    timeout 150 $PY benchmarks/throughput.py --teacher "$TEACHER" --data-root "$DATA" --device cuda \
      --configs 512:4096 8:256 88:256 2048:16384 --batches 256 4096 16384 --out "$OUT/throughput-cuda.json" \
      --profile "$OUT/profile-cuda.txt" 2>&1 | grep -v '^robustness\[' ;;
  quick)
    for method in mbd hybrid; do
      echo "== engine / raw, $method, 2048:16384"
      timeout 45 $PY benchmarks/throughput.py --teacher "$TEACHER" --data-root "$DATA" --device cuda --method $method \
        --configs 2048:16384 --chunks 1 --batches 16384 --out "$OUT/throughput-$method.json" 2>&1 | grep -v '^robustness\['
    done ;;
  http)
    echo "== engine / raw, the teacher behind zsdb3kd serve --device cuda"
    timeout 100 $PY benchmarks/throughput.py --teacher "$TEACHER" --data-root "$DATA" --device cuda --via-http \
      --queries-per-pair 200 --configs 88:256 512:1024 --chunks 1 --batches --out "$OUT/throughput-http.json" 2>&1 \
      | grep -v '^robustness\[' ;;
  extract)
    echo "== budgeted student, $EXTRACT_BUDGET queries, on the GPU"
    start=$SECONDS
    timeout "$EXTRACT_LIMIT" $PY -m zsdb3kd extract --teacher "$TEACHER" --data-root "$DATA" --budget "$EXTRACT_BUDGET" \
      --device cuda --out "$OUT/student-$EXTRACT_BUDGET.safetensors" > "$OUT/extract-cuda.log" 2>&1
    echo "rc $? in $((SECONDS - start)) s"
    tail -4 "$OUT/extract-cuda.log" ;;
  budget)
    echo "== budgeted cells on the GPU, one process each: $CELLS"
    start=$SECONDS
    for cell in $CELLS; do
      IFS=: read -r method budget seed <<< "$cell"
      OMP_NUM_THREADS=2 timeout "$CELL_LIMIT" $PY benchmarks/budget.py --datasets fashion-mnist \
        --data-root "fashion-mnist=$DATA" --device cuda --methods "$method" --budgets "$budget" --seeds "$seed" \
        --out "$OUT/budget-gpu.json" > "$OUT/cell-$method-$budget-$seed.log" 2>&1 &
    done
    wait
    echo "cells done in $((SECONDS - start)) s"
    tail -n 2 "$OUT"/cell-*.log ;;
  *) echo "unknown step $step"; exit 2 ;;
  esac
done
