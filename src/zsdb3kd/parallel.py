"""Chunked, resumable, shareable work: one process, several processes on one directory, or
``torchrun`` ranks.

:func:`run_chunks` computes ``n`` chunks of a job (each a dict of tensors, a pure function
of its index and the job's settings) and keeps each finished chunk in a work directory, so
an interrupted job resumes from its finished chunks. Who computes which chunk:

* **torchrun** (``torch.distributed`` initialised, see :func:`init_from_env`): rank 0 lists
  the chunks already on disk and tells every rank; the unfinished ones are dealt out in
  turn (rank ``r`` of ``w`` takes unfinished chunks ``r, r + w, ...``), so a rerun after a
  rank died balances what is left. After a barrier every rank reads the others' chunks
  from the shared directory (without a directory they are exchanged through
  ``torch.distributed``), then a second barrier: when :func:`run_chunks` returns, every
  rank holds every chunk and the directory may be removed. The merged result does not
  depend on ``w``: a chunk is a pure function of its index.
* **independent processes sharing the directory** (e.g. the same command started twice):
  each chunk is claimed with an OS file lock (:mod:`filelock`), which the kernel releases
  when its holder exits or is killed, so a claim can never go stale; a worker that finds a
  chunk claimed works on others first, then waits on that chunk's lock itself and reads
  the chunk its holder saved (or computes it, if the holder died).

A total query budget is split across ranks (:func:`split_budget`) and re-split by each
rank's share of the work once the work is dealt out (:func:`pool_budget`): the ranks
together never pass it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout

from .store import read_tensors, write_json, write_tensors

log = logging.getLogger("zsdb3kd")

#: how long a rank waits at a barrier or collective for the others (``ZSDB3KD_DIST_TIMEOUT``,
#: seconds): rank 0 alone pays a synthesis noise stage while the others wait for it
DEFAULT_TIMEOUT_S = 4 * 3600


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` unless ``torch.distributed`` is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl
    on GPUs, each rank on GPU ``LOCAL_RANK``); returns whether this process is one of
    several ranks. Ranks other than 0 log warnings only."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("ZSDB3KD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        if str(device).startswith("cuda"):
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if torch.device(device).index not in (None, local.index):
                raise ValueError(f"under torchrun pass --device cuda, not {device}: each rank uses the GPU of its "
                                 f"LOCAL_RANK ({local})")
            torch.cuda.set_device(local)  # "cuda" now means this rank's GPU
            dist.init_process_group("nccl", timeout=timeout, device_id=local)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        # leave the group before the interpreter ends: a rank that exits while it is still joined
        # can abort (SIGABRT, "terminate called without an active exception") and fail the job
        atexit.register(_leave)
    if dist.get_rank() != 0 and log.level < logging.WARNING:
        log.setLevel(logging.WARNING)  # one rank speaks for the job
    return True


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the process group together at the end of a job that succeeded: every rank waits
    for the others (rank 0 may still be writing files) before any rank tears its connections
    down; a rank that left alone could abort the job (SIGABRT) in a peer's exit."""
    barrier()
    _leave()


def exit_rank(status: int) -> None:
    """End a torchrun rank whose job succeeded, right after :func:`finish`: flush its output and
    leave with ``os._exit``, skipping the interpreter's teardown. There, a gloo object still
    referenced from Python can be destroyed with its worker thread running, which aborts the
    rank (SIGABRT, "terminate called without an active exception") and fails a finished job;
    seen once in a full test run on 2 cores."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return world()[0] == 0


def all_gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(value: float) -> float:
    """The sum of ``value`` over the ranks."""
    return sum(all_gather(value)) if world()[1] > 1 else value


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (e.g. BatchNorm statistics) into ``module`` on every rank."""
    if world()[1] > 1:
        for b in module.buffers():
            dist.broadcast(b.data, src=src)


def label_sharded(oracle: Any, x: torch.Tensor) -> torch.Tensor:
    """The teacher's labels of ``x``, each image asked once over all ranks: rank ``r`` asks rows
    ``r::w`` and the answers are gathered (in a single process: one call)."""
    rank, size = world()
    if size == 1:
        return oracle(x)
    mine = oracle(x[rank::size]).cpu()
    parts = all_gather(mine)
    y = torch.empty(x.shape[0], dtype=torch.long)
    for r, part in enumerate(parts):
        y[r::size] = part
    return y.to(x.device)


def split_budget(budget: int | None) -> int | None:
    """This rank's share of a total query budget (shares differ by at most one query)."""
    if budget is None:
        return None
    rank, size = world()
    return budget // size + (1 if rank < budget % size else 0)


def pool_budget(oracle: Any, need: int) -> None:
    """Under torchrun, pool what the ranks' oracles have left of their budgets and split it
    again by the work each was dealt: each rank gets its ``need`` (the most queries its
    chunks can cost) plus an even share of the rest; if the pool cannot cover every need,
    it is shared in proportion to the needs. The ranks' budgets never add up to more than
    before. A collective: every rank calls it. No-op in a single process or without budgets."""
    rank, size = world()
    if size == 1:
        return
    rows = all_gather((oracle.remaining, int(need)))
    if any(r is None for r, _ in rows):
        return
    pool, needs = sum(r for r, _ in rows), [n for _, n in rows]
    total = sum(needs)
    if pool >= total:
        spare = pool - total
        share = needs[rank] + spare // size + (1 if rank < spare % size else 0)
    else:
        share = pool * needs[rank] // max(total, 1)
    oracle.budget = oracle.queries + share


