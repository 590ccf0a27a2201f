"""A teacher behind HTTP: ``zsdb3kd.serve`` (the label server) and ``HttpOracle`` (its client).

Both ends run here for real, on a free localhost port: labels must equal the in-process
teacher's, both ends must count the same queries, budgets and quotas must refuse whole
requests before the model sees them, and failures must be retried or reported.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SHAPE, LinearTeacher
from safetensors.torch import load_file

from zsdb3kd.oracle import (
    PROTOCOL, HttpOracle, OracleError, QueryBudgetExceeded, TorchOracle, encode_images, load_oracle,
)
from zsdb3kd.robustness import RobustnessSettings, compute_robustness
from zsdb3kd.serve import LabelServer, make_server
from zsdb3kd.weights import save_weights

K = 4


class Recorder(LinearTeacher):
    """The conftest linear teacher, recording every batch it is asked."""

    def __init__(self) -> None:
        super().__init__(seed=3, k=K)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(int(x.shape[0]))
        return super().forward(x)


@pytest.fixture
def served(request):
    """Start a label server on a free port; yields (server, model); stopped after the test."""
    servers = []

    def start(*, budget=None, max_batch=1024, model=None, server_cls=LabelServer, **kwargs):
        model = model or Recorder()
        srv = server_cls(TorchOracle(model, SHAPE, K, budget=budget, max_batch=10_000), "127.0.0.1", 0,
                         max_batch=max_batch, **kwargs)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv, model

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _x(n, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _raw(srv, method, path, body=None, headers=None):
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, json.loads(r.read())
    c.close()
    return out


# ---------------------------------------------------------------------------------------
# labels and accounting
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
def test_labels_equal_the_in_process_teacher_and_both_ends_count_the_same(served, concurrency):
    srv, model = served(max_batch=16)
    o = HttpOracle(srv.url, concurrency=concurrency, max_batch=64)
    assert (o.input_shape, o.num_classes, o.max_batch) == (SHAPE, K, 16)  # the server's max_batch wins
    x = _x(100)
    with torch.no_grad():
        expected = LinearTeacher(seed=3, k=K)(x).argmax(1)
    assert torch.equal(o(x), expected)
    assert sorted(model.calls) == [4] + [16] * 6
    assert o.queries == srv.oracle.queries == 100 == sum(model.calls)
    assert o.retries == 0
    o.close()


def test_info_describes_the_teacher(served):
    srv, _ = served(budget=500, model_sha256="ab" * 32)
    status, info = _raw(srv, "GET", "/info")
    assert status == 200
    assert info == {"protocol": PROTOCOL, "input_shape": list(SHAPE), "num_classes": K, "bounds": [0.0, 1.0],
                    "max_batch": 1024, "model_sha256": "ab" * 32, "queries": 0, "max_queries": 500}
    assert HttpOracle(srv.url).sha256 == "ab" * 32


def test_client_budget_refuses_before_anything_is_sent(served):
    srv, model = served()
    o = HttpOracle(srv.url, budget=10)
    o(_x(6))
    with pytest.raises(QueryBudgetExceeded):
        o(_x(5))
    assert o.queries == srv.oracle.queries == 6 and sum(model.calls) == 6


def test_server_quota_refuses_whole_requests_and_the_client_counts_what_was_answered(served):
    srv, model = served(budget=10, max_batch=4)
    o = HttpOracle(srv.url, concurrency=1, retries=3, backoff=0)
    with pytest.raises(OracleError, match="quota exhausted"):
        o(_x(12))  # chunks of 4: two answered, the third would pass the quota of 10
    assert o.queries == srv.oracle.queries == sum(model.calls) == 8
    assert o.retries == 0  # a refusal is not retried
    o(_x(2))  # what is left of the quota still works
    assert o.queries == srv.oracle.queries == 10


def test_concurrent_chunks_after_a_refusal_are_still_counted(served):
    # 3 chunks of 4 in flight at once with a quota of 6: exactly one chunk is answered,
    # whichever the server takes first, and the client must count it even if it is not the first
    srv, _ = served(budget=6, max_batch=4)
    o = HttpOracle(srv.url, concurrency=3, retries=0)
    with pytest.raises(OracleError, match="quota exhausted"):
        o(_x(12))
    assert o.queries == srv.oracle.queries == 4


class FlakyServer(LabelServer):
    """Answers 503 to the first ``fail`` requests to /predict, then behaves."""

    def __init__(self, *args, fail=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail = fail
        handler = self.RequestHandlerClass

        class Flaky(handler):
            def do_POST(inner):  # noqa: N805
                if inner.server.fail > 0:
                    inner.server.fail -= 1
                    inner.rfile.read(int(inner.headers["Content-Length"]))
                    inner._send(503, {"error": "busy"})
                    return
                handler.do_POST(inner)

        self.RequestHandlerClass = Flaky


def test_busy_server_is_retried_and_each_image_counted_once(served):
    srv, model = served(server_cls=FlakyServer, fail=2)
    o = HttpOracle(srv.url, backoff=0.01, retries=2)
    x = _x(5)
    assert torch.equal(o(x), TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K)(x))
    assert o.retries == 2 and o.queries == 5 == sum(model.calls)


def test_busy_server_past_the_retries_is_an_error_naming_the_last_status(served):
    srv, model = served(server_cls=FlakyServer, fail=10)
    o = HttpOracle(srv.url, backoff=0, retries=2)
    with pytest.raises(OracleError, match=r"failed 3 times; last: HTTP 503 .*busy"):
        o(_x(5))
    assert o.queries == 0 and model.calls == []


def test_unreachable_server_is_a_clear_error(served):
    srv, _ = served()
    url = srv.url
    srv.shutdown()
    srv.server_close()
    t0 = time.perf_counter()
    with pytest.raises(OracleError, match=rf"GET {url}/info failed 2 times; last: ConnectionRefusedError"):
        HttpOracle(url, retries=1, backoff=0)
    assert time.perf_counter() - t0 < 5


def test_malformed_requests_get_a_status_and_a_reason(served):
    srv, model = served(max_batch=4)
    assert _raw(srv, "POST", "/predict", b"not json")[0] == 400
    status, body = _raw(srv, "POST", "/predict", json.dumps({"shape": [1, 1, 8, 8], "data": "AAAA"}).encode())
    assert status == 400 and "bytes" in body["error"]
    status, body = _raw(srv, "POST", "/predict", json.dumps(encode_images(torch.rand(2, 1, 4, 4))).encode())
    assert status == 400 and "shape" in body["error"]
    status, body = _raw(srv, "POST", "/predict", json.dumps(encode_images(_x(2) + 1.0)).encode())
    assert status == 400 and "outside bounds" in body["error"]
    status, body = _raw(srv, "POST", "/predict", json.dumps(encode_images(_x(5))).encode())
    assert status == 413 and "max_batch" in body["error"]
    assert _raw(srv, "GET", "/nowhere")[0] == 404
    assert model.calls == [] and srv.oracle.queries == 0


def test_token_is_required_when_set_and_taken_from_the_environment(served, monkeypatch):
    srv, model = served(token="s3cret")
    monkeypatch.delenv("ZSDB3KD_HTTP_AUTH", raising=False)
    with pytest.raises(OracleError, match="HTTP 401"):
        HttpOracle(srv.url)
    monkeypatch.setenv("ZSDB3KD_HTTP_AUTH", "Bearer wrong")
    with pytest.raises(OracleError, match="HTTP 401"):
        HttpOracle(srv.url)
    monkeypatch.setenv("ZSDB3KD_HTTP_AUTH", "Bearer s3cret")
    o = HttpOracle(srv.url)
    o(_x(3))
    assert o.queries == 3 == sum(model.calls)
    assert "s3cret" not in repr(o) and "s3cret" not in json.dumps(o.info)


def test_command_line_settings_come_from_the_environment(served, monkeypatch):
    srv, _ = served()
    monkeypatch.setenv("ZSDB3KD_HTTP_CONCURRENCY", "5")
    monkeypatch.setenv("ZSDB3KD_HTTP_RETRIES", "7")
    monkeypatch.setenv("ZSDB3KD_HTTP_TIMEOUT", "2.5")
    o = load_oracle(srv.url, budget=9)
    assert (o.concurrency, o.max_retries, o.timeout, o.budget) == (5, 7, 2.5, 9)
    monkeypatch.setenv("ZSDB3KD_HTTP_RETRIES", "many")
    with pytest.raises(ValueError, match="ZSDB3KD_HTTP_RETRIES='many' is not a valid int"):
        load_oracle(srv.url)
    monkeypatch.setenv("ZSDB3KD_HTTP_RETRIES", "-1")
    with pytest.raises(ValueError, match="retries >= 0"):
        load_oracle(srv.url)


def test_bad_urls(served):
    for url in ("ftp://host/x", "http://", "teacher.safetensors"):
        with pytest.raises(ValueError, match="URL"):
            HttpOracle(url)


# ---------------------------------------------------------------------------------------
# the whole engine over HTTP
# ---------------------------------------------------------------------------------------


def test_robustness_over_http_equals_the_in_process_run(served):
    srv, _ = served(max_batch=256)
    x = _x(6, seed=1)
    settings = RobustnessSettings(method="hsja", budget=150, checkpoints=(50, 150), chunk_size=3, seed=4)
    local = compute_robustness(TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K), x, settings)
    remote_oracle = load_oracle(srv.url)
    remote = compute_robustness(remote_oracle, x, settings)
    torch.testing.assert_close(remote.distances, local.distances, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(remote.queries, local.queries)
    assert remote_oracle.queries == srv.oracle.queries == int(local.queries.sum()) + len(x)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_end_to_end(tmp_path, stop):
    """``zsdb3kd serve`` as a user starts it: prints its URL, enforces its quota, stops on Ctrl-C or kill."""
    path = tmp_path / "T.safetensors"
    from zsdb3kd.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet5-fifth", num_classes=10, input_shape=(1, 28, 28))
    save_weights(model, path, arch="lenet5-fifth", input_shape=(1, 28, 28), num_classes=10)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zsdb3kd", "serve", str(path), "--port", "0", "--max-queries",
                             "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving" in line and "quota 50 queries" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" at ")[1].split()[0]
        o = HttpOracle(url)
        x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(o(x), model.eval()(x).argmax(1))
        with pytest.raises(OracleError, match="quota exhausted: 40 of 50 used, 20 asked"):
            o(torch.rand(20, 1, 28, 28))
        from zsdb3kd.weights import file_sha256

        assert o.sha256 == file_sha256(path)
    finally:
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "served 40 queries" in out
