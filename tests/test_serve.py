"""A teacher behind HTTP: ``zsdb3kd.serve`` (the label server) and ``HttpOracle`` (its client).

Both ends run here for real, on a free localhost port: labels must equal the in-process
teacher's, both ends must count the same queries, budgets and quotas must refuse whole
requests before the model sees them, keys see only their own usage, and the server stops
on SIGINT and SIGTERM whatever it inherited. Attacks on the server: test_server_probes.py;
faults between the two: test_server_faults.py.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import sys
import time

import pytest
import torch
from conftest import SHAPE, LinearTeacher
from test_server_support import FaultProxy, K, ServerProcess, expected_labels, images

from zsdb3kd.oracle import (
    PROTOCOL,
    HttpOracle,
    OracleError,
    QueryBudgetExceeded,
    TorchOracle,
    encode_images,
    http_settings_from_env,
    load_oracle,
)
from zsdb3kd.robustness import RobustnessSettings, compute_robustness
from zsdb3kd.serve import LabelServer, ServeSettings
from zsdb3kd.settings import ConfigError

SHA = "ab" * 32


class Recorder(LinearTeacher):
    """The conftest linear teacher, recording every batch it is asked."""

    def __init__(self) -> None:
        super().__init__(seed=3, k=K)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(int(x.shape[0]))
        return super().forward(x)


@pytest.fixture
def served():
    """Start a label server in a thread on a free port; yields (server, model); closed after the test."""
    servers = []

    def start(*, budget=None, model=None, token=None, **settings):
        model = model or Recorder()
        oracle = TorchOracle(model, SHAPE, K, budget=budget, max_batch=10_000)
        srv = LabelServer(oracle, {"port": 0, **settings}, model_sha256=SHA, token=token).start()
        servers.append(srv)
        return srv, model

    yield start
    for srv in servers:
        srv.close()


def _raw(srv, method, path, body=None, headers=None):
    host, port = srv.sock.getsockname()[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.status, json.loads(r.read())
    c.close()
    return out


# ---------------------------------------------------------------------------------------
# labels and accounting
# ---------------------------------------------------------------------------------------


def test_the_client_body_is_the_json_of_encode_images_byte_for_byte():
    """The client builds the body without JSON-encoding its base64 text; the bytes (and so the
    request ids that make retries free) are those of json.dumps(encode_images(x))."""
    from zsdb3kd.oracle.protocol import encode_body

    odd = torch.rand(2, 3, 5, 4, dtype=torch.float64).transpose(2, 3)  # float64, not contiguous
    for x in (torch.rand(3, 1, 4, 4), odd, torch.zeros(0, 1, 2, 2)):
        assert encode_body(x) == json.dumps(encode_images(x)).encode()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_labels_equal_the_in_process_teacher_and_both_ends_count_the_same(served, concurrency):
    srv, model = served(max_batch=16)
    o = HttpOracle(srv.url, concurrency=concurrency, max_batch=64)
    assert (o.input_shape, o.num_classes, o.max_batch) == (SHAPE, K, 16)  # the server's max_batch wins
    x = images(100)
    assert torch.equal(o(x), expected_labels(x))
    assert sorted(model.calls) == [4] + [16] * 6
    assert o.queries == o.paid == srv.oracle.queries == srv.queries == 100 == sum(model.calls)
    assert o.retries == 0
    o.close()


def test_a_repeated_request_is_answered_again_without_billing(served):
    srv, model = served()
    o = HttpOracle(srv.url)
    x = images(8)
    first = o(x)
    assert torch.equal(o(x), first)  # the same bytes: the same request id, answered from the cache
    assert (o.queries, o.paid, srv.queries, sum(model.calls)) == (16, 8, 8, 8)
    assert o.usage() == {"key": "anonymous", "queries": 8, "max_queries": None, "remaining": None,
                         "requests": 1, "replayed": 1}
    body = json.dumps(encode_images(x)).encode()
    rid = hashlib.sha256(body).hexdigest()[:32]
    status, answer = _raw(srv, "POST", "/predict", body, {"Idempotency-Key": rid})
    assert status == 200 and answer == {"labels": first.tolist(), "billed": 0, "replayed": True}
    status, answer = _raw(srv, "POST", "/predict", json.dumps(encode_images(images(8, seed=1))).encode(),
                          {"Idempotency-Key": rid})
    assert status == 422 and "another body" in answer["error"]
    assert srv.queries == 8


def test_info_describes_the_teacher_and_the_callers_own_usage(served):
    srv, _ = served(max_queries=500, state=":memory:")
    status, info = _raw(srv, "GET", "/info")
    assert status == 200
    assert info == {"protocol": PROTOCOL, "input_shape": list(SHAPE), "num_classes": K, "bounds": [0.0, 1.0],
                    "max_batch": 1024, "model_sha256": SHA, "queries": 0, "max_queries": 500}
    assert HttpOracle(srv.url).sha256 == SHA


def test_client_budget_refuses_before_anything_is_sent(served):
    srv, model = served()
    o = HttpOracle(srv.url, budget=10)
    o(images(6))
    with pytest.raises(QueryBudgetExceeded):
        o(images(5, seed=1))
    assert o.queries == srv.oracle.queries == 6 and sum(model.calls) == 6


def test_server_quota_refuses_whole_requests_and_the_client_counts_what_was_answered(served):
    srv, model = served(max_queries=10, max_batch=4, state=":memory:")
    o = HttpOracle(srv.url, concurrency=1, retries=3, backoff=0)
    with pytest.raises(OracleError, match="quota exhausted: 8 of 10 used, 4 asked"):
        o(images(12))  # chunks of 4: two answered, the third would pass the quota of 10
    assert o.queries == o.paid == srv.queries == sum(model.calls) == 8
    assert o.retries == 0  # a refusal is not retried
    o(images(2, seed=1))  # what is left of the quota still works
    assert o.queries == srv.queries == 10
    assert o.usage()["remaining"] == 0


def test_concurrent_chunks_after_a_refusal_are_still_counted(served):
    # 3 chunks of 4 in flight at once with a quota of 6: exactly one chunk is answered,
    # whichever the server takes first, and the client must count it even if it is not the first
    srv, _ = served(max_queries=6, max_batch=4, state=":memory:")
    o = HttpOracle(srv.url, concurrency=3, retries=0)
    with pytest.raises(OracleError, match="quota exhausted"):
        o(images(12))
    assert o.queries == o.paid == srv.queries == 4


def test_a_quota_needs_a_state_file():
    oracle = TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K)
    with pytest.raises(ConfigError, match="quota needs --state"):
        LabelServer(oracle, {"port": 0, "max_queries": 5})


def test_busy_server_is_retried_and_each_image_counted_once(served):
    srv, model = served()
    proxy = FaultProxy(srv.url, {"503": 0.5}, seed=1)
    try:
        o = HttpOracle(proxy.url, backoff=0.01, max_batch=2, concurrency=1)
        x = images(10)
        assert torch.equal(o(x), expected_labels(x))
        assert o.retries == proxy.counts["503"] > 0
        assert o.queries == o.paid == srv.queries == 10 == sum(model.calls)
    finally:
        proxy.close()


def test_busy_server_past_the_retries_is_an_error_naming_the_last_status(served):
    srv, model = served()
    proxy = FaultProxy(srv.url, {"503": 1.0})
    try:
        o = HttpOracle(proxy.url, backoff=0, retries=2)
        with pytest.raises(OracleError, match=r"failed 3 times; last: HTTP 503 .*injected"):
            o(images(5))
        assert o.queries == o.paid == 0 and model.calls == []
    finally:
        proxy.close()


def test_unreachable_server_is_a_clear_error(served):
    srv, _ = served()
    url = srv.url
    srv.close()
    t0 = time.perf_counter()
    with pytest.raises(OracleError, match=rf"GET {url}/info failed 2 times; last: ConnectionRefusedError"):
        HttpOracle(url, retries=1, backoff=0)
    assert time.perf_counter() - t0 < 5


def test_a_kept_alive_connection_the_server_closed_is_reopened_without_a_retry(served):
    import select

    srv, _ = served(keep_alive_timeout=0.2)
    o = HttpOracle(srv.url, concurrency=1)
    o(images(3))
    conn = o._local.conn
    assert select.select([conn.sock], [], [], 10)[0]  # the server closed the idle connection
    x = images(3, seed=1)
    assert torch.equal(o(x), expected_labels(x))
    assert o.retries == 0 and o.paid == srv.queries == 6


def test_a_port_in_use_is_a_clear_error(served):
    srv, _ = served()
    with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{srv.sock.getsockname()[1]}"):
        LabelServer(TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K), {"port": srv.sock.getsockname()[1]})


def test_malformed_requests_get_a_status_and_a_reason(served):
    srv, model = served(max_batch=4)
    assert _raw(srv, "POST", "/predict", b"not json")[0] == 400
    status, body = _raw(srv, "POST", "/predict", json.dumps({"shape": [1, 1, 8, 8], "data": "AAAA"}).encode())
    assert status == 400 and "bytes" in body["error"]
    status, body = _raw(srv, "POST", "/predict", json.dumps(encode_images(torch.rand(2, 1, 4, 4))).encode())
    assert status == 400 and "shape" in body["error"]
    status, body = _raw(srv, "POST", "/predict", json.dumps(encode_images(images(2) + 1.0)).encode())
    assert status == 400 and "outside bounds" in body["error"]
    status, body = _raw(srv, "POST", "/predict", json.dumps(encode_images(images(5))).encode())
    assert status == 413 and "max_batch" in body["error"]
    status, body = _raw(srv, "POST", "/predict", json.dumps(encode_images(images(1))).encode(),
                        {"Idempotency-Key": "bad key!"})
    assert status == 400 and "Idempotency-Key" in body["error"]
    assert _raw(srv, "GET", "/nowhere")[0] == 404
    assert model.calls == [] and srv.queries == 0


# ---------------------------------------------------------------------------------------
# tokens and keys
# ---------------------------------------------------------------------------------------


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
    o(images(3))
    assert o.queries == 3 == sum(model.calls)
    assert o.usage()["key"] == "default"
    assert "s3cret" not in repr(o) and "s3cret" not in json.dumps(o.info)


def test_keys_file_gives_each_key_its_quota_and_only_its_own_usage(served, tmp_path, monkeypatch):
    keys = tmp_path / "keys.toml"
    digest = {name: hashlib.sha256(f"token-{name}".encode()).hexdigest() for name in ("alice", "bob")}
    keys.write_text(f'[keys.alice]\ntoken_sha256 = "{digest["alice"]}"\nmax_queries = 5\n\n'
                    f'[keys.bob]\ntoken_sha256 = "{digest["bob"]}"\n')
    srv, _ = served(keys=str(keys), max_queries=100, state=str(tmp_path / "state.sqlite"))
    monkeypatch.setenv("ZSDB3KD_HTTP_AUTH", "Bearer token-alice")
    alice = HttpOracle(srv.url)
    monkeypatch.setenv("ZSDB3KD_HTTP_AUTH", "Bearer token-bob")
    bob = HttpOracle(srv.url)
    alice(images(4))
    with pytest.raises(OracleError, match="quota exhausted: 4 of 5 used, 2 asked"):
        alice(images(2, seed=1))
    bob(images(7, seed=2))
    assert alice.usage() == {"key": "alice", "queries": 4, "max_queries": 5, "remaining": 1, "requests": 1,
                             "replayed": 0}
    assert bob.usage()["queries"] == 7 and bob.usage()["max_queries"] == 100
    assert alice.info["max_queries"] == 5 and bob.info["max_queries"] == 100


def test_bad_keys_files_are_refused_with_the_key_named(tmp_path):
    oracle = TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K)
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.carol]\ntoken_sha256 = "not-hex"\n')
    with pytest.raises(ConfigError, match=r"\[keys.carol\] token_sha256"):
        LabelServer(oracle, {"port": 0, "keys": str(keys)})
    keys.write_text('[keys.carol]\ntoken = "plain"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        LabelServer(oracle, {"port": 0, "keys": str(keys)})


# ---------------------------------------------------------------------------------------
# client settings
# ---------------------------------------------------------------------------------------


def test_client_settings_come_from_the_environment(served, monkeypatch):
    srv, _ = served()
    monkeypatch.setenv("ZSDB3KD_HTTP_CONCURRENCY", "5")
    monkeypatch.setenv("ZSDB3KD_HTTP_RETRIES", "7")
    monkeypatch.setenv("ZSDB3KD_HTTP_TIMEOUT", "2.5")
    monkeypatch.setenv("ZSDB3KD_HTTP_DEADLINE", "40")
    monkeypatch.setenv("ZSDB3KD_HTTP_BACKOFF_MAX", "3")
    o = load_oracle(srv.url, budget=9)
    assert (o.concurrency, o.max_retries, o.timeout, o.deadline, o.backoff_max, o.budget) == (5, 7, 2.5, 40, 3, 9)
    monkeypatch.setenv("ZSDB3KD_HTTP_RETRIES", "many")
    with pytest.raises(ValueError, match="ZSDB3KD_HTTP_RETRIES='many' is not valid"):
        http_settings_from_env()
    monkeypatch.setenv("ZSDB3KD_HTTP_RETRIES", "-1")
    with pytest.raises(ValueError, match="ZSDB3KD_HTTP_RETRIES='-1' is not valid: .*greater than or equal to 0"):
        http_settings_from_env()
    monkeypatch.delenv("ZSDB3KD_HTTP_RETRIES")
    monkeypatch.delenv("ZSDB3KD_HTTP_CONCURRENCY")
    assert http_settings_from_env() == {"timeout": 2.5, "deadline": 40.0, "backoff_max": 3.0}


def test_bad_urls_and_settings():
    for url in ("ftp://host/x", "http://", "teacher.safetensors"):
        with pytest.raises(ValueError, match="URL"):
            HttpOracle(url)
    with pytest.raises(ValueError, match="deadline"):
        HttpOracle("http://127.0.0.1:1", deadline=0)


def test_every_server_setting_is_described():
    assert ServeSettings.__doc__.strip().splitlines()[0]
    for name, field in ServeSettings.model_fields.items():
        assert field.description, name
    s = ServeSettings()
    assert (s.host, s.port, s.max_queries, s.max_batch, s.log) == ("127.0.0.1", 8000, None, 1024, False)


def test_the_server_says_what_to_install_when_its_stack_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=r"pip install 'zsdb3kd\[serve\]'"):
        LabelServer(TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K), {"port": 0})


# ---------------------------------------------------------------------------------------
# the whole engine over HTTP, and stopping
# ---------------------------------------------------------------------------------------


def test_robustness_over_http_equals_the_in_process_run(served):
    srv, _ = served(max_batch=256)
    x = images(6, seed=1)
    settings = RobustnessSettings(method="hsja", queries_per_pair=150, checkpoints=(50, 150), chunk_size=3, seed=4)
    local = compute_robustness(TorchOracle(LinearTeacher(seed=3, k=K), SHAPE, K), x, settings)
    remote_oracle = load_oracle(srv.url)
    remote = compute_robustness(remote_oracle, x, settings)
    torch.testing.assert_close(remote.distances, local.distances, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(remote.queries, local.queries)
    assert remote_oracle.queries == int(local.queries.sum()) + len(x)
    assert remote_oracle.paid == srv.queries == srv.oracle.queries <= remote_oracle.queries


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_on_sigint_and_sigterm_even_when_sigint_was_ignored(stop, tmp_path):
    """``serve()`` as a process started the way ``&`` starts it (SIGINT ignored): serves, keeps
    its quota, stops on either signal (waited on, not slept on) and says what it served."""
    with ServerProcess({"max_queries": 50, "state": str(tmp_path / "state.sqlite")}, ignore_sigint=True) as server:
        o = HttpOracle(server.url)
        x = images(40)
        assert torch.equal(o(x), expected_labels(x))
        with pytest.raises(OracleError, match="quota exhausted: 40 of 50 used, 20 asked"):
            o(images(20, seed=1))
        assert o.sha256 == SHA
        assert server.stop(stop, timeout=30) == 0, "".join(server.errors)
        assert server.line() == "served 40"
