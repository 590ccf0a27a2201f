"""Running the label server: :class:`LabelServer` and :func:`serve` on uvicorn.

The server stops on SIGINT and SIGTERM whatever dispositions it inherited (a server
started with ``&`` in a script inherits an ignored SIGINT: the handlers are installed
explicitly for both) and lets requests in progress finish for ``shutdown_timeout`` s.
The connection limits are in :mod:`.protocol`, the endpoints in :mod:`.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from ..oracle import LabelOracle
from ..settings import ConfigError, validate
from .settings import ServeSettings


def _require_stack() -> None:
    try:
        import h11  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the label server needs uvicorn and starlette ({e.name} is missing): "
                          "pip install 'zsdb3kd[serve]'") from e


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _raise_fd_limit(needed: int) -> None:
    """Let the process open ``needed`` files if the hard limit allows (connections are files)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))


_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Listener:
    """The listening socket as one pass of asyncio's accept loop sees it: after an "out of
    files" error, the rest of the pass reads as "no connection waiting"."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self._exhausted = sock, False

    def accept(self):
        if self._exhausted:
            raise BlockingIOError
        try:
            return self._sock.accept()
        except OSError as e:
            self._exhausted = e.errno in _OUT_OF_RESOURCES
            raise

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _EventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, except that a process out of files retries accepting once a
    second. CPython's accept loop goes on after that error: it logs it and schedules another
    retry for every connection still queued, up to the listen backlog (2,048 tracebacks at a
    time, a second later as many again: the server spins while clients wait)."""

    def _accept_connection(self, protocol_factory, sock, *args):
        super()._accept_connection(protocol_factory, _Listener(getattr(sock, "_sock", sock)), *args)


