#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the main job: DB3KD on Fashion-MNIST with a
# LeNet-5 teacher and a LeNet-5-half student. Artifacts and report: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m zsdb3kd run configs/fashion-mnist/db3kd/quickstart.toml --run-dir runs/quickstart "$@"
