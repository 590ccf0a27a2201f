"""Engine throughput against the teacher's raw forward throughput at the same batch size.

    python benchmarks/throughput.py --teacher runs/quickstart/teacher-*.safetensors [--method mbd] [--via-http]

Prints: raw forward images/s of the teacher at the oracle's chunk size (measured right before
and right after), the robustness engine's teacher queries/s on real samples, and the ratio
(the engine's own work is the difference). Run it on an otherwise idle machine.

``--via-http`` puts the teacher behind ``zsdb3kd serve`` in another process (one thread) and
runs the engine against its URL, so the ratio includes encoding, HTTP and the server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from zsdb3kd.data import load_dataset
from zsdb3kd.oracle import load_oracle
from zsdb3kd.robustness import CandidatePool, RobustnessSettings, compute_robustness
from zsdb3kd.weights import load_weights


def raw_rate(model, batch: int, shape, seconds: float = 3.0) -> float:
    x = torch.rand(batch, *shape)
    n = 0
    with torch.no_grad():
        model(x).argmax(1)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x).argmax(1)
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--method", default="mbd")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256, help="oracle chunk size")
    ap.add_argument("--via-http", action="store_true", help="query the teacher through 'zsdb3kd serve'")
    args = ap.parse_args()
    model, info = load_weights(args.teacher)
    train = load_dataset(args.data, args.data_root, "train")
    server = None
    if args.via_http:
        server = subprocess.Popen([sys.executable, "-m", "zsdb3kd", "serve", args.teacher, "--port", "0"],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        url = server.stdout.readline().split(" at ")[1].split()[0]
        oracle = load_oracle(url, max_batch=args.batch)
    else:
        oracle = load_oracle(args.teacher, max_batch=args.batch)
    before = raw_rate(model, args.batch, info.input_shape)
    s = RobustnessSettings(method=args.method, queries_per_pair=args.budget, checkpoints=(), chunk_size=args.samples)
    t0 = time.perf_counter()
    compute_robustness(oracle, train.x[: args.samples], s, pool=CandidatePool(train.x, train.y), progress=False)
    wall = time.perf_counter() - t0
    if server is not None:
        server.terminate()
        server.wait()
    after = raw_rate(model, args.batch, info.input_shape)
    raw = (before + after) / 2
    eng = oracle.queries / wall
    print(f"teacher raw forward at batch {args.batch}: {before:,.0f} / {after:,.0f} images/s (before/after)")
    via = " via HTTP" if args.via_http else ""
    print(f"engine{via} ({args.method}, {args.samples} samples x {oracle.num_classes - 1} targets, budget {args.budget}): "
          f"{oracle.queries:,} queries in {wall:.1f} s = {eng:,.0f} q/s")
    print(f"engine / raw = {eng / raw:.1%}")


if __name__ == "__main__":
    main()