class _CallHandler(logging.Handler):
    def __init__(self, fn: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.fn = fn

    def emit(self, record: logging.LogRecord) -> None:
        self.fn(self.format(record))


class LabelServer:
    """A label server bound to its address (``url``); :meth:`run` serves until stopped.

    :meth:`run` blocks (in the main thread it stops on SIGINT and SIGTERM);
    :meth:`start` serves from a background thread (for tests: ``with LabelServer(...).start()
    as srv: HttpOracle(srv.url)``) and :meth:`stop` ends it. ``token`` is one API key
    (usually ``ZSDB3KD_SERVE_TOKEN``); ``log`` a function taking each log line (default:
    stderr when ``settings.log``).
    """

    def __init__(self, oracle: LabelOracle, settings: ServeSettings | dict | None = None, *,
                 model_sha256: str | None = None, token: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        _require_stack()
        from .app import LabelService
        from .usage import Keys, UsageStore

        settings = validate(ServeSettings, settings if settings is not None else {})
        keys = Keys.load(settings.keys, token, settings.max_queries)
        if settings.state is None and keys.has_quota:
            raise ConfigError("a quota needs --state FILE, where usage survives restarts (--state :memory: keeps "
                              "it in memory only, so a restart resets it)")
        self.oracle, self.settings, self.model_sha256 = oracle, settings, model_sha256
        self.store = UsageStore(settings.state or ":memory:", cache_size=settings.idempotency_cache,
                                model=model_sha256)
        self.service = LabelService(oracle, settings, keys, self.store, model_sha256)
        self._log = logging.getLogger("zsdb3kd.serve")
        self._handler = _CallHandler(log) if log else logging.StreamHandler(sys.stderr) if settings.log else None
        try:
            self.sock = _bind(settings.host, settings.port, settings.backlog)
        except OSError as e:
            self.store.close()
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None
        self._server = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._started = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def queries(self) -> int:
        """Images billed since this server was created."""
        return self.store.billed

    def run(self, ready: Callable[[str], None] | None = None) -> int:
        """Serve until SIGINT/SIGTERM (main thread) or :meth:`stop`; ``ready(url)`` is called once
        listening. Returns the number of queries answered (billed) by this run."""
        import uvicorn

        from .app import build_app
        from .protocol import protocol_class

        outer = self

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                # both signals, whatever was inherited (SIG_IGN included); no re-raise afterwards
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)

            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)
                self.should_exit = self.should_exit or outer._stop
                outer._started.set()
                if ready is not None:
                    ready(outer.url)

        s = self.settings
        config = uvicorn.Config(build_app(self.service), http=protocol_class(s), ws="none", loop="asyncio",
                                lifespan="off", log_config=None, access_log=False, server_header=False,
                                backlog=s.backlog, timeout_keep_alive=s.keep_alive_timeout,
                                timeout_graceful_shutdown=s.shutdown_timeout,
                                h11_max_incomplete_event_size=s.max_header_bytes)
        _raise_fd_limit(2 * s.max_connections + 64)
        if self._handler is not None:
            self._log.addHandler(self._handler)
            self._log.setLevel(logging.INFO)
        # request lines go where --log / log= say, never on to the CLI's 'zsdb3kd' handler
        propagate, self._log.propagate = self._log.propagate, False
        logging.getLogger("uvicorn.error").setLevel(logging.INFO if s.log else logging.ERROR)
        before = self.store.billed
        self._server = Server(config)
        try:
            with asyncio.Runner(loop_factory=_EventLoop) as runner:  # not uvicorn's loop: see _EventLoop
                runner.run(self._server.serve(sockets=[self.sock]))
        finally:
            self._log.propagate = propagate
            if self._handler is not None:
                self._log.removeHandler(self._handler)
            self.service.model_thread.shutdown(wait=True)
        return self.store.billed - before

    def start(self, timeout: float = 30.0) -> LabelServer:
        """Serve from a daemon thread; return once listening."""
        errors: list[BaseException] = []

        def target() -> None:
            try:
                self.run()
            except BaseException as e:  # reported by start()
                errors.append(e)

        self._thread = threading.Thread(target=target, name="zsdb3kd-serve", daemon=True)
        self._thread.start()
        t_end = time.monotonic() + timeout
        while not self._started.wait(0.05):
            if errors or not self._thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError(f"the label server did not start: {errors[0] if errors else 'timeout'}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """End :meth:`run` (in another thread) and wait for it, at most ``timeout`` s."""
        self._stop = True
        t_end = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < t_end:
            if self._server is not None:
                self._server.should_exit = True
            self._thread.join(0.05)

    def close(self) -> None:
        """Stop, release the port and close the usage store."""
        self.stop()
        self.sock.close()
        self.service.model_thread.shutdown(wait=False)
        self.store.close()

    def __enter__(self) -> LabelServer:
        return self if self._started.is_set() else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # the names of the http.server-based server this replaced (tests, older callers)
    def serve_forever(self, poll_interval: float | None = None) -> None:
        self.run()

    def shutdown(self) -> None:
        self.stop()

    def server_close(self) -> None:
        self.close()


def serve(oracle: LabelOracle, settings: ServeSettings | dict | None = None, *, model_sha256: str | None = None,
          token: str | None = None, ready: Callable[[str], None] | None = None) -> int:
    """Serve ``oracle`` until SIGINT or SIGTERM; return the number of queries answered.

    ``ready(url)`` is called once the server listens (e.g. to print the URL: with ``port=0``
    the port is only known then). ``token``: the key ``default`` (``ZSDB3KD_SERVE_TOKEN``)."""
    server = LabelServer(oracle, settings, model_sha256=model_sha256, token=token)
    try:
        return server.run(ready=ready)
    finally:
        server.close()


def make_server(oracle: LabelOracle, host: str = "127.0.0.1", port: int = 0, *, model_sha256: str | None = None,
                token: str | None = None, log: Callable[[str], None] | None = None, **settings) -> LabelServer:
    """A bound :class:`LabelServer` (``port=0`` picks a free port; see ``server.url``)."""
    return LabelServer(oracle, {"host": host, "port": port, **settings}, model_sha256=model_sha256, token=token,
                       log=log)


def serve_forever(server: LabelServer, *, out=sys.stdout) -> int:
    """Run ``server`` until SIGINT or SIGTERM; print and return the number of queries answered."""
    try:
        n = server.run()
    finally:
        server.close()
    print(f"served {n:,} queries", file=out, flush=True)
    return n
