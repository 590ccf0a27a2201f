"""Helpers for the label-server tests (no tests here): a server in a subprocess that can be
killed and restarted on its port, a fault-injecting HTTP proxy, and raw-socket probes.

Every wait is bounded and waits on the thing itself (a line on stdout, a process, a
socket), never on a fixed sleep.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from conftest import SHAPE, LinearTeacher

K = 4
TESTS = Path(__file__).resolve().parent

# the server process: the conftest linear teacher behind zsdb3kd.serve.serve()
_SERVER = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from conftest import SHAPE, LinearTeacher
from zsdb3kd.oracle import TorchOracle
from zsdb3kd.serve import serve
args = json.loads(sys.argv[1])
if args.get("arch"):  # a real network (load tests): seeded, as lenet() builds it
    from zsdb3kd.models import create_model
    torch.manual_seed(0)
    oracle = TorchOracle(create_model(args["arch"], num_classes=10, input_shape=(1, 28, 28)), (1, 28, 28), 10,
                         max_batch=10_000)
else:
    oracle = TorchOracle(LinearTeacher(seed=3, k={k}), SHAPE, {k}, max_batch=10_000)
n = serve(oracle, args["settings"], model_sha256=args.get("sha"), token=args.get("token"),
          ready=lambda url: print("serving at", url, flush=True))
print("served", n, flush=True)
"""


def lenet(arch: str = "lenet5"):
    """The network a server started with ``arch=`` serves (same seed)."""
    from zsdb3kd.models import create_model

    torch.manual_seed(0)
    return create_model(arch, num_classes=10, input_shape=(1, 28, 28)).eval()


def expected_labels(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return LinearTeacher(seed=3, k=K)(x).argmax(1)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


class ServerProcess:
    """``zsdb3kd.serve.serve`` in a subprocess; :meth:`restart` comes back on the same port."""

    def __init__(self, settings: dict | None = None, *, token: str | None = None, sha: str | None = "ab" * 32,
                 nofile: int | None = None, ignore_sigint: bool = False, arch: str | None = None) -> None:
        self.settings = {"port": 0, **(settings or {})}
        self.token, self.sha, self.nofile, self.ignore_sigint = token, sha, nofile, ignore_sigint
        self.arch = arch
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.start()

    def start(self, timeout: float = 60.0) -> ServerProcess:
        def limit() -> None:  # runs in the child before exec
            import resource

            if self.nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
            if self.ignore_sigint:  # what a shell does to a job started with & in a script
                signal.signal(signal.SIGINT, signal.SIG_IGN)

        args = json.dumps({"settings": self.settings, "token": self.token, "sha": self.sha, "arch": self.arch})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER.format(tests=str(TESTS), k=K), args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=limit)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        self.errors: list[str] = []
        threading.Thread(target=self._pump_list, args=(self.proc.stderr, self.errors), daemon=True).start()
        line = self.line(timeout)
        assert line.startswith("serving at "), (line, "".join(self.errors))
        self.url = line.split()[-1]
        self.settings["port"] = int(self.url.rsplit(":", 1)[1])  # a restart comes back here
        return self

    @staticmethod
    def _pump(stream, out: queue.Queue) -> None:
        for line in stream:
            out.put(line)
        out.put("")

    @staticmethod
    def _pump_list(stream, out: list) -> None:
        for line in stream:
            out.append(line)

    def line(self, timeout: float = 60.0) -> str:
        try:
            return self.lines.get(timeout=timeout).strip()
        except queue.Empty:
            raise AssertionError(f"no output from the server within {timeout} s; stderr: {''.join(self.errors)}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the process; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> ServerProcess:
        self.kill()
        return self.start()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def exchange(url: str, raw: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send ``raw`` bytes on a new connection; ``(status, headers, body)`` of the answer (status 0: none)."""
    with socket.create_connection(address(url), timeout=timeout) as s:
        s.sendall(raw)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0, {}, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``s`` within ``seconds`` (whatever it sends first is read and dropped)."""
    s.settimeout(seconds)
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


class FaultProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy to ``upstream`` that injects faults into ``POST /predict``, by a seeded schedule.

    Faults (each with its probability in ``rates``): ``500`` (answered without forwarding),
    ``500-after`` (forwarded, the answer replaced by a 500), ``503`` (Retry-After: 0),
    ``delay`` (0.05-0.2 s before forwarding), ``drop`` (forwarded, connection closed without an
    answer), ``drop-before`` (closed without forwarding) and ``truncate`` (forwarded, half the
    answer sent). An upstream that is down is answered 502. ``counts`` says what happened.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, rates: dict[str, float], seed: int = 0) -> None:
        self.upstream, self.rates = upstream, rates
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.forwarded = 0
        self.on_forward = None  # called with the number of forwarded requests (e.g. to kill the server)
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault(self) -> str:
        with self.lock:
            r, acc = self.rng.random(), 0.0
            for name, p in self.rates.items():
                acc += p
                if r < acc:
                    self.counts[name] = self.counts.get(name, 0) + 1
                    return name
            return "ok"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        s: socket.socket = self.request
        s.settimeout(30)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            while len(buf) < n:
                chunk = s.recv(65536)
                if not chunk:
                    return
                buf += chunk
            body, buf = buf[:n], buf[n:]
            srv: FaultProxy = self.server
            fault = srv.fault() if head.startswith(b"POST /predict") else "ok"
            if fault == "drop-before":
                return
            if fault == "500":
                s.sendall(_answer(500, b'{"error": "injected"}'))
                continue
            if fault == "503":
                s.sendall(_answer(503, b'{"error": "injected"}', b"Retry-After: 0\r\n"))
                continue
            if fault == "delay":
                time.sleep(srv.rng.uniform(0.05, 0.2))
            answer = self._forward(head, body)
            if fault in ("drop", "drop-before"):
                return
            if fault == "500-after":
                answer = _answer(500, b'{"error": "injected after the server answered"}')
            if fault == "truncate":
                s.sendall(answer[: len(answer) - max(1, (len(answer) - answer.index(b"\r\n\r\n")) // 2)])
                return
            s.sendall(answer)

    def _forward(self, head: bytes, body: bytes) -> bytes:
        srv: FaultProxy = self.server
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        request = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body
        try:
            with socket.create_connection(address(srv.upstream), timeout=30) as up:
                up.sendall(request)
                status, _, data = read_response(up)
        except OSError:
            status = 0
        if status == 0:
            return _answer(502, b'{"error": "upstream down"}')
        with srv.lock:
            srv.forwarded += 1
            n = srv.forwarded
        if srv.on_forward is not None:
            srv.on_forward(n)
        return _answer(status, data)


def _answer(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (status, len(body), extra)) + body
