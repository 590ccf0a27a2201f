"""Paying the teacher, once: every call of a budgeted run goes through :class:`QueryLedger`.

The ledger checks the run's budget before anything is sent, checks that the oracle counted
exactly the images it was given, and stores each answered call under its key the moment
it is answered (images by digest, labels as tensors). A rerun after an interruption asks
for the same keys; a stored call is replayed from disk, free, after checking that it is
about the very same images, so no query is ever paid twice.

Under torchrun every rank runs the same rounds (the same bits: every random stream is
derived from the seed); each call is split by rows over the ranks (``label_sharded``), so
each image is asked once over all ranks and the answers gathered; rank 0 decides whether a
call is replayed and alone writes the answers (the work directory must be shared).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..parallel import broadcast, is_main, label_sharded, world
from ..store import read_tensors, write_tensors


def digest(x: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's shape, dtype and bytes."""
    t = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class QueryLedger:
    """Budget-checked, replayable access to a label-only oracle.

    Args:
        oracle: callable ``(B, C, H, W) -> (B,)`` labels, with a ``queries`` count.
        budget: the run's total budget.
        folder: where answered calls are kept (``None``: nothing is kept, nothing replayed).
    """

    def __init__(self, oracle: Callable[[torch.Tensor], torch.Tensor], budget: int,
                 folder: str | os.PathLike | None = None) -> None:
        self.oracle = oracle
        self.budget = int(budget)
        self.folder = None if folder is None else Path(folder)
        self.spent = 0  # every query of the run so far, replayed calls included
        self.paid_here = 0  # paid to the oracle by this run (over all ranks), replays excluded

    def __call__(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """The teacher's labels of ``x``; ``key`` names the call uniquely within the run."""
        n = int(x.shape[0])
        if self.spent + n > self.budget:
            raise RuntimeError(f"internal error: call {key} of {n:,} queries would pass the budget "
                               f"({self.spent:,} of {self.budget:,} spent); nothing was sent")
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        x = x.detach().to("cpu", torch.float32).contiguous()
        d = digest(x)
        file = None if self.folder is None else self.folder / f"query-{key}.safetensors"
        if broadcast(file is not None and file.exists()):  # rank 0's view decides, for every rank
            with safe_open(str(file), framework="pt") as f:
                stored = (f.metadata() or {}).get("digest")
            if stored != d:
                raise RuntimeError(f"{file}: the stored answers are for other images (the settings or the code "
                                   "changed since the run was interrupted); use a new work directory")
            self.spent += n
            return read_tensors(file)["labels"].long()
        rank, size = world()
        mine = len(range(rank, n, size))  # rows rank::size are this rank's to ask
        before = getattr(self.oracle, "queries", None)
        labels = label_sharded(self.oracle, x).to("cpu").long().reshape(-1)
        after = getattr(self.oracle, "queries", None)
        if before is not None and after is not None and after - before != mine:
            raise RuntimeError(f"the oracle counted {after - before} queries for a share of {mine} images")
        if labels.shape[0] != n:
            raise RuntimeError(f"the oracle returned {labels.shape[0]} labels for {n} images")
        self.spent += n
        self.paid_here += n
        if file is not None and is_main():
            write_tensors(file, {"labels": labels}, metadata={"digest": d, "n": str(n)})
        return labels
