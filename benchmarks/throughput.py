"""Engine throughput against the teacher's raw forward rate on the same calls, on any device.

    python benchmarks/throughput.py --teacher T.safetensors [--device cuda] [--configs 8:256 88:256 512:4096] \
        [--method mbd] [--queries-per-pair 500] [--via-http] [--out throughput.json]

For each configuration ``CHUNK:MAX_BATCH`` (samples searched together : images per teacher call)
the soft-label engine runs on ``--chunks`` chunks of real training images, and every teacher call
it makes is recorded (its batch size). The same calls are then replayed on the bare teacher (its
forward pass and argmax on random images of those sizes, nothing else), so the ratio

    engine / raw = (the replay's time) / (the engine's time)

is the share of the engine's wall time that the teacher's own forward passes take, at exactly the
batch sizes the engine sent: the rest is the engine's own work (search steps, bookkeeping, checks).
The replay answers each call before the next one (a label must be in hand before the search can
use it), as the engine does; the pipelined replay (no wait between calls) is printed beside it.
The teacher's raw rate at fixed batch sizes (``--batches``) is reported too.

``--via-http`` puts the teacher behind ``zsdb3kd serve`` in another process and runs the engine
against its URL, so the ratio includes encoding, HTTP and the server. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from zsdb3kd.data import load_dataset
from zsdb3kd.oracle import load_oracle
from zsdb3kd.robustness import CandidatePool, RobustnessSettings, compute_robustness
from zsdb3kd.store import environment, write_json
from zsdb3kd.weights import load_weights


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def replay(model, sizes: list[int], shape, device: str, wait: bool) -> float:
    """Seconds the bare teacher takes for calls of ``sizes`` images (forward + argmax); ``wait``:
    each call's labels are in hand before the next call starts."""
    x = torch.rand(max(sizes), *shape, device=device)
    for s in sorted(set(sizes))[-3:]:  # warm-up (kernels chosen, memory cached)
        model(x[:s]).argmax(1)
    _sync(device)
    t0 = time.perf_counter()
    for s in sizes:
        y = model(x[:s]).argmax(1)
        if wait:
            y.cpu()
    _sync(device)
    return time.perf_counter() - t0


def raw_rate(model, batch: int, shape, device: str, seconds: float = 2.0) -> float:
    """Images/s of the bare teacher at a fixed batch size, pipelined (no wait between calls)."""
    calls = 8
    while True:  # grow the run until it lasts long enough to time
        t = replay(model, [batch] * calls, shape, device, wait=False)
        if t >= seconds / 4 or calls >= 1 << 20:
            return calls * batch / t
        calls *= 4


