"""The label-only seam: a decision-based black box that answers class indices, counted.

An oracle takes a batch of images in its ``bounds`` (default ``[0, 1]``) and returns the
teacher's top-1 class index for each, nothing more. It is also the one place where
queries are counted (1 image = 1 query) and where a total budget is enforced: a call
that would exceed the budget raises :class:`QueryBudgetExceeded` *before* anything is
sent, so the count never passes the budget and nothing is silently truncated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator, NamedTuple

import torch

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


class FunctionOracle(LabelOracle):
    """Wrap any callable ``(B, C, H, W) float tensor -> (B,) labels`` (e.g. an HTTP client)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], input_shape, num_classes: int, **kwargs) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        self._fn = fn

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._fn(x)).long().reshape(-1)


