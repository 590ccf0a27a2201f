"""Label-only teacher access: the single seam between this package and the black box.

An oracle takes a batch of images in its ``bounds`` (default ``[0, 1]``) and returns the
teacher's top-1 class index for each, nothing more. It is also the one place where
queries are counted (1 image = 1 query) and where a total budget is enforced: a call
that would exceed the budget raises :class:`QueryBudgetExceeded` *before* anything is
sent, so the count never passes the budget and nothing is silently truncated.

Implementations: :class:`TorchOracle` (a local PyTorch model; its logits never leave
the object), :class:`OnnxOracle` (an ONNX file run with onnxruntime) and
:class:`FunctionOracle` (any callable returning labels, e.g. a remote API client).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, NamedTuple

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
        out = []
        for start in range(0, n, self.max_batch):
            chunk = x[start : start + self.max_batch].clamp(lo, hi)
            labels = self._predict(chunk)
            if labels.shape != (chunk.shape[0],):
                raise RuntimeError(f"teacher returned labels of shape {tuple(labels.shape)}")
            if bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise RuntimeError(f"teacher returned a label outside [0, {self.num_classes})")
            out.append(labels.to(device=x.device, dtype=torch.long))
            self._queries += chunk.shape[0]
        return torch.cat(out)

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


def load_oracle(path: str | os.PathLike, *, device: str = "cpu", budget: int | None = None, arch: str | None = None,
                max_batch: int = 256) -> LabelOracle:
    """Open a teacher file as a label-only oracle: ``.onnx`` via onnxruntime, else weights."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxOracle(path, budget=budget, max_batch=max_batch)
    return TorchOracle.from_file(path, device=device, arch=arch, budget=budget, max_batch=max_batch)
