"""The label-only seam: a decision-based black box that answers class indices, counted.

An oracle takes a batch of images in its ``bounds`` (default ``[0, 1]``) and returns the
teacher's top-1 class index for each, nothing more. It is also the one place where
queries are counted (1 image = 1 query) and where a total budget is enforced: a call
that would exceed the budget raises :class:`QueryBudgetExceeded` *before* anything is
sent, so the count never passes the budget and nothing is silently truncated.

With a query log (:mod:`.querylog`) every oracle answers images it has already paid for
from a persistent file and asks the teacher only for the others: :attr:`LabelOracle.queries`
counts what the caller got, :attr:`LabelOracle.paid` what the teacher was asked.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .querylog import QueryLog


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

    def __init__(self, message: str, *, answered: int = 0, partial: list | None = None) -> None:
        super().__init__(message)
        self.answered = answered
        #: ``(chunk index, labels)`` of chunks answered after the failing one (for the query log)
        self.partial: list[tuple[int, torch.Tensor]] = partial or []


class LabelOracle(ABC):
    """A decision-based black box: images in, class indices out, every query counted.

    Subclasses implement :meth:`_predict` only. The public :meth:`__call__` validates the
    input, enforces the budget, answers what the query log already holds, splits the rest
    into chunks of ``max_batch`` images for the teacher and counts.

    Two counts: :attr:`queries` is what the caller was answered (what algorithms account
    and budget against, log hits included, so a resumed run counts what an uninterrupted
    one does) and :attr:`paid` is what the teacher was actually asked (for a label server,
    what it billed, retries included).

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of classes the teacher can answer.
        budget: optional total number of queries this oracle may answer.
        bounds: pixel range; inputs outside it are rejected, not clipped.
        max_batch: largest chunk sent to the teacher at once (small chunks stay in the CPU cache:
            a LeNet-5 answers about 3x faster in chunks of 256 than of 4,096 on 2 cores).
        query_log: path of a persistent append-only log (see :mod:`.querylog`): images found
            in it are answered from it, the teacher's answers are appended to it.
        teacher_id: what names the teacher in the log (default: :attr:`teacher_id`).
    """

    #: subclasses that learn what the teacher billed (HTTP) count :attr:`paid` themselves
    _counts_paid = False
    #: subclasses whose labels are in range by construction skip the range check (on a GPU
    #: each check waits for the device)
    _labels_in_range = False

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        budget: int | None = None,
        bounds: Bounds = Bounds(),
        max_batch: int = 256,
        device: str | torch.device = "cpu",
        query_log: str | os.PathLike | None = None,
        teacher_id: str | None = None,
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
        self._paid = 0
        self.query_log_path = None if query_log is None else Path(query_log)
        self._teacher_id = teacher_id
        self._log: QueryLog | None = None  # opened at the first call: subclasses set their identity first

    # -- accounting -------------------------------------------------------------------
    @property
    def queries(self) -> int:
        """Images answered to the caller (by the teacher or from the query log)."""
        return self._queries

    @property
    def paid(self) -> int:
        """Images the teacher was asked to label (for a label server: what it billed, retries included)."""
        return self._paid

    @property
    def remaining(self) -> int | None:
        """Queries left in the budget, or ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self._queries

    def check_budget(self, n: int) -> None:
        """Raise :class:`QueryBudgetExceeded` if ``n`` more queries would pass the budget."""
        if self.budget is not None and self._queries + n > self.budget:
            raise QueryBudgetExceeded(n, self._queries, self.budget)

    # -- the query log ----------------------------------------------------------------
    @property
    def teacher_id(self) -> str:
        """What names the teacher in the query log: a given ``teacher_id``, else the content
        hash the teacher is known by (a server's ``model_sha256``, a weights or ONNX file's
        sha256), else its type and shape (then keep one log per teacher)."""
        if self._teacher_id is None:
            sha = getattr(self, "sha256", None) or getattr(getattr(self, "source", None), "sha256", None)
            path = getattr(self, "path", None)
            if sha is None and isinstance(path, (str, os.PathLike)) and Path(path).is_file():
                from ..weights import file_sha256

                sha = file_sha256(path)
            self._teacher_id = (f"sha256:{sha}" if sha else
                                f"{type(self).__name__}:{self.input_shape}:{self.num_classes}")
        return self._teacher_id

    @property
    def query_log(self) -> QueryLog | None:
        """The open query log, or ``None`` without one."""
        if self._log is None and self.query_log_path is not None:
            teacher = self.teacher_id
            if teacher.startswith(f"{type(self).__name__}:"):
                warnings.warn(f"the query log {self.query_log_path} knows this teacher only by its type and shape "
                              f"({teacher}): keep one log per teacher, or pass teacher_id=", stacklevel=3)
            self._log = QueryLog(self.query_log_path, teacher, self.input_shape)
        return self._log

    def log_stats(self) -> dict | None:
        """The query log's ``path``, ``records``, ``hits`` (queries it saved), ``appended``
        and ``dropped``, with this oracle's ``queries`` and ``paid``; ``None`` without a log."""
        log = self.query_log
        return None if log is None else {**log.stats(), "queries": self.queries, "paid": self.paid}

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
        log = self.query_log
        if log is None:
            return self._ask(x.clamp(lo, hi), x.device)
        return self._ask_logged(log, x.clamp(lo, hi))

    def _ask(self, x: torch.Tensor, device: torch.device, on_chunk=None) -> torch.Tensor:
        """The teacher's labels for ``x`` (in bounds), in chunks of ``max_batch``; counts as
        chunks are answered. ``on_chunk(start, labels)`` sees each answered chunk, also the
        ones a failing call got back (:attr:`OracleError.partial`)."""
        starts = range(0, x.shape[0], self.max_batch)
        chunks = [x[s : s + self.max_batch] for s in starts]
        out = []
        try:
            for start, chunk, labels in zip(starts, chunks, self._predict_chunks(chunks)):
                # counted as soon as the teacher has answered, even if the answer is then rejected
                self._queries += chunk.shape[0]
                self._paid += 0 if self._counts_paid else chunk.shape[0]
                if labels.shape != (chunk.shape[0],):
                    raise RuntimeError(f"teacher returned labels of shape {tuple(labels.shape)}")
                if not self._labels_in_range and bool(((labels < 0) | (labels >= self.num_classes)).any()):
                    raise RuntimeError(f"teacher returned a label outside [0, {self.num_classes})")
                if on_chunk is not None:
                    on_chunk(start, labels)
                out.append(labels.to(device=device, dtype=torch.long))
        except OracleError as e:
            self._queries += e.answered
            self._paid += 0 if self._counts_paid else e.answered
            if on_chunk is not None:
                for i, labels in e.partial:
                    if labels.shape == (chunks[i].shape[0],):
                        on_chunk(starts[i], labels)
            raise
        return torch.cat(out)

    def _ask_logged(self, log: QueryLog, x: torch.Tensor) -> torch.Tensor:
        """Answer from the log what it holds; ask the teacher once for each other distinct image."""
        keys = log.keys(x)
        found, labels = log.lookup(keys)
        miss = np.flatnonzero(~found)
        answered = int(found.sum())
        if len(miss):
            # each distinct image once, in order of first appearance
            _, first, inverse = np.unique(keys[miss], axis=0, return_index=True, return_inverse=True)
            order = np.argsort(first)
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            ask = miss[first[order]]  # rows of x to send, in order
            where = rank[inverse.reshape(-1)]  # for each miss, its row in ``ask``
            asked = np.full(len(ask), -1, dtype=np.int64)

            def keep(start: int, got: torch.Tensor) -> None:
                got = got.cpu().numpy()
                asked[start : start + len(got)] = got
                log.append(keys[ask[start : start + len(got)]], got)

            before = self._queries
            try:
                self._ask(x[torch.from_numpy(ask).to(x.device)], x.device, on_chunk=keep)
            except BaseException:
                self._queries = before + answered + int((asked[where] >= 0).sum())
                raise
            self._queries = before
            labels[miss] = asked[where]
        self._queries += x.shape[0]
        return torch.from_numpy(labels).to(x.device)

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


