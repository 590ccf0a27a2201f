"""Chunked, resumable, shareable work: one process, several processes on one directory, or
``torchrun`` ranks.

:func:`run_chunks` computes ``n`` chunks of a job (each a dict of tensors, a pure function
of its index and the job's settings) and keeps each finished chunk in a work directory, so
an interrupted job resumes from its finished chunks. Who computes which chunk:

* **torchrun** (``torch.distributed`` initialised, see :func:`init_from_env`): rank ``r`` of
  ``w`` owns chunks ``c % w == r``; after a barrier every rank reads the others' chunks from
  the shared directory. The merged result does not depend on ``w``.
* **independent processes sharing the directory** (e.g. the same command started twice):
  each chunk is claimed with an OS file lock (:mod:`filelock`), which the kernel releases
  when its holder exits or is killed, so a claim can never go stale; a worker that finds a
  chunk claimed works on others first, then waits on that chunk's lock itself and reads
  the chunk its holder saved (or computes it, if the holder died).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout

from .store import read_tensors, write_json, write_tensors


def world() -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` unless ``torch.distributed`` is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl
    on GPUs); returns whether this process is one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return world()[0] == 0


def split_budget(budget: int | None) -> int | None:
    """This rank's share of a total query budget (shares differ by at most one query)."""
    if budget is None:
        return None
    rank, size = world()
    return budget // size + (1 if rank < budget % size else 0)


class WorkDirectoryRemoved(RuntimeError):
    """The work directory vanished while this worker waited: normally another worker finished
    the job, saved the result and cleaned up."""

    def __init__(self, parts: Path) -> None:
        super().__init__(f"work directory {parts} was removed while waiting for other workers' chunks "
                         "(did another worker finish and write the result?)")
        self.parts = parts


@dataclass
class ChunkReport:
    """What one :func:`run_chunks` call did."""

    computed: list[int]
    reused: list[int]


def prepare_work_dir(work_dir: str | os.PathLike, stamp: dict[str, Any], what: str) -> Path:
    """Create ``work_dir`` and record ``stamp`` (which must hold a ``"key"``) in it; a directory
    stamped by another job is refused, so chunks of different settings never mix."""
    parts = Path(work_dir)
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("key") != stamp["key"]:
            raise ValueError(f"{parts} holds the {what} of a different run (other settings or samples); "
                             "delete it or choose another output path")
    else:
        write_json(path, stamp)
    return parts


def run_chunks(n: int, compute: Callable[[int], dict[str, torch.Tensor]], work_dir: Path | None, *,
               on_chunk: Callable[[int, dict[str, torch.Tensor], bool], None] | None = None,
               ) -> tuple[list[dict[str, torch.Tensor]], ChunkReport]:
    """Every chunk ``0 .. n-1``, computed here or read from ``work_dir`` (see the module
    docstring). ``on_chunk(c, tensors, reused)`` is called once per chunk as it becomes
    available here. Returns the chunks in order and what was computed or reused."""
    rank, size = world()
    mine = [c for c in range(n) if c % size == rank]
    done: dict[int, dict[str, torch.Tensor]] = {}
    report = ChunkReport([], [])

    def path(c: int) -> Path:
        return work_dir / f"chunk-{c:05d}.safetensors"

    def finish(c: int, tensors: dict[str, torch.Tensor], reused: bool) -> None:
        done[c] = tensors
        (report.reused if reused else report.computed).append(c)
        if on_chunk is not None:
            on_chunk(c, tensors, reused)

    def attempt(c: int, lock: FileLock | None) -> None:
        """Holding chunk ``c``'s lock (if any): read it if it exists, else compute and save it."""
        if work_dir is not None and path(c).exists():
            finish(c, _read(path(c), work_dir), True)
            return
        tensors = compute(c)
        if work_dir is not None:
            write_tensors(path(c), tensors)
        finish(c, tensors, False)

    waiting = []
    for c in mine:
        if work_dir is None:
            attempt(c, None)
        elif path(c).exists():
            finish(c, _read(path(c), work_dir), True)
        else:
            lock = _lock(work_dir, c)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                waiting.append(c)  # another live process holds it
                continue
            try:
                attempt(c, lock)
            finally:
                lock.release()
    for c in waiting:  # wait on each claimed chunk's lock: released when its holder finishes or dies
        lock = _lock(work_dir, c)
        try:
            with lock.acquire(poll_interval=0.2):
                attempt(c, lock)
        except FileNotFoundError:
            raise WorkDirectoryRemoved(work_dir) from None
    if size > 1:
        barrier()  # every rank's chunks are on disk
        for c in range(n):
            if c not in done:
                finish(c, _read(path(c), work_dir), True)
    return [done[c] for c in range(n)], report


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
