"""Serve a teacher as a label-only HTTP black box (the other end of :class:`~zsdb3kd.oracle.HttpOracle`).

Lets a team expose a model across a trust boundary without handing over weights or
logits, and lets anyone rehearse a distillation against a real network endpoint:
``zsdb3kd serve teacher.safetensors --port 8000``, then ``--teacher http://host:8000``.

Protocol ``zsdb3kd-labels/1`` (JSON over HTTP/1.1, keep-alive):

* ``GET /info`` -> ``{"protocol", "input_shape": [C, H, W], "num_classes", "bounds": [lo, hi],
  "max_batch", "model_sha256", "queries", "max_queries"}``
* ``POST /predict`` with ``{"shape": [B, C, H, W], "dtype": "float32", "data": <base64 of
  little-endian float32>}`` -> ``{"labels": [B ints]}``
* errors: ``{"error": "..."}`` with 400 (malformed or out-of-range input), 401 (a token is
  set and the request's ``Authorization: Bearer <token>`` is missing or wrong), 403 (the
  ``--max-queries`` quota is used up), 404, 413 (more than ``max_batch`` images) or 500.

Only labels leave the server. The answers are counted by the wrapped oracle, so the
quota is enforced the same way as a client budget: a request that would pass it is
refused whole, before the model sees it.
"""

from __future__ import annotations

import hmac
import json
import math
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .oracle import PROTOCOL, LabelOracle, QueryBudgetExceeded, decode_images

__all__ = ["LabelServer", "make_server"]


class LabelServer(ThreadingHTTPServer):
    """A threading HTTP server answering label queries with one :class:`LabelOracle`.

    Model calls are serialised (the oracle's count is not thread-safe, and the model's
    own kernels already use the cores); request parsing runs in parallel.
    """

    daemon_threads = True

    def __init__(self, oracle: LabelOracle, host: str = "127.0.0.1", port: int = 0, *, max_batch: int = 1024,
                 model_sha256: str | None = None, token: str | None = None, log=None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.oracle = oracle
        self._authorization = None if not token else f"Bearer {token}".encode()
        self.max_batch = max_batch
        self.model_sha256 = model_sha256
        self.log = log
        self.model_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict:
        o = self.oracle
        return {"protocol": PROTOCOL, "input_shape": list(o.input_shape), "num_classes": o.num_classes,
                "bounds": list(o.bounds), "max_batch": self.max_batch, "model_sha256": self.model_sha256,
                "queries": o.queries, "max_queries": o.budget}


def make_server(oracle: LabelOracle, host: str = "127.0.0.1", port: int = 0, **kwargs) -> LabelServer:
    """Bind a :class:`LabelServer` (``port=0`` picks a free port; see ``server.url``)."""
    return LabelServer(oracle, host, port, **kwargs)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # headers and body leave in one write (flushed after each request)
    server: LabelServer

    def setup(self) -> None:
        super().setup()
        # small answers on a kept-alive connection: without this, Nagle's algorithm and the
        # client's delayed ACK add up to 40 ms to every request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        expected = self.server._authorization
        if expected is None or hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected):
            return True
        if self.headers.get("Content-Length", "").isdigit():
            self.rfile.read(int(self.headers["Content-Length"]))  # keep the connection usable
        self._send(401, {"error": "missing or wrong Authorization header; the client sets it from "
                                  "ZSDB3KD_HTTP_AUTH='Bearer <token>'"})
        return False

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        if self.path.rstrip("/") in ("/info", ""):
            self._send(200, self.server.info())
        else:
            self._send(404, {"error": f"no such endpoint {self.path}; use GET /info or POST /predict"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/predict":
            self._send(404, {"error": f"no such endpoint {self.path}; use POST /predict"})
            return
        srv = self.server
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, {"error": "Content-Length required"})
            return
        # base64 of float32 plus a little JSON: anything much larger cannot be a valid request
        limit = 4 * srv.max_batch * math.prod(srv.oracle.input_shape) * 4 // 3 + 4096
        if int(length) > limit:
            self.close_connection = True
            self._send(413, {"error": f"request of {length} bytes is larger than {srv.max_batch} images; "
                                      f"send at most max_batch={srv.max_batch} images per request"})
            return
        raw = self.rfile.read(int(length))
        try:
            x = decode_images(json.loads(raw))
        except ValueError as e:  # includes JSONDecodeError
            self._send(400, {"error": str(e)})
            return
        if x.shape[0] > srv.max_batch:
            self._send(413, {"error": f"{x.shape[0]} images in one request; max_batch is {srv.max_batch}"})
            return
        try:
            with srv.model_lock:
                labels = srv.oracle(x)
        except QueryBudgetExceeded as e:
            self._send(403, {"error": f"query quota exhausted: {e.used} of {e.budget} used, {e.requested} asked"})
            return
        except (ValueError, TypeError) as e:
            self._send(400, {"error": str(e)})
            return
        except Exception as e:  # the model failed: say so instead of dropping the connection
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
            return
        self._send(200, {"labels": labels.tolist()})


def serve_forever(server: LabelServer, *, out=sys.stdout) -> int:
    """Run until Ctrl-C or SIGTERM (``kill``: a server started with ``&`` in a script
    ignores Ctrl-C); return the number of queries answered."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"served {server.oracle.queries:,} queries", file=out, flush=True)
    return server.oracle.queries
