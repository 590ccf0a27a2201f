"""Faults between the client and the label server: the run still completes with the clean
run's results, the client's ``paid`` equals what the server billed, and with a query log
a rerun after a failure or a kill pays for nothing twice.

A proxy (test_server_support.FaultProxy) injects 500s before and after the server
answered, 503s, delays, dropped connections before and after, and truncated answers; the
server (a subprocess with a state file) is killed and restarted mid-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import SHAPE, LinearTeacher
from test_server_support import TESTS, FaultProxy, K, ServerProcess, images

from zsdb3kd.oracle import HttpOracle, OracleError, TorchOracle
from zsdb3kd.robustness import RobustnessSettings, compute_robustness

SETTINGS = RobustnessSettings(method="hsja", queries_per_pair=150, checkpoints=(50, 150), chunk_size=3, seed=4)
FAULTS = {"500": 0.02, "500-after": 0.02, "503": 0.03, "delay": 0.04, "drop": 0.03, "drop-before": 0.02,
          "truncate": 0.03}
FAST = {"backoff": 0.01, "backoff_max": 0.2, "max_batch": 16}


@pytest.fixture(scope="module")
def clean():
    """The in-process run, and the number of distinct images it asks (what a logged run pays)."""
    x = images(6, seed=1)
    oracle = TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K)
    result = compute_robustness(oracle, x, SETTINGS)
    return x, result


def distinct_images(x, tmp_path) -> int:
    oracle = TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K, query_log=tmp_path / "distinct.qlog",
                         teacher_id="linear-3")
    compute_robustness(oracle, x, SETTINGS)
    return oracle.paid


def same(a, b) -> bool:
    return torch.equal(a.queries, b.queries) and torch.allclose(a.distances, b.distances, rtol=0, atol=0,
                                                                equal_nan=True)


def billed(server: ServerProcess) -> int:
    return HttpOracle(server.url, input_shape=SHAPE, num_classes=K).usage()["queries"]


def test_injected_faults_and_a_restart_leave_results_and_counts_exact(clean, tmp_path, capsys):
    x, expected = clean
    with ServerProcess({"state": str(tmp_path / "state.sqlite")}) as server:
        proxy = FaultProxy(server.url, FAULTS, seed=7)
        restarts = []

        def kill_and_restart(n: int) -> None:
            if n == 60:  # mid-run: kill -9 (requests in flight are lost) and come back on the same port
                restarts.append(threading.Thread(target=server.restart))
                restarts[-1].start()

        proxy.on_forward = kill_and_restart
        try:
            o = HttpOracle(proxy.url, concurrency=2, **FAST)
            result = compute_robustness(o, x, SETTINGS)
        finally:
            proxy.close()
        for t in restarts:
            t.join(60)
        assert restarts, "the server was never restarted"
        assert same(result, expected)
        faults = sum(v for k, v in proxy.counts.items() if k != "delay")
        assert faults >= 10 and o.retries + o.reconnects >= faults
        assert o.paid == billed(server) <= o.queries
        with capsys.disabled():
            print(f"\nfaults {json.dumps(proxy.counts)} and a kill -9 + restart: retries {o.retries}, reconnects "
                  f"{o.reconnects}, "
                  f"queries {o.queries}, paid {o.paid}, server billed {billed(server)}")


def test_a_server_down_for_a_while_is_ridden_out(tmp_path):
    with ServerProcess({"state": str(tmp_path / "state.sqlite")}) as server:
        o = HttpOracle(server.url, backoff=0.05, backoff_max=0.5)
        server.kill()
        restarted = threading.Thread(target=lambda: (_wait_for(lambda: o.retries >= 3), server.start()))
        restarted.start()
        x = images(40)
        labels = o(x)
        restarted.join(60)
        assert torch.equal(labels, LinearTeacher(seed=3, k=K)(x).argmax(1))
        assert o.retries >= 3 and o.paid == billed(server) == 40


def test_with_a_query_log_a_rerun_after_the_server_went_away_pays_nothing_twice(clean, tmp_path):
    x, expected = clean
    log = tmp_path / "run.qlog"
    with ServerProcess({"state": str(tmp_path / "state.sqlite")}) as server:
        proxy = FaultProxy(server.url, {})
        proxy.on_forward = lambda n: server.kill() if n == 50 else None
        first = HttpOracle(proxy.url, query_log=log, concurrency=2, deadline=1.0, **FAST)
        with pytest.raises(OracleError):
            compute_robustness(first, x, SETTINGS)
        assert first.log_stats()["records"] > 0
        server.start()
        again = HttpOracle(proxy.url, query_log=log, concurrency=2, **FAST)
        result = compute_robustness(again, x, SETTINGS)
        proxy.close()
        assert same(result, expected)
        assert again.log_stats()["hits"] >= first.log_stats()["records"]
        assert billed(server) == distinct_images(x, tmp_path)  # every image paid exactly once


_CLIENT = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_server_faults import SETTINGS, FAST
from test_server_support import images
from zsdb3kd.oracle import HttpOracle
from zsdb3kd.robustness import compute_robustness
compute_robustness(HttpOracle(sys.argv[1], query_log=sys.argv[2], concurrency=2, **FAST), images(6, seed=1),
                   SETTINGS)
"""


def test_with_a_query_log_a_rerun_after_the_client_was_killed_pays_nothing_twice(clean, tmp_path):
    x, expected = clean
    log = tmp_path / "run.qlog"
    total = distinct_images(x, tmp_path)
    with ServerProcess({"state": str(tmp_path / "state.sqlite")}) as server:
        client = subprocess.Popen([sys.executable, "-c", _CLIENT.format(tests=str(TESTS)), server.url, str(log)],
                                  stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: billed(server) >= total // 3 or client.poll() is not None, timeout=120)
            client.kill()  # kill -9, mid-run
            client.wait(30)
        finally:
            if client.poll() is None:
                client.kill()
        assert 0 < billed(server) < total, client.stderr.read()
        again = HttpOracle(server.url, query_log=log, concurrency=2, **FAST)
        result = compute_robustness(again, x, SETTINGS)
        assert same(result, expected)
        assert billed(server) == total  # what the killed client had asked was not paid again
        assert again.log_stats()["hits"] > 0


def _wait_for(condition, timeout: float = 60.0) -> None:
    t_end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > t_end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)  # polling the condition itself, bounded by the timeout
