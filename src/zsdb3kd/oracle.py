"""Label-only teacher access: the single seam between this package and the black box.

An oracle takes a batch of images in its ``bounds`` (default ``[0, 1]``) and returns the
teacher's top-1 class index for each, nothing more. It is also the one place where
queries are counted (1 image = 1 query) and where a total budget is enforced: a call
that would exceed the budget raises :class:`QueryBudgetExceeded` *before* anything is
sent, so the count never passes the budget and nothing is silently truncated.

Implementations: :class:`TorchOracle` (a local PyTorch model; its logits never leave
the object), :class:`OnnxOracle` (an ONNX file run with onnxruntime),
:class:`HttpOracle` (a teacher behind an HTTP endpoint speaking the small JSON protocol
of :mod:`zsdb3kd.serve`) and :class:`FunctionOracle` (any callable returning labels, e.g.
a client for a vendor's own API).
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn


class Bounds(NamedTuple):
    """Valid pixel range of the teacher's inputs."""

    lower: float = 0.0
    upper: float = 1.0


class QueryBudgetExceeded(RuntimeError):
    """Raised when a call would take the oracle past its total query budget."""

    def __init__(self, requested: int, used: int, budget: int) -> None:
        self.requested, self.used, self.budget = requested, used, budget
        super().__init__(
            f"query budget exceeded: this call needs {requested} queries but only "
            f"{budget - used} of the budget of {budget} remain ({used} used); "
            "raise the budget (--query-budget) or lower the per-sample settings"
        )


class OracleError(RuntimeError):
    """The teacher could not answer (a remote one refused, failed or was unreachable).

    ``answered`` is the number of images the teacher did label before the failure beyond
    those already handed back; :class:`LabelOracle` adds them to its count, so the count
    stays equal to what the teacher answered.
    """

    def __init__(self, message: str, *, answered: int = 0) -> None:
        super().__init__(message)
        self.answered = answered


class LabelOracle(ABC):
    """A decision-based black box: images in, class indices out, every query counted.

    Subclasses implement :meth:`_predict` only. The public :meth:`__call__` validates the
    input, enforces the budget, splits the batch into chunks of ``max_batch`` images and
    counts the queries.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of classes the teacher can answer.
        budget: optional total number of queries this oracle may answer.
        bounds: pixel range; inputs outside it are rejected, not clipped.
        max_batch: largest chunk sent to the teacher at once (small chunks stay in the CPU cache:
            a LeNet-5 answers about 3x faster in chunks of 256 than of 4,096 on 2 cores).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        budget: int | None = None,
        bounds: Bounds = Bounds(),
        max_batch: int = 256,
        device: str | torch.device = "cpu",
    ) -> None:
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.budget = budget
        self.bounds = Bounds(*bounds)
        self.max_batch = int(max_batch)
        self.device = torch.device(device)
        self._queries = 0

    # -- accounting -------------------------------------------------------------------
    @property
    def queries(self) -> int:
        """Total number of images labelled by the teacher through this oracle."""
        return self._queries

    @property
    def remaining(self) -> int | None:
        """Queries left in the budget, or ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self._queries

    def check_budget(self, n: int) -> None:
        """Raise :class:`QueryBudgetExceeded` if ``n`` more queries would pass the budget."""
        if self.budget is not None and self._queries + n > self.budget:
            raise QueryBudgetExceeded(n, self._queries, self.budget)

    # -- the public seam --------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Label a batch.

        Args:
            x: float tensor ``(B, C, H, W)`` with values in ``bounds``.

        Returns:
            int64 tensor ``(B,)`` of class indices, on ``x``'s device.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"oracle input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"oracle expects a batch of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"oracle input must be floating point, got {x.dtype}")
        n = x.shape[0]
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        lo, hi = self.bounds
        # tolerance for float round-off only; anything further out is a caller bug
        if not bool(((x >= lo - 1e-6) & (x <= hi + 1e-6)).all()):  # also rejects nan
            raise ValueError(
                f"oracle input outside bounds [{lo}, {hi}]: min {x.min().item():.4g}, "
                f"max {x.max().item():.4g}; clip queries to the box before sending them"
            )
        self.check_budget(n)
        chunks = [x[start : start + self.max_batch].clamp(lo, hi) for start in range(0, n, self.max_batch)]
        out = []
        try:
            for chunk, labels in zip(chunks, self._predict_chunks(chunks)):
                # counted as soon as the teacher has answered, even if the answer is then rejected
                self._queries += chunk.shape[0]
                if labels.shape != (chunk.shape[0],):
                    raise RuntimeError(f"teacher returned labels of shape {tuple(labels.shape)}")
                if bool(((labels < 0) | (labels >= self.num_classes)).any()):
                    raise RuntimeError(f"teacher returned a label outside [0, {self.num_classes})")
                out.append(labels.to(device=x.device, dtype=torch.long))
        except OracleError as e:
            self._queries += e.answered
            raise
        return torch.cat(out)

    def _predict_chunks(self, chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Labels of each chunk, in order. Override to answer chunks concurrently."""
        return map(self._predict, chunks)

    @abstractmethod
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 class indices ``(B,)`` for a chunk ``(B, C, H, W)`` already in bounds."""

    def __repr__(self) -> str:
        budget = "unlimited" if self.budget is None else str(self.budget)
        return (
            f"{type(self).__name__}(input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"queries={self._queries}, budget={budget})"
        )


