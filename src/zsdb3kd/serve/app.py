"""The label server's application: ``zsdb3kd-labels/1`` on Starlette.

Every ``POST /predict`` is checked in this order, each refusal a JSON ``{"error": ...}``:
the key (401) and the declared size (411, 413) before any byte of the body is read, the
request id (400), the body within ``read_timeout`` (408), its JSON and tensor (400, 413),
then, in the one model thread, a replay of an answered request id (free; 422 if the id
comes with another body), the key's quota (403), the model (400 for an input it
refuses, 500 if it fails) and the bill, committed before the answer leaves. Only labels
leave. A response sent before the body was read closes the connection, so an unread
body is never taken for the next request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..oracle import PROTOCOL, LabelOracle, QueryBudgetExceeded
from ..oracle.protocol import (
    IDEMPOTENCY_HEADER,
    REQUEST_ID,
    decode_images,
    decode_shape,
    max_body_bytes,
)
from .settings import ServeSettings
from .usage import Key, Keys, UsageStore

log = logging.getLogger("zsdb3kd.serve")


class ApiError(Exception):
    """A refusal: HTTP ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class LabelService:
    """What the endpoints share: the oracle, the keys, the usage store and the model thread."""

    def __init__(self, oracle: LabelOracle, settings: ServeSettings, keys: Keys, store: UsageStore,
                 model_sha256: str | None = None) -> None:
        self.oracle, self.settings, self.keys, self.store = oracle, settings, keys, store
        self.model_sha256 = model_sha256
        self.body_limit = max_body_bytes(settings.max_batch, oracle.input_shape)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="zsdb3kd-model")
        self.inflight: dict[tuple[str, str], asyncio.Future] = {}

    def authorise(self, request: Request) -> Key:
        key = self.keys.identify(request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "missing or wrong Authorization header; the client sets it from "
                                "ZSDB3KD_HTTP_AUTH='Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        return key

    def info(self, key: Key) -> dict:
        o = self.oracle
        return {"protocol": PROTOCOL, "input_shape": list(o.input_shape), "num_classes": o.num_classes,
                "bounds": list(o.bounds), "max_batch": self.settings.max_batch, "model_sha256": self.model_sha256,
                "queries": self.store.used(key.name), "max_queries": key.max_queries}

    # -- predict, in order ------------------------------------------------------------
    def parse(self, body: bytes):
        """``(images, body digest)`` of a ``POST /predict`` body (a worker thread runs this)."""
        try:
            payload = json.loads(body)
            shape = decode_shape(payload)
        except RecursionError:
            raise ApiError(400, "body is nested too deeply to be a request") from None
        except ValueError as e:  # includes JSONDecodeError and UnicodeDecodeError
            raise ApiError(400, str(e)[:300]) from None
        if shape[0] > self.settings.max_batch:
            raise ApiError(413, f"{shape[0]} images in one request; max_batch is {self.settings.max_batch}")
        if tuple(shape[1:]) != self.oracle.input_shape:
            raise ApiError(400, f"images of shape {shape[1:]}; this teacher takes {list(self.oracle.input_shape)}")
        try:
            x = decode_images(payload)
        except ValueError as e:
            raise ApiError(400, str(e)[:300]) from None
        return x, hashlib.sha256(body).digest()

    async def answer(self, key: Key, rid: str | None, digest: bytes, x) -> dict:
        """Labels of ``x`` for ``key``; concurrent requests with one id share one answer."""
        loop = asyncio.get_running_loop()
        if rid is None:
            return await loop.run_in_executor(self.model_thread, self._answer, key, None, digest, x)
        slot = (key.name, rid)
        if slot in self.inflight:  # a retry while the first attempt is still being answered
            first = self.inflight[slot]
            out, first_digest = await asyncio.shield(first)
            if first_digest != digest:
                raise ApiError(422, f"{IDEMPOTENCY_HEADER} {rid} was used for another body")
            self.store.note_replay(key.name)
            return {**out, "billed": 0, "replayed": True}
        future = self.inflight[slot] = loop.create_future()
        try:
            out = await loop.run_in_executor(self.model_thread, self._answer, key, rid, digest, x)
            future.set_result((out, digest))
            return out
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: a failure with no retry waiting is not an asyncio warning
            raise
        finally:
            del self.inflight[slot]

    def _answer(self, key: Key, rid: str | None, digest: bytes, x) -> dict:
        """In the model thread: replay, quota, model, bill."""
        if rid is not None:
            cached = self.store.lookup(key.name, rid)
            if cached is not None:
                if cached[0] != digest:
                    raise ApiError(422, f"{IDEMPOTENCY_HEADER} {rid} was used for another body")
                self.store.note_replay(key.name)
                return {"labels": cached[1].tolist(), "billed": 0, "replayed": True}
        n = x.shape[0]
        used = self.store.used(key.name)
        if key.max_queries is not None and used + n > key.max_queries:
            raise ApiError(403, f"query quota exhausted: {used} of {key.max_queries} used, {n} asked")
        try:
            labels = self.oracle(x)
        except QueryBudgetExceeded as e:
            raise ApiError(403, f"query quota exhausted: {e.used} of {e.budget} used, {e.requested} asked") from None
        except (ValueError, TypeError) as e:  # the oracle's own checks: bounds, nan
            raise ApiError(400, str(e)[:300]) from None
        labels = labels.cpu().tolist()
        self.store.bill(key.name, n, rid, digest, labels)
        return {"labels": labels, "billed": n, "replayed": False}


async def _read_body(request: Request, length: int, timeout: float) -> bytes:
    body = bytearray()

    async def collect() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > length:  # the HTTP parser stops this first; belt and braces
                raise ApiError(400, "body longer than its Content-Length")

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout:g} s") from None
    return bytes(body)


