"""A persistent, append-only log of answered queries, so that no image is paid for twice.

Each record maps the hash of one image's exact float32 bytes (and the teacher's identity)
to the label the teacher gave it. :class:`~zsdb3kd.oracle.LabelOracle` answers logged
images from the log and sends only the misses to the teacher, so a job that was killed,
or that failed when the teacher went away, pays on its rerun only for what it never got.

File format (little-endian), one file per log, any number of teachers in it::

    header   24 bytes  b"zsdb3kd-querylog/1\\n" padded with zero bytes
    record   24 bytes  key: 2 x uint64 (the first 16 bytes of sha256(teacher | shape | image))
                       label: int32
                       check: uint32 (a mix of key and label; a zero-filled or torn record fails it)

Crash safety: records are appended with one ``write`` per answered chunk under an
exclusive ``flock``; a process killed mid-append leaves a torn tail, which readers
ignore and the next writer cuts off before it appends. Records that fail their check
are skipped. Nothing is fsynced: a killed process loses nothing it wrote, a power cut
may lose the last records (they are then paid again, never answered wrongly).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

MAGIC = b"zsdb3kd-querylog/1\n".ljust(24, b"\0")
RECORD = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("label", "<i4"), ("check", "<u4")])
assert RECORD.itemsize == len(MAGIC) == 24

_MERGE_AT = 1 << 16  # recent entries kept in a dict until merged into the sorted arrays


def _check(k0: np.ndarray, k1: np.ndarray, label: np.ndarray) -> np.ndarray:
    """uint32 check of each record: a multiply-xorshift mix (an all-zero record fails it)."""
    with np.errstate(over="ignore"):
        h = k0 ^ (k1 * np.uint64(0x9E3779B97F4A7C15)) ^ label.astype(np.int64).view(np.uint64)
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
        return ((h >> np.uint64(32)).astype(np.uint32)) ^ np.uint32(0xA5A5A5A5)


class QueryLog:
    """The log at ``path`` for one teacher (``teacher_id``); created if missing.

    :meth:`keys` hashes a batch, :meth:`lookup` finds logged labels, :meth:`append`
    adds answered ones. ``hits``, ``appended`` and :meth:`stats` say what it saved.
    """

    def __init__(self, path: str | os.PathLike, teacher_id: str, input_shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._base = hashlib.sha256(b"%s\0%s\0%s\0" % (MAGIC.rstrip(b"\0"), teacher_id.encode(),
                                                         ",".join(map(str, input_shape)).encode()))
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        self.hits = self.appended = self.dropped = 0
        with self._locked():
            size = self._repair()
            records = np.fromfile(self.path, dtype=RECORD, count=(size - len(MAGIC)) // RECORD.itemsize,
                                  offset=len(MAGIC))
        good = records["check"] == _check(records["k0"], records["k1"], records["label"])
        self.dropped = int((~good).sum())
        records = records[good]
        order = np.lexsort((records["k1"], records["k0"]))
        self._k0, self._k1, self._labels = (records[f][order] for f in ("k0", "k1", "label"))
        self._recent: dict[bytes, int] = {}

    # -- file -------------------------------------------------------------------------
    def _locked(self):
        fd = self._fd

        class _Lock:
            def __enter__(self):
                fcntl.flock(fd, fcntl.LOCK_EX)

            def __exit__(self, *exc):
                fcntl.flock(fd, fcntl.LOCK_UN)

        return _Lock()

    def _repair(self) -> int:
        """Under the lock: write the header of a new file, check an old one's, cut a torn tail."""
        size = os.fstat(self._fd).st_size
        if size < len(MAGIC):
            head = os.pread(self._fd, size, 0)
            if not MAGIC.startswith(head):
                raise ValueError(f"{self.path} is not a zsdb3kd query log")
            os.ftruncate(self._fd, 0)
            os.write(self._fd, MAGIC)
            return len(MAGIC)
        if os.pread(self._fd, len(MAGIC), 0) != MAGIC:
            raise ValueError(f"{self.path} is not a zsdb3kd query log (or of another version)")
        torn = (size - len(MAGIC)) % RECORD.itemsize
        if torn:
            os.ftruncate(self._fd, size - torn)
        return size - torn

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    # -- keys and labels --------------------------------------------------------------
    def keys(self, x: torch.Tensor) -> np.ndarray:
        """``(B, 2)`` uint64 keys of a batch ``(B, ...)``: its exact float32 bytes, hashed."""
        rows = x.detach().to("cpu", torch.float32).contiguous().numpy().reshape(x.shape[0], -1)
        base = self._base
        digests = []
        for row in rows:  # hashlib per image: ~2% of a LeNet-5 forward at batch 256 (docs/server.md)
            h = base.copy()
            h.update(row)
            digests.append(h.digest()[:16])
        return np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found (B,) bool, labels (B,) int64)`` for keys from :meth:`keys` (labels -1 where not found)."""
        labels = np.full(len(keys), -1, dtype=np.int64)
        if len(self._k0):
            idx = np.minimum(np.searchsorted(self._k0, keys[:, 0]), len(self._k0) - 1)
            hit = (self._k0[idx] == keys[:, 0]) & (self._k1[idx] == keys[:, 1])
            labels[hit] = self._labels[idx[hit]]
        if self._recent:
            for i in np.flatnonzero(labels < 0):
                labels[i] = self._recent.get(keys[i].tobytes(), -1)
        found = labels >= 0
        self.hits += int(found.sum())
        return found, labels

    def append(self, keys: np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        """Add answered ``(keys, labels)``: one write, so a kill leaves at most a torn tail."""
        labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int32).reshape(-1)
        if len(labels) == 0:
            return
        rec = np.empty(len(labels), dtype=RECORD)
        rec["k0"], rec["k1"], rec["label"] = keys[:, 0], keys[:, 1], labels
        rec["check"] = _check(rec["k0"], rec["k1"], rec["label"])
        with self._locked():
            self._repair()  # another process may have died mid-append
            os.write(self._fd, rec.tobytes())
        self.appended += len(labels)
        self._recent.update(zip((k.tobytes() for k in keys), labels.tolist()))
        if len(self._recent) > max(_MERGE_AT, len(self._k0) // 4):
            self._merge()

    def _merge(self) -> None:
        keys = np.frombuffer(b"".join(self._recent), dtype="<u8").reshape(-1, 2)
        k0 = np.concatenate([self._k0, keys[:, 0]])
        k1 = np.concatenate([self._k1, keys[:, 1]])
        lab = np.concatenate([self._labels, np.fromiter(self._recent.values(), np.int32, len(self._recent))])
        order = np.lexsort((k1, k0))
        self._k0, self._k1, self._labels = k0[order], k1[order], lab[order]
        self._recent = {}

    def __len__(self) -> int:
        return len(self._k0) + len(self._recent)

    def stats(self) -> dict:
        """``path``, ``records`` (labels in the log), ``hits`` (queries it answered, i.e. saved),
        ``appended`` (records this process added) and ``dropped`` (unreadable records skipped)."""
        return {"path": str(self.path), "records": len(self), "hits": self.hits, "appended": self.appended,
                "dropped": self.dropped}
