"""Files and names: atomic writes, tagged tensor files, content keys and derived seeds.

* :func:`atomic_write` is the one way this package writes a file: into a temporary file
  in the same directory (created with the user's umask), then renamed over the target,
  so an interrupted write never leaves a half file; the temporary file is removed if the
  write fails.
* :func:`save_tagged` / :func:`load_tagged`: tensor artifacts (robustness results, pseudo
  samples, soft labels) as safetensors with a ``format`` tag and a JSON ``provenance``.
* :func:`derive_seed`: every random stream is named by ``(seed, *names)``, never by
  process state, so a resumed or sharded run draws exactly what an uninterrupted one does.
* :class:`TrainingCheckpoint`: a training loop's state part way (weights, optimiser, random
  streams), read back with ``weights_only=True`` and only by the run that wrote it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .settings import content_key

__all__ = ["atomic_write", "content_key", "derive_seed", "environment", "load_tagged", "save_tagged",
           "write_json", "write_tensors"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    Parent directories are created. The temporary file is created here with mode 0666
    minus the user's umask, and given that mode again once written (safetensors writes its
    files 0600 whatever the umask). On any exception it is removed and ``path`` is left as
    it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = tmp.stat().st_mode & 0o777  # 0666 minus the umask, read without changing the process umask
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (keys sorted), atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return Path(path)


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                  ) -> Path:
    """Tensors (moved to the CPU, made contiguous) as a safetensors file, atomically."""
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """``writer(tmp)`` writes the file, which then atomically becomes ``path``."""
    with atomic_write(path) as tmp:
        writer(tmp)
    return Path(path)


def derive_seed(seed: int, *names: Any) -> int:
    """A 56-bit seed for the random stream named ``names`` under ``seed``."""
    return int.from_bytes(hashlib.sha256(repr((int(seed), *names)).encode()).digest()[:7], "little")


def generator(seed: int, *names: Any) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *names))


def environment() -> dict[str, Any]:
    """What a result's exact numbers depend on beyond its settings and seed. PyTorch's CPU
    kernels may sum in another order with another number of threads or another instruction
    set (``cpu_capability``: the vector kernels PyTorch chose, e.g. AVX2 or AVX512), so a rerun
    reproduces the numbers bit for bit only with the same versions, device type, instruction
    set and thread count."""
    from . import __version__

    return {"zsdb3kd": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def save_tagged(path: str | os.PathLike, tensors: dict[str, torch.Tensor], fmt: str,
                provenance: dict[str, Any] | None = None, **metadata: str) -> Path:
    """Write ``tensors`` to ``path`` with metadata ``format=fmt`` and ``provenance`` (JSON).

    :func:`environment` is recorded under ``provenance["environment"]`` unless already there;
    the dict is updated in place, so the saved object and the file agree."""
    provenance = {} if provenance is None else provenance
    provenance.setdefault("environment", environment())
    meta = {"format": fmt, "provenance": json.dumps(provenance, sort_keys=True, default=str), **metadata}
    return write_tensors(path, tensors, meta)


def load_tagged(path: str | os.PathLike, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tagged`; ``what`` names it in errors.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unreadable one
    or one of another format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable {what} file: {e}") from e
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a zsdb3kd {what} file (format={meta.get('format')!r})")
    return tensors, json.loads(meta.get("provenance", "{}"))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (``ValueError`` naming the file if it is unreadable)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise ValueError(f"{path} is not a readable tensor file ({e}); delete it to recompute") from None


CHECKPOINT_FORMAT = "zsdb3kd-train-checkpoint/1"


class TrainingCheckpoint:
    """The training state file: written atomically, read with ``weights_only=True`` (tensors
    and plain containers, never code), and refused if it was written for another run."""

    def __init__(self, path: str | os.PathLike | None, identity: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.identity = identity

    def load(self) -> dict[str, Any]:
        try:
            st = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same actionable message
            # torch's own text is left out: it suggests loading the file with code execution allowed
            raise ValueError(f"cannot read the training checkpoint {self.path} (a damaged file, or not one of "
                             f"ours: {type(e).__name__}); delete it to train from the start") from None
        if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path} is not a zsdb3kd training checkpoint; delete it to train from the start")
        if st.get("identity") != self.identity:
            raise ValueError(f"the training checkpoint {self.path} was written for other settings, data or model; "
                             "delete it to train from the start")
        return st["state"]

    def save(self, state: dict[str, Any]) -> None:
        assert self.path is not None
        with atomic_write(self.path) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "identity": self.identity, "state": state}, tmp)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