async def predict(request: Request) -> JSONResponse:
    svc: LabelService = request.app.state.service
    t0 = time.perf_counter()
    key = svc.authorise(request)
    length = request.headers.get("content-length")
    if length is None:
        raise ApiError(411, "Content-Length required")
    if not (length.isascii() and length.isdigit()):
        raise ApiError(400, "Content-Length must be a number")
    if int(length) > svc.body_limit:
        raise ApiError(413, f"a body of {length} bytes is larger than {svc.settings.max_batch} images can need; "
                            f"send at most max_batch={svc.settings.max_batch} images per request")
    rid = request.headers.get(IDEMPOTENCY_HEADER)
    if rid is not None and not REQUEST_ID.fullmatch(rid):
        raise ApiError(400, f"{IDEMPOTENCY_HEADER} must be 8 to 128 letters, digits or _.:-")
    body = await _read_body(request, int(length), svc.settings.read_timeout)
    x, digest = await run_in_threadpool(svc.parse, body)
    out = await svc.answer(key, rid, digest, x)
    log.info("%s POST /predict %d images key=%s billed=%d %.1f ms", _client(request), len(out["labels"]), key.name,
             out["billed"], 1e3 * (time.perf_counter() - t0))
    return JSONResponse(out)


async def info(request: Request) -> JSONResponse:
    svc: LabelService = request.app.state.service
    return JSONResponse(svc.info(svc.authorise(request)))


async def usage(request: Request) -> JSONResponse:
    svc: LabelService = request.app.state.service
    return JSONResponse(svc.store.usage(svc.authorise(request)))


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    log.info("%s %s %s -> %d %s", _client(request), request.method, request.url.path, exc.status, exc.message)
    return _error(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
    elif exc.status_code == 404:
        message = f"no such endpoint {request.url.path[:100]}; use GET /info, GET /usage or POST /predict"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message, exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    ref = uuid.uuid4().hex[:8]
    log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error (ref {ref}); the server's log has the details")


class Guard:
    """ASGI middleware around the application: request heads over ``max_header_bytes`` get a
    431; a response sent before the request body was read says ``Connection: close``; an
    exception after a response went out (already logged) ends here."""

    def __init__(self, app, max_header_bytes: int) -> None:
        self.app, self.max_header_bytes = app, max_header_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        pending = headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers
        size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4 for k, v in
                                                                         scope["headers"])
        if size > self.max_header_bytes:
            response = _error(431, f"request line and headers of {size} bytes; at most {self.max_header_bytes}",
                              {"Connection": "close"})
            return await response(scope, receive, send)

        async def tracked_receive():
            nonlocal pending
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                pending = False
            return message

        started = False

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if pending:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, tracked_receive, guarded_send)
        except Exception:
            if not started:
                raise
            # Starlette re-raises after its 500 went out; it has been logged with its ref


def build_app(service: LabelService) -> Guard:
    """The ASGI application of ``service`` (Starlette, wrapped in :class:`Guard`)."""
    app = Starlette(routes=[Route("/", info, methods=["GET"]), Route("/info", info, methods=["GET"]),
                            Route("/usage", usage, methods=["GET"]), Route("/predict", predict, methods=["POST"])],
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        ClientDisconnect: _disconnected, Exception: _internal_error})
    app.router.redirect_slashes = False
    app.state.service = service
    return Guard(app, service.settings.max_header_bytes)


async def _disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
    return _error(400, "the client went away")