class WorkDirectoryRemoved(RuntimeError):
    """The work directory vanished while this worker waited: normally another worker finished
    the job, saved the result and cleaned up."""

    def __init__(self, parts: Path) -> None:
        super().__init__(f"work directory {parts} was removed while waiting for other workers' chunks "
                         "(did another worker finish and write the result?)")
        self.parts = parts


@dataclass
class ChunkReport:
    """What one :func:`run_chunks` call did: chunks ``computed`` here, ``reused`` (read from
    the work directory: finished before this run, or by an independent worker meanwhile)
    and ``shared`` (computed by the other ranks of this torchrun job)."""

    computed: list[int]
    reused: list[int]
    shared: list[int] = field(default_factory=list)


def prepare_work_dir(work_dir: str | os.PathLike, stamp: dict[str, Any], what: str) -> Path:
    """Create ``work_dir`` and record ``stamp`` (which must hold a ``"key"``) in it; a directory
    stamped by another job is refused, so chunks of different settings never mix. Under
    torchrun rank 0 writes the stamp and the others check it after a barrier."""
    parts = Path(work_dir)
    path = parts / "settings.json"
    if is_main():
        parts.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            write_json(path, stamp)
    barrier()
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("key") != stamp["key"]:
        raise ValueError(f"{parts} holds the {what} of a different run (other settings or samples); "
                         "delete it or choose another output path")
    return parts


def run_chunks(n: int, compute: Callable[[int], dict[str, torch.Tensor]], work_dir: Path | None, *,
               on_chunk: Callable[[int, dict[str, torch.Tensor], bool], None] | None = None,
               before: Callable[[list[int]], None] | None = None,
               ) -> tuple[list[dict[str, torch.Tensor]], ChunkReport]:
    """Every chunk ``0 .. n-1``, computed here or read from ``work_dir`` (see the module
    docstring). ``before(mine)`` is called with the chunks this process is to compute before
    any is (under torchrun on every rank: it may be a collective, e.g. :func:`pool_budget`).
    ``on_chunk(c, tensors, reused)`` is called once per chunk as it becomes available here
    (``reused``: not computed here). Returns the chunks in order and what was computed,
    reused or shared."""
    rank, size = world()
    done: dict[int, dict[str, torch.Tensor]] = {}
    report = ChunkReport([], [])

    def path(c: int) -> Path:
        return work_dir / f"chunk-{c:05d}.safetensors"

    def finish(c: int, tensors: dict[str, torch.Tensor], how: list[int]) -> None:
        done[c] = tensors
        how.append(c)
        if on_chunk is not None:
            on_chunk(c, tensors, how is not report.computed)

    existed = [] if work_dir is None else [c for c in range(n) if path(c).exists()]
    if size > 1:  # rank 0's view, so every rank deals the same unfinished chunks
        existed = broadcast(existed)
    pending = [c for c in range(n) if c not in set(existed)]
    mine = pending[rank::size]
    if before is not None:
        before(mine)
    for c in existed:
        finish(c, _read(path(c), work_dir), report.reused)
    if size > 1:
        for c in mine:
            tensors = compute(c)
            if work_dir is not None:
                write_tensors(path(c), tensors)
            finish(c, tensors, report.computed)
        if work_dir is None:  # no shared directory: exchange the chunks through torch.distributed
            for part in all_gather({c: done[c] for c in mine}):
                for c, tensors in part.items():
                    if c not in done:
                        finish(c, tensors, report.shared)
        else:
            barrier()  # every rank's chunks are on disk
            for c in pending:
                if c not in done:
                    finish(c, _read(path(c), work_dir), report.shared)
            barrier()  # every rank has read every chunk: the directory may go
        return [done[c] for c in range(n)], report
    _claim_and_compute(mine, compute, work_dir, path, lambda c, t, how: finish(c, t, getattr(report, how)))
    return [done[c] for c in range(n)], report


def _claim_and_compute(mine: list[int], compute, work_dir: Path | None, path, finish) -> None:
    """One process (of possibly several independent ones sharing ``work_dir``): compute or read
    each chunk of ``mine``, claiming it with its file lock."""

    def attempt(c: int) -> None:
        """Holding chunk ``c``'s lock (if any): read it if it exists, else compute and save it."""
        if work_dir is not None and path(c).exists():
            finish(c, _read(path(c), work_dir), "reused")
            return
        tensors = compute(c)
        if work_dir is not None:
            write_tensors(path(c), tensors)
        finish(c, tensors, "computed")

    waiting = []
    for c in mine:
        if work_dir is None:
            attempt(c)
            continue
        lock = _lock(work_dir, c)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waiting.append(c)  # another live process holds it
            continue
        try:
            attempt(c)
        finally:
            lock.release()
    for c in waiting:  # wait on each claimed chunk's lock: released when its holder finishes or dies
        lock = _lock(work_dir, c)
        try:
            with lock.acquire(poll_interval=0.2):
                attempt(c)
        except FileNotFoundError:
            raise WorkDirectoryRemoved(work_dir) from None


def _lock(work_dir: Path, c: int) -> FileLock:
    if not work_dir.is_dir():
        raise WorkDirectoryRemoved(work_dir)
    return FileLock(str(work_dir / f"chunk-{c:05d}.lock"), thread_local=False)


def _read(path: Path, work_dir: Path) -> dict[str, torch.Tensor]:
    try:
        return read_tensors(path)
    except FileNotFoundError:
        if not work_dir.is_dir():
            raise WorkDirectoryRemoved(work_dir) from None
        raise
