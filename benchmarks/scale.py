"""Scale-out of the soft-label stage (``zsdb3kd robustness``) under torchrun, and what a
full-scale run would take.

    python benchmarks/scale.py [--teacher T.safetensors] [--samples 32] [--queries-per-pair 500] \
        [--chunk-size 8] [--device cpu] [--out docs/results/scale.json]

Measures, on this machine:

* the teacher's raw forward rate at the oracle's chunk size (images/s, one thread per process);
* the soft-label stage (the paper's MBD, every sample against every other class) on the same
  ``--samples`` training images run as the CLI runs it: one process with one thread, one process
  with two threads, and ``torchrun --nproc-per-node 2`` (one thread each). Each run's end-to-end
  wall time (start-up and data loading included) and the stage's own wall time and query rate
  (from the result's provenance); the sharded result is checked to be the one-process bits;
* the per-query cost, and the projected time of full-scale MNIST DB3KD (60,000 images x 9 targets
  x 2,000 queries, plus 60,000 labels) on one process, on ``8`` ranks of this machine's kind
  at the measured 1 -> 2 scaling efficiency, and on 8 GPUs from a GPU's measured rate (``--device
  cuda`` here, or ``--gpu-queries-per-s`` measured elsewhere; otherwise left out, not guessed).

Without ``--teacher`` a LeNet-5 (the MNIST DB3KD teacher) is trained for one epoch on 10,000
Fashion-MNIST images: a query costs what it costs on MNIST (same shape, same network). Writes
its numbers to ``--out`` (JSON) and prints them.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from zsdb3kd.data import load_dataset
from zsdb3kd.distill import TrainSettings, train
from zsdb3kd.models import create_model
from zsdb3kd.robustness import RobustnessResult
from zsdb3kd.store import environment, write_json
from zsdb3kd.weights import load_weights, save_weights

FULL = {"images": 60_000, "targets": 9, "queries_per_pair": 2_000}
FULL_QUERIES = FULL["images"] * (1 + FULL["targets"] * FULL["queries_per_pair"])


def quick_teacher(path: Path) -> Path:
    """A LeNet-5 trained for one epoch on 10,000 Fashion-MNIST images (about 80% accurate)."""
    train_set = load_dataset("fashion-mnist", split="train")
    x, y = train_set.x[:10_000], train_set.y[:10_000]
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, input_shape=(1, 28, 28))
    train(model, x[:9_000], y[:9_000], x[9_000:], y[9_000:], TrainSettings(epochs=1, batch_size=128, lr=2e-3),
          progress=False)
    return save_weights(model, path, arch="lenet5", input_shape=(1, 28, 28), num_classes=10)


def raw_rate(teacher: Path, batch: int, device: str, seconds: float = 3.0) -> float:
    """Teacher forward passes (argmax included) per second at ``batch`` images per call."""
    model, info = load_weights(teacher, device=device)
    x = torch.rand(batch, *info.input_shape, device=device)
    n = 0
    with torch.no_grad():
        model(x).argmax(1)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x).argmax(1)
            n += batch
        sync()
    return n / (time.perf_counter() - t0)


def run_stage(args, teacher: Path, out: Path, procs: int, threads: int) -> tuple[dict, RobustnessResult]:
    """One soft-label run through the CLI; its wall times and rates."""
    cli = ["robustness", "--teacher", str(teacher), "--data", "fashion-mnist", "--subset", str(args.samples),
           "--method", "mbd", "--queries-per-pair", str(args.queries_per_pair), "--checkpoints",
           str(args.queries_per_pair), "--chunk-size", str(args.chunk_size), "--device", args.device, "--out", str(out),
           "--no-progress"]
    if procs == 1:
        cmd = [sys.executable, "-m", "zsdb3kd", *cli]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "zsdb3kd", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    res = RobustnessResult.load(out)
    p = res.provenance
    return {"processes": procs, "threads_per_process": threads, "end_to_end_s": round(wall, 2),
            "stage_s": p["wall_time_s"], "queries": p["queries_this_session"],
            "stage_queries_per_s": p["queries_per_s"], "queries_per_rank": p.get("queries_per_rank", [p["queries_this_session"]])}, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="weights file (default: a quickly trained LeNet-5)")
    ap.add_argument("--samples", type=int, default=32, help="training images labelled in each run")
    ap.add_argument("--queries-per-pair", type=int, default=500)
    ap.add_argument("--chunk-size", type=int, default=8, help="samples per chunk: several chunks per rank (the "
                                                               "default, about a minute of queries, would be one)")
    ap.add_argument("--batch", type=int, default=256, help="the oracle's chunk size (for the raw forward rate)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ranks", type=int, default=8, help="ranks of the projection")
    ap.add_argument("--gpu-queries-per-s", type=float, default=None,
                    help="one GPU rank's measured engine rate (queries/s), for the 8-GPU projection")
    ap.add_argument("--out", default="docs/results/scale.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zsdb3kd-scale-"))
    teacher = Path(args.teacher) if args.teacher else quick_teacher(tmp / "lenet5.safetensors")

    torch.set_num_threads(1)
    raw = raw_rate(teacher, args.batch, args.device)
    one, ref = run_stage(args, teacher, tmp / "one.safetensors", 1, 1)
    runs = [one, run_stage(args, teacher, tmp / "one-2threads.safetensors", 1, 2)[0]]
    doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "environment": environment(),
           "cpu_count": os.cpu_count(), "gpu_count": torch.cuda.device_count(),
           "teacher": "lenet5 (quick)" if args.teacher is None else str(teacher), "device": args.device,
           "samples": args.samples, "chunk_size": args.chunk_size, "queries_per_pair": args.queries_per_pair,
           "method": "mbd", "raw_forward_images_per_s": round(raw),
           "engine_over_raw": round(one["stage_queries_per_s"] / raw, 3), "runs": runs,
           "speedup_2_threads": round(one["stage_s"] / runs[1]["stage_s"], 2)}
    efficiency = 1.0  # assumed where it cannot be measured (one GPU)
    if not args.device.startswith("cuda") or torch.cuda.device_count() >= 2:
        two, res = run_stage(args, teacher, tmp / "two.safetensors", 2, 1)
        runs.append(two)
        efficiency = min(1.0, one["stage_s"] / two["stage_s"] / 2)  # 1.0: two ranks take half the time
        doc["sharded_equals_one_process"] = bool(torch.equal(res.distances.nan_to_num(-1),
                                                             ref.distances.nan_to_num(-1))
                                                 and torch.equal(res.queries, ref.queries))
        doc["speedup_2_processes"] = round(one["stage_s"] / two["stage_s"], 2)
    doc["load_average"] = list(os.getloadavg())  # after the runs: other jobs on the machine
    per_query = one["stage_s"] / one["queries"]
    proj = {"queries": FULL_QUERIES, "per_query_s": per_query,
            "one_process_h": round(FULL_QUERIES * per_query / 3600, 1),
            "ranks": args.ranks, "ranks_like_this_h": round(FULL_QUERIES * per_query / (args.ranks * efficiency)
                                                            / 3600, 1),
            "assumes": f"{args.ranks} ranks like the measured one (one core, or one GPU) at the measured one-process "
                       f"per-query cost and a 1 -> 2 scaling efficiency of {efficiency:.2f}; chunks are independent, "
                       "so on separate cores or GPUs the ideal efficiency is 1"}
    gpu_rate = args.gpu_queries_per_s
    if gpu_rate is None and args.device.startswith("cuda"):
        gpu_rate = one["stage_queries_per_s"]
    proj["gpus_h"] = round(FULL_QUERIES / (args.ranks * gpu_rate) / 3600, 2) if gpu_rate else None
    proj["gpu_queries_per_s"] = gpu_rate or ("not measured: no GPU here; run this benchmark with --device cuda on a "
                                             "GPU machine, or pass --gpu-queries-per-s")
    doc["projection_full_mnist_db3kd"] = proj
    write_json(args.out, doc)
    for r in runs:
        print(f"{r['processes']} process(es) x {r['threads_per_process']} thread(s): stage {r['stage_s']:.1f} s "
              f"({r['stage_queries_per_s']:,.0f} q/s), end to end {r['end_to_end_s']:.1f} s")
    print(f"raw teacher forward {raw:,.0f} images/s at batch {args.batch}; engine / raw = {doc['engine_over_raw']:.0%}")
    if "speedup_2_processes" in doc:
        print(f"2 processes: x{doc['speedup_2_processes']}, same bits as one process: "
              f"{doc['sharded_equals_one_process']}")
    print(f"2 threads: x{doc['speedup_2_threads']}")
    print(f"full MNIST DB3KD ({FULL_QUERIES:,} queries): {proj['one_process_h']} h on one process, "
          f"{proj['ranks_like_this_h']} h on {args.ranks} such ranks, {proj['gpus_h']} h on {args.ranks} GPUs "
          f"-> {args.out}")

if __name__ == "__main__":
    main()
