"""A bounded load test of the label server: 10 clients for a few seconds, no errors, and
the throughput and latency percentiles reported (``-s`` shows them); then the teacher's
throughput in process and through HTTP, side by side.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from test_server_support import ServerProcess, expected_labels, images, lenet

from zsdb3kd.oracle import HttpOracle, TorchOracle

CLIENTS, SECONDS, BATCH = 10, 3.0, 32


def test_ten_clients_for_a_few_seconds_get_every_answer_right(capsys):
    with ServerProcess({"max_batch": 256}) as server:
        pools = [[images(BATCH, seed=1000 * c + i) for i in range(8)] for c in range(CLIENTS)]
        expected = [[expected_labels(x) for x in pool] for pool in pools]
        latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
        errors: list[str] = []
        start = threading.Barrier(CLIENTS + 1)

        def client(c: int) -> None:
            o = HttpOracle(server.url, concurrency=1, deadline=30)
            start.wait()
            t_end = time.monotonic() + SECONDS
            i = 0
            while time.monotonic() < t_end:
                x = pools[c][i % 8] + 0
                x[0, 0, 0, 0] = (i // 8) / 1e6  # a distinct request each time, so nothing is replayed
                t0 = time.perf_counter()
                try:
                    labels = o(x)
                except Exception as e:  # collected, asserted below
                    errors.append(repr(e))
                    return
                latencies[c].append(time.perf_counter() - t0)
                if not torch.equal(labels[1:], expected[c][i % 8][1:]):
                    errors.append(f"client {c}: wrong labels")
                i += 1
            o.close()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(SECONDS + 60)
        elapsed = time.monotonic() - t0
        lat = np.array([v for per in latencies for v in per])
        with capsys.disabled():
            print(f"\nload: {CLIENTS} clients x {elapsed:.1f} s, {BATCH} images a request: {len(lat) / elapsed:.0f} "
                  f"requests/s, {len(lat) * BATCH / elapsed:.0f} images/s, latency p50 "
                  f"{np.percentile(lat, 50) * 1e3:.1f} ms, p99 {np.percentile(lat, 99) * 1e3:.1f} ms")
        assert errors == []
        assert all(len(per) >= 5 for per in latencies)  # nobody starved
        assert server.stop() == 0


def test_throughput_in_process_and_through_http(capsys):
    x = torch.rand(2048, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def rate(oracle, repeats: int = 3) -> float:
        oracle(x[:256])
        best = float("inf")
        for r in range(repeats):
            xr = x + 0
            xr[:, 0, 0, 0] = r / 1e3  # new bytes each repeat: nothing answered from a cache
            t0 = time.perf_counter()
            oracle(xr)
            best = min(best, time.perf_counter() - t0)
        return len(x) / best

    local = rate(TorchOracle(lenet(), (1, 28, 28), 10, max_batch=256))
    with ServerProcess({"max_batch": 256}, arch="lenet5") as server:
        remote = rate(HttpOracle(server.url, max_batch=256, concurrency=2))
    with capsys.disabled():
        print(f"\nLeNet-5, chunks of 256, one thread each side: in process {local:.0f} images/s, "
              f"through HTTP {remote:.0f} images/s ({remote / local:.0%})")
    assert remote > 0.1 * local