def run_config(args, model, info, train, chunk: int, max_batch: int, url: str | None) -> dict:
    """The engine on ``args.chunks`` chunks of ``chunk`` samples; its calls replayed on the bare teacher."""
    oracle = load_oracle(url or args.teacher, device=args.device, max_batch=max_batch)
    sizes: list[int] = []
    ask = oracle._predict  # the one place every teacher call passes through

    def spy(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return ask(x)

    oracle._predict = spy
    n = chunk * args.chunks
    x = train.x[:n].to(args.device)
    pool = CandidatePool(train.x.to(args.device), train.y.to(args.device))
    s = RobustnessSettings(method=args.method, queries_per_pair=args.queries_per_pair,
                           checkpoints=(args.queries_per_pair,), chunk_size=chunk)
    # a warm-up chunk of other images, not timed (a label server would answer repeats from its replay cache)
    compute_robustness(oracle, train.x[-chunk:].to(args.device), s, pool=pool, progress=False)
    sizes.clear()
    q0 = oracle.queries
    _sync(args.device)
    t0 = time.perf_counter()
    compute_robustness(oracle, x, s, pool=pool, progress=False)
    _sync(args.device)
    wall = time.perf_counter() - t0
    queries = oracle.queries - q0
    assert queries == sum(sizes), (queries, sum(sizes))  # every counted query went through the spy
    waited = replay(model, sizes, info.input_shape, args.device, wait=True)
    pipelined = replay(model, sizes, info.input_shape, args.device, wait=False)
    return {"chunk_size": chunk, "max_batch": max_batch, "samples": n, "queries": queries, "calls": len(sizes),
            "mean_call_images": round(queries / len(sizes), 1), "engine_s": round(wall, 3),
            "engine_queries_per_s": round(queries / wall), "raw_s": round(waited, 3),
            "raw_queries_per_s": round(queries / waited), "raw_pipelined_queries_per_s": round(queries / pipelined),
            "engine_over_raw": round(waited / wall, 3)}


def profile(args, model, info, train, url) -> None:
    """torch.profiler over the first configuration's run: the operations that take the host's time."""
    from torch.profiler import ProfilerActivity, profile as trace

    chunk, max_batch = (int(v) for v in args.configs[0].split(":"))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with trace(activities=acts) as prof:
        run_config(argparse.Namespace(**{**vars(args), "chunks": 1}), model, info, train, chunk, max_batch, url)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    Path(args.profile).write_text(f"{args.configs[0]} on {args.device}\n{table}\n")
    print(f"profile of {args.configs[0]} -> {args.profile}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="mbd")
    ap.add_argument("--queries-per-pair", type=int, default=500)
    ap.add_argument("--configs", nargs="+", default=["8:256", "88:256"],
                    help="CHUNK:MAX_BATCH pairs: samples searched together and images per teacher call "
                         "(88 is the default chunk at 500 queries per pair, 256 the default max batch)")
    ap.add_argument("--chunks", type=int, default=2, help="timed chunks per configuration (after one warm-up)")
    ap.add_argument("--batches", type=int, nargs="*", default=[256, 4096], help="fixed batch sizes for the raw rate")
    ap.add_argument("--via-http", action="store_true", help="query the teacher through 'zsdb3kd serve'")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--profile", default=None, help="also profile the first configuration (torch.profiler) and "
                                                    "write its busiest operations to this text file")
    args = ap.parse_args()
    model, info = load_weights(args.teacher, device=args.device)
    train = load_dataset(args.data, args.data_root, "train")
    server = url = None
    if args.via_http:
        server = subprocess.Popen([sys.executable, "-m", "zsdb3kd", "serve", args.teacher, "--port", "0",
                                   "--device", args.device], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        url = server.stdout.readline().split(" at ")[1].split()[0]
    try:
        rows = []
        for c in args.configs:
            chunk, max_batch = (int(v) for v in c.split(":"))
            r = run_config(args, model, info, train, chunk, max_batch, url)
            rows.append(r)
            via = " via HTTP" if url else ""
            print(f"chunk {chunk:5d} x max batch {max_batch:6d}{via}: {r['queries']:>11,} queries in {r['calls']:,} "
                  f"calls ({r['mean_call_images']:,.0f} images each): engine {r['engine_queries_per_s']:>11,} q/s, "
                  f"raw on the same calls {r['raw_queries_per_s']:>11,} q/s (pipelined "
                  f"{r['raw_pipelined_queries_per_s']:,}): engine / raw = {r['engine_over_raw']:.1%}", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    if args.profile:
        profile(args, model, info, train, url)
    fixed = {b: round(raw_rate(model, b, info.input_shape, args.device)) for b in args.batches}
    for b, r in fixed.items():
        print(f"teacher raw forward at batch {b}: {r:,} images/s (pipelined)")
    if args.out:
        doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "environment": environment(),
               "device": args.device, "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda")
               else None, "teacher": info.arch, "method": args.method, "queries_per_pair": args.queries_per_pair,
               "via_http": bool(url), "runs": rows, "raw_images_per_s_at_batch": fixed}
        write_json(args.out, doc)
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
