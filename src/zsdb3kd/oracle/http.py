"""A teacher behind an HTTP endpoint speaking ``zsdb3kd-labels/1`` (see ``docs/server.md``).

The client never pays twice for one answer: every ``POST /predict`` carries a request id
(the hash of its body), a retry carries the same id, and the server answers an id it has
already answered from its cache without billing it again. Failures that can pass
(5xx, 429, timeouts, resets, truncated answers) are retried with exponential backoff and
jitter for as long as the deadline allows; :attr:`HttpOracle.paid` counts what the
server billed, retries included, separately from :attr:`~LabelOracle.queries`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import torch
from pydantic import Field, ValidationError

from ..settings import Settings, validate
from .base import Bounds, LabelOracle, OracleError
from .protocol import IDEMPOTENCY_HEADER, PROTOCOL, encode_body


class HttpSettings(Settings):
    """HTTP client: how a teacher behind a URL is asked (each from a ZSDB3KD_HTTP_* variable)."""

    concurrency: int = Field(2, ge=1, description="requests in flight at once")
    timeout: float = Field(60.0, gt=0, description="seconds one attempt may take (connect, send, answer)")
    deadline: float = Field(300.0, gt=0, description="seconds one request keeps retrying before the run fails "
                                                     "(long enough to ride out a server restart)")
    retries: int | None = Field(None, ge=0, description="most retries of one request (default: as many as the "
                                                        "deadline allows)")
    backoff: float = Field(0.5, ge=0, description="seconds before the first retry; doubled each time, with jitter")
    backoff_max: float = Field(10.0, ge=0, description="longest wait between two attempts (s)")


#: environment variable -> :class:`HttpSettings` field
HTTP_ENV = {f"ZSDB3KD_HTTP_{name.upper()}": name for name in HttpSettings.model_fields}


def http_settings_from_env(environ=None) -> dict:
    """The :class:`HttpSettings` fields set by ``ZSDB3KD_HTTP_CONCURRENCY``, ``_TIMEOUT``,
    ``_DEADLINE``, ``_RETRIES``, ``_BACKOFF`` and ``_BACKOFF_MAX``, as keyword arguments of
    :class:`HttpOracle`; a value that does not validate is a ``ValueError`` naming the variable."""
    environ = os.environ if environ is None else environ
    raw = {name: environ[var].strip() for var, name in HTTP_ENV.items() if environ.get(var, "").strip()}
    try:
        settings = HttpSettings.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        var = next(v for v, n in HTTP_ENV.items() if n == err["loc"][0])
        raise ValueError(f"{var}={raw[err['loc'][0]]!r} is not valid: {err['msg']}") from None
    return {name: getattr(settings, name) for name in raw}


def _retryable(status: int) -> bool:
    return status in (408, 425, 429) or (500 <= status < 600 and status not in (501, 505))


class HttpOracle(LabelOracle):
    """A teacher behind an HTTP endpoint: ``GET <url>/info`` and ``POST <url>/predict``.

    The protocol (``zsdb3kd-labels/1``, served by ``zsdb3kd serve``; ``docs/server.md``):
    ``/info`` returns ``{"input_shape": [C, H, W], "num_classes": K, "bounds": [lo, hi],
    "max_batch": N}`` (optionally ``"model_sha256"``); ``/predict`` takes ``{"shape": [B, C, H,
    W], "dtype": "float32", "data": <base64 of little-endian float32>}`` with an
    ``Idempotency-Key`` header and returns ``{"labels": [...], "billed": n, "replayed": bool}``.
    Errors come back as ``{"error": "..."}`` with a 4xx/5xx status.

    Chunks of ``max_batch`` images go out ``concurrency`` at a time. Statuses 408, 429 and
    5xx (but 501, 505), lost connections, timeouts and truncated answers are retried with
    exponential backoff and jitter (honouring ``Retry-After``) until ``deadline`` seconds
    have passed or ``retries`` retries were made; any other error status raises
    :class:`OracleError` at once with the server's message. :attr:`paid` counts what the
    server billed (a retry whose first answer was billed but lost counts once; a server
    that does not say what it billed is taken to bill every image it answers);
    :attr:`retries` counts retries (a request that finds its kept-alive connection closed is resent at
    once on a new one, counted in :attr:`reconnects`). ``headers`` go with every request; the environment
    variable ``ZSDB3KD_HTTP_AUTH`` (e.g. ``Bearer <token>``) becomes the ``Authorization``
    header and is never stored anywhere else.
    """

    _counts_paid = True

    def __init__(self, url: str, *, input_shape=None, num_classes: int | None = None, bounds=None,
                 timeout: float = 60.0, deadline: float = 300.0, retries: int | None = None, backoff: float = 0.5,
                 backoff_max: float = 10.0, concurrency: int = 2, headers: dict | None = None, max_batch: int = 256,
                 **kwargs) -> None:
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher URL must be http(s)://host[:port][/path], got {url!r}")
        s = validate(HttpSettings, {"timeout": timeout, "deadline": deadline, "retries": retries, "backoff": backoff,
                                    "backoff_max": backoff_max, "concurrency": concurrency})
        self.url = url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout, self.deadline, self.max_retries = s.timeout, s.deadline, s.retries
        self.backoff, self.backoff_max, self.concurrency = s.backoff, s.backoff_max, s.concurrency
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        if os.environ.get("ZSDB3KD_HTTP_AUTH"):
            self._headers["Authorization"] = os.environ["ZSDB3KD_HTTP_AUTH"]
        self._local = threading.local()
        self._lock = threading.Lock()
        self._random = random.Random()
        self.retries = 0
        self.reconnects = 0  # requests resent at once on a new connection (the kept-alive one was closed)
        self._answered: set[str] = set()  # request ids answered to this client (for :attr:`paid`)
        self._pool = None
        self._abort = False  # set when the caller is interrupted: pending retries stop
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

    @property
    def teacher_id(self) -> str:
        """The server's ``model_sha256``, else the URL (see :attr:`LabelOracle.teacher_id`)."""
        if self._teacher_id is None and not self.sha256:
            self._teacher_id = f"url:{self.url}"
        return super().teacher_id

    # -- transport --------------------------------------------------------------------
    def _connection(self, timeout: float):
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle/delayed-ACK stalls
        else:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(self, method: str, path: str, body: bytes | None = None, *, request_id: str | None = None,
                 deadline: float | None = None) -> tuple[dict, int]:
        """The JSON answer and the number of times the request was sent before the time that got it."""
        import http.client

        where = f"{method} {self.url}{path}"
        headers = self._headers if request_id is None else {**self._headers, IDEMPOTENCY_HEADER: request_id}
        t0 = time.monotonic()
        give_up = t0 + (self.deadline if deadline is None else deadline)
        attempt = sent = 0
        resent = False
        while True:
            retry_after = 0.0
            reused = getattr(self._local, "conn", None) is not None
            try:
                conn = self._connection(max(min(self.timeout, give_up - time.monotonic()), 0.05))
                sent += 1
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, truncated body
                self._drop_connection()
                if reused and not resent and isinstance(e, (ConnectionError, http.client.RemoteDisconnected)):
                    resent = True  # a kept-alive connection the server had closed: not a failure
                    with self._lock:
                        self.reconnects += 1
                    continue
                problem = f"{type(e).__name__}: {e}"
            else:
                if resp.will_close:
                    self._drop_connection()
                if resp.status == 200:
                    try:
                        answer = json.loads(data)
                    except ValueError:
                        answer = None
                    if isinstance(answer, dict):
                        return answer, sent - 1
                    problem = f"truncated or malformed answer: {data[:80]!r}"
                else:
                    try:
                        message = json.loads(data).get("error", "")
                    except (ValueError, AttributeError):
                        message = data[:200].decode("utf-8", "replace")
                    problem = f"HTTP {resp.status} {resp.reason}: {message}".rstrip(": ")
                    if not _retryable(resp.status):
                        raise OracleError(f"{where}: {problem}")
                    header = (resp.getheader("Retry-After") or "").strip()
                    retry_after = float(header) if header.isdigit() else 0.0
            attempt += 1
            step = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
            wait = max(step * (0.5 + 0.5 * self._random.random()), retry_after)
            if (self.max_retries is not None and attempt > self.max_retries) or time.monotonic() + wait > give_up \
                    or self._abort:
                raise OracleError(f"{where} failed {attempt} times; last: {problem} (gave up after "
                                  f"{time.monotonic() - t0:.1f} s; see ZSDB3KD_HTTP_DEADLINE)")
            with self._lock:
                self.retries += 1
            time.sleep(wait)

    def _get_info(self) -> dict:
        # at most 30 s: a wrong URL should not take the whole deadline to report
        info, _ = self._request("GET", "/info", deadline=min(self.deadline, 30.0))
        if info.get("protocol", PROTOCOL) != PROTOCOL:
            raise OracleError(f"{self.url} speaks {info.get('protocol')!r}, not {PROTOCOL!r}")
        return info

    def usage(self) -> dict:
        """This client's key's usage on the server (``GET /usage``): ``queries``, ``max_queries``, ..."""
        return self._request("GET", "/usage", deadline=min(self.deadline, 30.0))[0]

    # -- labels -----------------------------------------------------------------------
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        body = encode_body(x)
        request_id = hashlib.sha256(body).hexdigest()[:32]
        answer, attempts = self._request("POST", "/predict", body, request_id=request_id)
        labels = answer.get("labels")
        n = x.shape[0]
        if not isinstance(labels, list) or len(labels) != n or not all(type(v) is int for v in labels):
            raise OracleError(f"POST {self.url}/predict: expected {{\"labels\": [{n} ints]}}, got {str(answer)[:200]}")
        billed = answer.get("billed")
        billed = n if type(billed) is not int else billed
        with self._lock:
            if answer.get("replayed") is True and attempts > 0 and request_id not in self._answered:
                billed += n  # an earlier attempt of ours was billed and its answer lost
            self._answered.add(request_id)
            self._paid += billed
        return torch.tensor(labels, dtype=torch.long)

    def _predict_chunks(self, chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        if self.concurrency == 1 or len(chunks) == 1:
            yield from map(self._predict, chunks)
            return
        from concurrent.futures import ThreadPoolExecutor, wait

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="zsdb3kd-http")
        self._abort = False
        futures = [self._pool.submit(self._predict, c) for c in chunks]
        for i, f in enumerate(futures):
            try:
                labels = f.result()
            except BaseException as e:
                for g in futures[i + 1:]:
                    g.cancel()
                if not isinstance(e, Exception):  # KeyboardInterrupt: stop retrying, do not wait
                    self._abort = True
                    raise
                wait(futures[i + 1:])
                partial = [(j, g.result()) for j, g in enumerate(futures) if j > i
                           and not g.cancelled() and g.exception() is None]
                answered = sum(chunks[j].shape[0] for j, _ in partial)
                if isinstance(e, OracleError):
                    e.answered += answered
                    e.partial += partial
                    raise
                raise OracleError(f"POST {self.url}/predict: {type(e).__name__}: {e}", answered=answered,
                                  partial=partial) from e
            yield labels

    def close(self) -> None:
        """Close the worker threads' connections (also done when the process exits)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._drop_connection()
