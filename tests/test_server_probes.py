"""The label server probed as an adversarial client would, one test per probe of issue 19.

Each probe checks the status the server answers (or that it closes the connection), and
that it still answers a good request afterwards. The servers run in subprocesses (so
their memory and CPU can be read) on 127.0.0.1 with short timeouts, so every wait here is
a second or two, on a socket or process, never a fixed sleep.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch
from conftest import SHAPE
from test_server_support import (
    K,
    ServerProcess,
    address,
    closed_within,
    exchange,
    expected_labels,
    images,
    read_response,
)

from zsdb3kd.oracle import FunctionOracle, HttpOracle, encode_images
from zsdb3kd.serve import LabelServer

TOKEN = "probe-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"header_timeout": 1, "read_timeout": 1, "keep_alive_timeout": 1, "max_batch": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("probes") / "state.sqlite"
    with ServerProcess({**LIMITS, "max_connections": 100, "max_queries": 10_000, "state": str(state)},
                       token=TOKEN) as s:
        yield s


def answers_a_good_request(url: str) -> bool:
    o = HttpOracle(url, headers=AUTH, deadline=30, backoff=0.1, backoff_max=0.5)
    x = images(5, seed=int(time.monotonic() * 1e6) % 1000)
    ok = torch.equal(o(x), expected_labels(x))
    o.close()
    return ok


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: probe", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if (body or method == "POST") and "Content-Length" not in (headers or {}):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def predict_body(n: int = 2) -> bytes:
    return json.dumps(encode_images(images(n))).encode()


def usage(url: str) -> int:
    status, _, body = exchange(url, request("GET", "/usage", headers=AUTH))
    assert status == 200
    return json.loads(body)["queries"]


# ---------------------------------------------------------------------------------------


def test_a_huge_body_without_the_token_is_refused_before_it_is_read(server):
    rss = server.rss_mb()
    with socket.create_connection(address(server.url), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n" + b"0" * (1 << 20))
        status, headers, body = read_response(s)
        assert status == 401 and "Authorization" in json.loads(body)["error"]
        assert headers["connection"] == "close"
        t0 = time.monotonic()
        with pytest.raises(OSError):  # the server drops the rest (reading it for 2 s at most), then closes
            while time.monotonic() - t0 < 15:
                s.sendall(b"0" * (1 << 16))
        assert time.monotonic() - t0 < 10
    assert server.rss_mb() - rss < 30
    assert answers_a_good_request(server.url)


def test_a_huge_body_with_the_token_is_refused_by_its_declared_size(server):
    status, _, body = exchange(server.url, b"POST /predict HTTP/1.1\r\nHost: probe\r\nAuthorization: Bearer "
                                     + TOKEN.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n" + b"0" * 1000)
    assert status == 413 and "max_batch=64" in json.loads(body)["error"]
    # a client that sends its whole (too large) body before reading can still read the 413
    c = http.client.HTTPConnection(*address(server.url), timeout=10)
    c.request("POST", "/predict", body=b"0" * (2 << 20), headers=AUTH)
    r = c.getresponse()
    assert r.status == 413 and "max_batch" in json.loads(r.read())["error"]
    assert answers_a_good_request(server.url)


def test_idle_half_sent_and_silent_connections_are_closed(server):
    silent = socket.create_connection(address(server.url))
    half_headers = socket.create_connection(address(server.url))
    half_headers.sendall(b"GET /info HTTP/1.1\r\nHost: probe\r\n")
    half_body = socket.create_connection(address(server.url))
    half_body.sendall(request("POST", "/predict", headers={**AUTH, "Content-Length": "5000"})[:-2] + b"\r\n{")
    idle = socket.create_connection(address(server.url))
    idle.sendall(request("GET", "/info", headers=AUTH))
    assert read_response(idle)[0] == 200
    drip = socket.create_connection(address(server.url))
    t0 = time.monotonic()
    for s in (silent, half_headers, idle):
        assert closed_within(s, 5)
    half_body.settimeout(5)
    status, _, body = read_response(half_body)
    assert status == 408 and "did not arrive" in json.loads(body)["error"]
    assert closed_within(half_body, 5)
    try:  # a byte of headers every 0.2 s does not keep a connection open past the header timeout
        for byte in b"GET /info HTTP/1.1\r\nHost: probe\r\nX-Slow: " + b"a" * 100:
            drip.send(bytes([byte]))
            time.sleep(0.2)  # the probe's own pace, not a wait for the server
            if time.monotonic() - t0 > 4:
                break
        assert closed_within(drip, 3)
    except OSError:
        pass  # closed while we were still dripping
    assert time.monotonic() - t0 < 8
    for s in (silent, half_headers, half_body, idle, drip):
        s.close()
    assert answers_a_good_request(server.url)


def test_a_burst_of_new_connections_is_queued_not_reset(server):
    results: list[int] = []

    def one() -> None:
        try:
            results.append(exchange(server.url, request("GET", "/info", headers=AUTH), timeout=20)[0])
        except OSError as e:
            results.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 60


def test_past_the_connection_cap_new_clients_get_503_at_once_and_get_in_once_the_idle_ones_close():
    with ServerProcess({**LIMITS, "max_connections": 8}, token=TOKEN) as server:
        held = [socket.create_connection(address(server.url)) for _ in range(8)]
        t0 = time.monotonic()
        status, headers, body = exchange(server.url, request("GET", "/info", headers=AUTH))
        assert status == 503 and headers["retry-after"] == "1" and "too many" in json.loads(body)["error"]
        assert time.monotonic() - t0 < 1
        assert answers_a_good_request(server.url)  # retried until the held, silent ones were closed
        for s in held:
            s.close()


def test_at_the_file_descriptor_limit_the_server_neither_spins_nor_locks_clients_out():
    with ServerProcess({**LIMITS, "max_connections": 1000}, token=TOKEN, nofile=64) as server:
        held = []
        start = time.monotonic()
        for _ in range(120):  # more than the process may open: the kernel queues the rest
            held.append(socket.create_connection(address(server.url), timeout=5))
        cpu = server.cpu_seconds()
        t0 = time.monotonic()
        assert answers_a_good_request(server.url)
        elapsed = time.monotonic() - t0
        assert (server.cpu_seconds() - cpu) < 0.5 * elapsed + 0.5, "the server spins"
        # out of files, accepting is retried once a second (CPython alone retries every queued
        # connection at once, up to the listen backlog: thousands of logged errors a second)
        retries = sum("out of system resource" in line for line in server.errors)
        assert retries <= 2 + (time.monotonic() - start), f"{retries} accept retries: the server spins"
        for s in held:
            s.close()
        assert answers_a_good_request(server.url)


def test_a_body_on_an_unknown_path_is_never_run_as_the_next_request(server):
    before = usage(server.url)
    smuggled = request("POST", "/predict", predict_body(), headers=AUTH)
    with socket.create_connection(address(server.url), timeout=10) as s:
        s.sendall(request("POST", "/nowhere", smuggled, headers=AUTH))
        status, _, body = read_response(s)
        assert status == 404 and "no such endpoint" in json.loads(body)["error"]
        assert closed_within(s, 5)
    with socket.create_connection(address(server.url), timeout=10) as s:  # also with a refused method
        s.sendall(request("PUT", "/predict", smuggled, headers=AUTH))
        assert read_response(s)[0] == 405
        assert closed_within(s, 5)
    assert usage(server.url) == before
    assert answers_a_good_request(server.url)


@pytest.mark.parametrize("body, status, says", [
    (b"[" * 10_000 + b"]" * 10_000, 400, "nested"),
    (json.dumps({"shape": [True, 1, 8, 8], "dtype": "float32", "data": "AAAA"}).encode(), 400, "shape"),
    (json.dumps({"shape": [1.0, 1, 8, 8], "data": "AAAA"}).encode(), 400, "shape"),
    (json.dumps({"shape": [-1, 1, 8, 8], "data": ""}).encode(), 400, "shape"),
    (json.dumps({"shape": [2**40, 1, 8, 8], "data": ""}).encode(), 400, "shape"),
    (json.dumps({"shape": [65, 1, 8, 8], "data": ""}).encode(), 413, "max_batch"),
    (json.dumps({"shape": [1, 1, 8, 8], "data": 7}).encode(), 400, "base64"),
    (json.dumps({"shape": [1, 1, 8, 8], "data": "é" * 344}).encode(), 400, "base64"),
    (json.dumps({"shape": [1, 1, 8, 8], "data": "!" * 344}).encode(), 400, "base64"),
    (json.dumps({"shape": [1, 1, 8, 8], "dtype": "float64", "data": ""}).encode(), 400, "dtype"),
    (b'"a string"', 400, "JSON object"),
    (b"\xff\xfe", 400, ""),
    (json.dumps({"shape": [1, *SHAPE], "data": encode_images(images(1) * float("nan"))["data"]}).encode(), 400,
     "outside bounds"),
], ids=["nested", "true-dim", "float-dim", "negative-dim", "huge-dim", "too-many", "data-int", "data-unicode",
        "data-not-base64", "float64", "not-object", "not-utf8", "nan"])
def test_hostile_bodies_get_a_400_with_a_reason(server, body, status, says):
    got, headers, answer = exchange(server.url, request("POST", "/predict", body, headers=AUTH))
    assert got == status and says in json.loads(answer)["error"]
    assert "server" not in headers  # no version banner


def test_malformed_http_gets_a_json_400_and_the_server_carries_on(server):
    for raw in (b"POST /predict HTTP/1.1\r\nHost: probe\r\nContent-Length: \xd9\xa1\xd9\xa2\r\n\r\n{}",
                b"GARBAGE\r\n\r\n",
                b"GET /info HTTP/1.1\r\nHost: probe\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"):
        status, headers, body = exchange(server.url, raw)
        assert status in (400, 431) and headers["connection"] == "close"
        assert ("malformed HTTP request" if status == 400 else "at most 16384") in json.loads(body)["error"]
    assert answers_a_good_request(server.url)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_get_405_with_allow(server, method):
    for path, allowed in (("/predict", "POST"), ("/info", "GET")):
        status, headers, body = exchange(server.url, request(method, path, headers=AUTH))
        assert status == 405 and allowed in headers["allow"] and method in json.loads(body)["error"]


def test_a_model_failure_is_a_500_without_internals_and_the_next_request_works():
    def flaky(x):
        if bool((x[:, 0, 0, 0] == 0).any()):
            raise RuntimeError("secret internals at /srv/model.py:42")
        return expected_labels(x)

    logged: list[str] = []
    with LabelServer(FunctionOracle(flaky, SHAPE, K), {"port": 0}, log=logged.append) as srv:
        x = images(2)
        x[0, 0, 0, 0] = 0
        status, _, body = exchange(srv.url, request("POST", "/predict", json.dumps(encode_images(x)).encode()))
        error = json.loads(body)["error"]
        assert status == 500 and "internal error (ref " in error and "secret" not in error
        ref = error.split("ref ")[1].split(")")[0]
        assert any(ref in line for line in logged)
        assert HttpOracle(srv.url)(images(3)).shape == (3,)


def test_the_quota_survives_a_restart(tmp_path):
    state = tmp_path / "state.sqlite"
    with ServerProcess({"max_queries": 100, "state": str(state)}) as server:
        HttpOracle(server.url)(images(60))
        server.restart()  # kill -9, then the same port and state file
        o = HttpOracle(server.url, retries=0)
        with pytest.raises(Exception, match="quota exhausted: 60 of 100 used, 60 asked"):
            o(images(60, seed=1))
        o(images(40, seed=2))
        assert o.usage()["queries"] == 100 and o.usage()["remaining"] == 0