class TorchOracle(LabelOracle):
    """A local PyTorch classifier exposed through labels only.

    The model is kept private and put in eval mode; only ``argmax`` of its logits leaves.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        self.__model = model.to(self.device).eval()

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.__model(x.to(self.device, torch.float32)).argmax(dim=1)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, device: str = "cpu", arch: str | None = None, **kwargs) -> "TorchOracle":
        """Load a teacher from a weights file (see :mod:`zsdb3kd.weights`)."""
        from .weights import load_weights

        model, info = load_weights(path, device=device, arch=arch)
        oracle = cls(model, info.input_shape, info.num_classes, device=device, **kwargs)
        oracle.source = info
        return oracle


class FunctionOracle(LabelOracle):
    """Wrap any callable ``(B, C, H, W) float tensor -> (B,) labels`` (e.g. an HTTP client)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], input_shape, num_classes: int, **kwargs) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        self._fn = fn

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._fn(x)).long().reshape(-1)


class OnnxOracle(LabelOracle):
    """A teacher stored as an ONNX file, run with onnxruntime on the CPU.

    The graph must take one float input ``(B, C, H, W)`` and return scores ``(B, K)``
    (or labels ``(B,)``); only the argmax is returned.
    """

    def __init__(self, path: str | os.PathLike, *, input_shape=None, num_classes: int | None = None, **kwargs) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # optional extra
            raise ImportError("ONNX teachers need onnxruntime: pip install 'zsdb3kd[onnx]'") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX teacher not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"cannot load ONNX teacher {path}: {e}") from e
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        dims = list(inp.shape)[1:]
        if input_shape is None:
            if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
                raise ValueError(f"{path}: input shape {inp.shape} is not static; pass input_shape=(C, H, W)")
            input_shape = tuple(dims)
        if num_classes is None:
            out_dims = self._session.get_outputs()[0].shape
            if len(out_dims) != 2 or not isinstance(out_dims[1], int):
                raise ValueError(f"{path}: cannot infer num_classes from output shape {out_dims}; pass num_classes")
            num_classes = out_dims[1]
        super().__init__(input_shape, num_classes, **kwargs)
        self.path = path

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self._session.run(None, {self._input_name: x.detach().cpu().float().numpy()})[0]
        out = torch.from_numpy(out)
        return out.argmax(dim=1) if out.dim() == 2 else out.long().reshape(-1)


PROTOCOL = "zsdb3kd-labels/1"
_RETRYABLE = (429, 502, 503, 504)


def encode_images(x: torch.Tensor) -> dict:
    """The JSON body of a ``POST /predict``: shape, dtype and base64 of little-endian float32 bytes."""
    arr = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"shape": list(arr.shape), "dtype": "float32", "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_images(body: dict) -> torch.Tensor:
    """Inverse of :func:`encode_images`; raises ``ValueError`` on a malformed body."""
    import numpy as np

    if not isinstance(body, dict) or not {"shape", "data"} <= body.keys():
        raise ValueError('body must be a JSON object with "shape" and "data" (base64 float32)')
    if body.get("dtype", "float32") != "float32":
        raise ValueError(f'dtype must be "float32", got {body.get("dtype")!r}')
    shape = body["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f'"shape" must be [B, C, H, W] of non-negative ints, got {shape!r}')
    try:
        raw = base64.b64decode(body["data"], validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f'"data" is not valid base64: {e}') from None
    if len(raw) != 4 * math.prod(shape):
        raise ValueError(f'"data" holds {len(raw)} bytes; shape {shape} in float32 needs {4 * math.prod(shape)}')
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))


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


def teacher_sha256(spec: str | os.PathLike, oracle: LabelOracle | None = None) -> str | None:
    """What names a teacher: its file's sha256, or the ``model_sha256`` a label server
    reports (``None`` if it reports none). ``oracle``: an open :class:`HttpOracle` on
    ``spec``, to avoid asking the server again."""
    if is_url(spec):
        if oracle is None:
            oracle = HttpOracle(str(spec), **http_settings_from_env())
        return getattr(oracle, "sha256", None)
    from .weights import file_sha256

    return file_sha256(spec)


def is_url(spec: str | os.PathLike) -> bool:
    """Whether a teacher spec names an HTTP endpoint rather than a file."""
    return isinstance(spec, str) and spec.lower().startswith(("http://", "https://"))


def load_oracle(path: str | os.PathLike, *, device: str = "cpu", budget: int | None = None, arch: str | None = None,
                max_batch: int = 256) -> LabelOracle:
    """Open a teacher as a label-only oracle: ``http(s)://`` via :class:`HttpOracle`, ``.onnx``
    via onnxruntime, anything else as weights."""
    if is_url(path):
        return HttpOracle(str(path), budget=budget, max_batch=max_batch, device=device, **http_settings_from_env())
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxOracle(path, budget=budget, max_batch=max_batch)
    return TorchOracle.from_file(path, device=device, arch=arch, budget=budget, max_batch=max_batch)
