"""A teacher behind an HTTP endpoint speaking ``zsdb3kd-labels/1`` (see :mod:`zsdb3kd.serve`)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Iterator

import torch

from .base import Bounds, LabelOracle, OracleError
from .protocol import PROTOCOL, encode_images

_RETRYABLE = (429, 502, 503, 504)


class HttpOracle(LabelOracle):
    """A teacher behind an HTTP endpoint: ``GET <url>/info`` and ``POST <url>/predict``.

    The protocol (``zsdb3kd-labels/1``, served by ``zsdb3kd serve``): ``/info`` returns
    ``{"input_shape": [C, H, W], "num_classes": K, "bounds": [lo, hi], "max_batch": N}``
    (optionally ``"model_sha256"``); ``/predict`` takes ``{"shape": [B, C, H, W],
    "dtype": "float32", "data": <base64 of little-endian float32>}`` and returns
    ``{"labels": [...]}``. Errors come back as ``{"error": "..."}`` with a 4xx/5xx status.

    Chunks of ``max_batch`` images go out ``concurrency`` at a time. A lost connection
    and statuses 429/502/503/504 are retried up to ``retries`` times with exponential
    backoff (honouring ``Retry-After``); any other error status raises
    :class:`OracleError` at once with the server's message. :attr:`queries` counts the
    images the server answered (a vendor may also bill a request whose answer was lost
    and retried; :attr:`retries` counts those). ``headers`` are sent with every request;
    the environment variable ``ZSDB3KD_HTTP_AUTH`` (e.g. ``Bearer <token>``) becomes the
    ``Authorization`` header and is never stored anywhere.
    """

    def __init__(self, url: str, *, input_shape=None, num_classes: int | None = None, bounds=None,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.5, concurrency: int = 2,
                 headers: dict | None = None, max_batch: int = 256, **kwargs) -> None:
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher URL must be http(s)://host[:port][/path], got {url!r}")
        if retries < 0 or backoff < 0 or timeout <= 0 or concurrency < 1:
            raise ValueError("need retries >= 0, backoff >= 0, timeout > 0 and concurrency >= 1")
        self.url = url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout, self.max_retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        if os.environ.get("ZSDB3KD_HTTP_AUTH"):
            self._headers["Authorization"] = os.environ["ZSDB3KD_HTTP_AUTH"]
        self._local = threading.local()
        self._lock = threading.Lock()
        self.retries = 0
        self.info = {} if (input_shape is not None and num_classes is not None) else self._get_info()
        input_shape = input_shape if input_shape is not None else self.info.get("input_shape")
        num_classes = num_classes if num_classes is not None else self.info.get("num_classes")
        if input_shape is None or num_classes is None:
            raise OracleError(f"{self.url}/info gave no input_shape/num_classes; pass them explicitly")
        if bounds is None:
            bounds = tuple(self.info.get("bounds", (0.0, 1.0)))
        if self.info.get("max_batch"):
            max_batch = min(max_batch, int(self.info["max_batch"]))
        super().__init__(tuple(input_shape), int(num_classes), bounds=Bounds(*bounds), max_batch=max_batch, **kwargs)
        self.sha256 = self.info.get("model_sha256")
        self._pool = None

    # -- transport --------------------------------------------------------------------
    def _connection(self):
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self.timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see serve.py: no 40 ms stalls
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict:
        import http.client

        where = f"{method} {self.url}{path}"
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2**attempt
            try:
                conn = self._connection()
                conn.request(method, self._prefix + path, body=body, headers=self._headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                problem = f"{type(e).__name__}: {e}"
            else:
                if resp.status == 200:
                    try:
                        return json.loads(data)
                    except ValueError:
                        raise OracleError(f"{where}: the answer is not JSON: {data[:200]!r}") from None
                try:
                    message = json.loads(data).get("error", "")
                except (ValueError, AttributeError):
                    message = data[:200].decode("utf-8", "replace")
                problem = f"HTTP {resp.status} {resp.reason}: {message}".rstrip(": ")
                if resp.status not in _RETRYABLE:
                    raise OracleError(f"{where}: {problem}")
                retry_after = resp.getheader("Retry-After")
                if retry_after and retry_after.strip().isdigit():
                    wait = max(wait, float(retry_after))
            if attempt == self.max_retries:
                raise OracleError(f"{where} failed {attempt + 1} times; last: {problem}")
            with self._lock:
                self.retries += 1
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _get_info(self) -> dict:
        info = self._request("GET", "/info")
        if info.get("protocol", PROTOCOL) != PROTOCOL:
            raise OracleError(f"{self.url} speaks {info.get('protocol')!r}, not {PROTOCOL!r}")
        return info

    # -- labels -----------------------------------------------------------------------
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        answer = self._request("POST", "/predict", json.dumps(encode_images(x)).encode())
        labels = answer.get("labels") if isinstance(answer, dict) else None
        if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
            raise OracleError(f"POST {self.url}/predict: expected {{\"labels\": [ints]}}, got {str(answer)[:200]}")
        return torch.tensor(labels, dtype=torch.long)

    def _predict_chunks(self, chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        if self.concurrency == 1 or len(chunks) == 1:
            yield from map(self._predict, chunks)
            return
        from concurrent.futures import ThreadPoolExecutor, wait

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="zsdb3kd-http")
        futures = [self._pool.submit(self._predict, c) for c in chunks]
        for i, f in enumerate(futures):
            try:
                labels = f.result()
            except BaseException as e:
                for g in futures[i + 1:]:
                    g.cancel()
                wait(futures[i + 1:])
                answered = sum(c.shape[0] for c, g in zip(chunks[i + 1:], futures[i + 1:])
                               if not g.cancelled() and g.exception() is None)
                if isinstance(e, OracleError):
                    e.answered += answered
                    raise
                raise OracleError(f"POST {self.url}/predict: {type(e).__name__}: {e}", answered=answered) from e
            yield labels

    def close(self) -> None:
        """Close the worker threads' connections (also done when the process exits)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._drop_connection()


_HTTP_ENV = {"ZSDB3KD_HTTP_CONCURRENCY": ("concurrency", int), "ZSDB3KD_HTTP_RETRIES": ("retries", int),
             "ZSDB3KD_HTTP_TIMEOUT": ("timeout", float), "ZSDB3KD_HTTP_BACKOFF": ("backoff", float)}


def http_settings_from_env() -> dict:
    """:class:`HttpOracle` settings for the command line, from ``ZSDB3KD_HTTP_CONCURRENCY``,
    ``_RETRIES``, ``_TIMEOUT`` (s) and ``_BACKOFF`` (s); a value that does not parse is an error."""
    out = {}
    for var, (name, kind) in _HTTP_ENV.items():
        if os.environ.get(var, "").strip():
            try:
                out[name] = kind(os.environ[var])
            except ValueError:
                raise ValueError(f"{var}={os.environ[var]!r} is not a valid {kind.__name__}") from None
    return out


