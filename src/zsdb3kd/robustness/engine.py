"""Sample robustness for a whole set of samples: chunked, resumable, with provenance.

:func:`compute_robustness` labels each sample with the teacher (1 query per sample), then
for every *other* class ``t`` runs the chosen estimator on the pair (sample, ``t``),
relative to the teacher's own label (METHOD.md section 8: never against the teacher's
own class). Pairs of ``chunk_size`` samples are searched together, all targets at once.

Each finished chunk is written to ``<out>.parts/`` at once, so an interrupted run (even
``kill -9``) resumes from the last finished chunk; chunk ``i`` always uses the random
seed ``(seed, i)``, so a resumed run equals an uninterrupted one. Workers claim chunks
with lock files, so several processes (or machines sharing the directory) can work on one
run at once; each then waits for the others' chunks and writes the same result. The result file holds
the distances at every checkpoint budget, the queries per pair and the provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import load_tagged, save_tagged
from ..oracle import LabelOracle
from ..progress import QueryProgress
from .estimators import (
    ESTIMATORS, BoundaryDistance, CandidatePool, Capped, Estimator, HopSkipJump, SampleDistance, SignOPT,
)
from .tracker import PairTracker

PAPER_CHECKPOINTS = (1000, 2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000, 18000, 20000)


@dataclass(frozen=True)
class RobustnessSettings:
    """What to compute. ``method`` names a preset of :data:`PRESETS`; ``options`` override
    its estimator arguments; ``budget`` is per (sample, target) pair."""

    method: str = "mbd"
    budget: int = 20000
    checkpoints: tuple[int, ...] = PAPER_CHECKPOINTS
    seed: int = 0
    chunk_size: int = 128
    options: dict[str, Any] = field(default_factory=dict)
    #: "uniform": every pair gets ``budget``. "nearest": every pair first gets
    #: ``rank_fraction * budget`` to rank the targets, then the queries left of the sample's
    #: ``(K - 1) * budget`` go to its ``top_k`` nearest targets (the soft label is dominated
    #: by them, z_t = 1 / d_t). ``budget`` stays the average per pair.
    allocation: str = "uniform"
    rank_fraction: float = 0.25
    top_k: int = 3

    def __post_init__(self) -> None:
        if self.method not in PRESETS:
            raise ValueError(f"unknown robustness method {self.method!r}; known: {', '.join(sorted(PRESETS))}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 query per pair, got {self.budget}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if any(c < 1 for c in self.checkpoints):
            raise ValueError(f"checkpoints must be positive, got {self.checkpoints}")
        try:
            est = self.estimator()
        except TypeError as e:
            raise ValueError(f"invalid options {self.options} for method {self.method!r}: {e}") from None
        if self.allocation not in ("uniform", "nearest"):
            raise ValueError(f"allocation must be 'uniform' or 'nearest', got {self.allocation!r}")
        if self.allocation == "nearest":
            if not hasattr(est, "init"):
                raise ValueError(f"allocation 'nearest' needs an iterative method (mbd, hsja), not {self.method!r}")
            if not 0 < self.rank_fraction < 1 or self.top_k < 1:
                raise ValueError("allocation 'nearest' needs 0 < rank_fraction < 1 and top_k >= 1")

    @property
    def all_checkpoints(self) -> tuple[int, ...]:
        if self.allocation == "nearest":  # per-pair budgets differ; only the final average is defined
            return (self.budget,)
        return tuple(sorted({c for c in self.checkpoints if c <= self.budget} | {self.budget}))

    def estimator(self) -> Estimator:
        return PRESETS[self.method](**self.options)

    def key(self) -> str:
        """Content hash of everything that changes the numbers."""
        fields_ = asdict(self)
        if self.allocation == "uniform":  # keys of uniform runs predate the allocation fields
            for k in ("allocation", "rank_fraction", "top_k"):
                fields_.pop(k)
        blob = json.dumps(fields_, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _paper_mbd(n_dirs: int = 201, tol: float = 1e-5, **kw: Any) -> Estimator:
    return SignOPT(init=BoundaryDistance(n=n_dirs, tol=tol), **kw)


def _hsja(n_dirs: int = 20, init_tol: float = 1e-3, **kw: Any) -> Estimator:
    return HopSkipJump(init=BoundaryDistance(n=n_dirs, tol=init_tol), **kw)


def _hsja_sub(n_dirs: int = 20, init_tol: float = 1e-3, subspace: int = 2, subspace_queries: int | None = 1000,
              **kw: Any) -> Estimator:
    return HopSkipJump(init=BoundaryDistance(n=n_dirs, tol=init_tol), subspace=subspace,
                       subspace_queries=subspace_queries, **kw)


def _hsja_sub_circle(**kw: Any) -> Estimator:
    return _hsja_sub(update="circle", **kw)


def _hybrid(switch: int = 1000, k: int = 100, alpha: float = 0.2, beta: float = 0.01, reuse: float = 0.0,
            **kw: Any) -> Estimator:
    return SignOPT(init=Capped(_hsja_sub_circle(**kw), switch), k=k, alpha=alpha, beta=beta, reuse=reuse)


#: Named estimator presets: ``sd``/``bd``/``mbd`` are the paper's released settings;
#: ``hsja`` is our query-efficient HopSkipJump-style search, ``hsja-sub`` the same with
#: low-frequency probes for the first 1,000 queries of each pair, and ``hsja-sub-circle``
#: that with the half-circle update instead of the step search; ``hybrid`` runs
#: ``hsja-sub-circle`` for each pair's first 1,000 queries, then Sign-OPT (100 probes,
#: beta 0.01) from where it stopped (the most query-efficient from 1,000 queries on).
PRESETS: dict[str, Any] = {
    "sd": SampleDistance,
    "bd": BoundaryDistance,
    "mbd": _paper_mbd,
    "hsja": _hsja,
    "hsja-sub": _hsja_sub,
    "hsja-sub-circle": _hsja_sub_circle,
    "hybrid": _hybrid,
}


@dataclass
class RobustnessResult:
    """Distances of ``N`` samples to each of ``K`` classes.

    ``distances``: ``(N, K, B)`` best L2 distance within each checkpoint budget
    (``nan`` for the sample's own class, ``inf`` where no boundary point was found);
    ``queries``: ``(N, K)`` queries spent per pair; ``teacher_labels``: ``(N,)``;
    ``indices``: ``(N,)`` positions in the source dataset; ``checkpoints``: ``(B,)``.
    """

    distances: torch.Tensor
    queries: torch.Tensor
    teacher_labels: torch.Tensor
    indices: torch.Tensor
    checkpoints: torch.Tensor
    provenance: dict[str, Any]

    def at(self, budget: int) -> torch.Tensor:
        """``(N, K)`` distances at the largest checkpoint ``<= budget``."""
        ok = torch.nonzero(self.checkpoints <= budget).squeeze(1)
        if ok.numel() == 0:
            raise ValueError(f"no checkpoint <= {budget}; checkpoints are {self.checkpoints.tolist()}")
        return self.distances[:, :, int(ok[-1])]

    @property
    def total_queries(self) -> int:
        return int(self.provenance.get("total_queries", int(self.queries.sum()) + len(self.indices)))

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {k: getattr(self, k) for k in ("distances", "queries", "teacher_labels", "indices", "checkpoints")}
        return save_tagged(path, tensors, "zsdb3kd-robustness", self.provenance)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RobustnessResult":
        tensors, provenance = load_tagged(path, "zsdb3kd-robustness", "robustness")
        return cls(provenance=provenance, **tensors)


def _lock_path(part: Path) -> Path:
    return part.with_name(part.name + ".lock")


def _claim(part: Path, _retry: bool = True) -> bool:
    """Claim a chunk for this process with an exclusive lock file (``pid host``), so several
    workers can share one work directory. A lock left by a dead process on this host (e.g.
    after ``kill -9``) is taken over."""
    lock = _lock_path(part)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            pid_s, host = lock.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            return False  # being written right now: treat as live
        if host == socket.gethostname() and not _alive(pid) and _retry:
            lock.unlink(missing_ok=True)
            return _claim(part, _retry=False)
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}")
    return True


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own stale lock (an earlier attempt in this process failed)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}".encode()).digest()[:7], "little")


def robustness_chunk(
    oracle: LabelOracle,
    x: torch.Tensor,
    settings: RobustnessSettings,
    pool: CandidatePool | None,
    generator: torch.Generator,
    on_query=None,
) -> dict[str, torch.Tensor]:
    """Distances for one chunk of samples ``x`` ``(n, C, H, W)`` to every other class."""
    n = x.shape[0]
    K = oracle.num_classes
    labels = oracle(x)  # the teacher's own labels: 1 query per sample
    if on_query is not None:
        on_query(n)
    src = labels.repeat_interleave(K - 1)
    offs = torch.arange(1, K, device=x.device).repeat(n)
    tgt = (src + offs) % K  # every class except the teacher's own
    rows = torch.arange(n, device=x.device).repeat_interleave(K - 1)
    if settings.allocation == "nearest":
        at = _allocate_nearest(oracle, x[rows], src, tgt, n, K, settings, pool, generator, on_query)
        queries = at.pop("queries")
        best = at.pop("best")[:, None]
    else:
        tracker = PairTracker(oracle, x[rows], src, tgt, settings.budget, settings.all_checkpoints, on_query)
        settings.estimator()(tracker, pool, generator)
        queries, best = tracker.queries, tracker.at
    B = best.shape[1]
    dist = torch.full((n, K, B), float("nan"))
    dist[rows.cpu(), tgt.cpu()] = best.cpu()
    q = torch.zeros(n, K, dtype=torch.long)
    q[rows.cpu(), tgt.cpu()] = queries.cpu()
    return {"distances": dist, "queries": q, "teacher_labels": labels.cpu()}


def _allocate_nearest(oracle, x0, src, tgt, n, K, settings, pool, generator, on_query) -> dict[str, torch.Tensor]:
    """Rank every target with a small budget, then spend the rest on each sample's nearest ones."""
    import copy

    b1 = max(1, int(settings.budget * settings.rank_fraction))
    k = min(settings.top_k, K - 1)
    extra = (K - 1) * (settings.budget - b1)  # per sample
    top_limit = b1 + (extra + k - 1) // k
    tracker = PairTracker(oracle, x0, src, tgt, b1, (top_limit,), on_query)
    est = settings.estimator()
    first = est(tracker, pool, generator)
    d = tracker.best.view(n, K - 1)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]  # nearest targets first (inf last)
    rows = (order + torch.arange(n, device=d.device)[:, None] * (K - 1)).reshape(-1)
    share = torch.full((n, k), extra // k, dtype=torch.long)
    share[:, : extra % k] += 1  # the remainder goes to the nearest, so no query of the sample's total is lost
    limit = b1 + share.reshape(-1).to(rows.device)
    sub = tracker.subset(rows, limit)
    cont = copy.copy(est)
    cont.init = BoundaryDistance(n=1, tol=1e-5, warm=first.theta[rows], warm_len=first.lam[rows])
    cont(sub, None, generator)
    tracker.merge(rows, sub)
    return {"queries": tracker.queries, "best": tracker.best}


def compute_robustness(
    oracle: LabelOracle,
    x: torch.Tensor,
    settings: RobustnessSettings,
    *,
    pool: CandidatePool | None = None,
    indices: torch.Tensor | None = None,
    work_dir: str | os.PathLike | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> RobustnessResult:
    """Boundary distances of every sample in ``x`` (``(N, C, H, W)``) to every other class.

    Args:
        oracle: the label-only teacher.
        x: samples, on the device the search should run on.
        settings: method, per-pair budget, checkpoints, seed, chunk size.
        pool: images grouped by class for SD/BD/MBD initial directions.
        indices: ``(N,)`` positions of ``x`` in its dataset (recorded in the output).
        work_dir: where finished chunks are kept for resuming (``None``: no resume).
        provenance: extra fields recorded in the result (teacher hash, dataset, ...).
    """
    N = x.shape[0]
    if tuple(x.shape[1:]) != oracle.input_shape:
        raise ValueError(f"samples have shape {tuple(x.shape[1:])}, the teacher expects {oracle.input_shape}")
    if indices is None:
        indices = torch.arange(N)
    key = settings.key()
    parts = Path(work_dir) if work_dir is not None else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
        stamp = parts / "settings.json"
        info = {"key": key, "settings": asdict(settings), "n": N,
                "indices_sha": hashlib.sha256(indices.cpu().numpy().tobytes()).hexdigest()}
        if stamp.exists():
            old = json.loads(stamp.read_text())
            if old.get("key") != key or old.get("indices_sha") != info["indices_sha"]:
                raise ValueError(
                    f"{parts} holds chunks of a different run (other settings or samples); "
                    "delete it or choose another output path"
                )
        else:
            stamp.write_text(json.dumps(info, indent=1, default=str))
    n_chunks = (N + settings.chunk_size - 1) // settings.chunk_size
    done: dict[int, dict[str, torch.Tensor]] = {}
    q_before = oracle.queries
    reused_queries = 0
    t0 = time.perf_counter()
    pending = sum(1 for c in range(n_chunks)
                  if parts is None or not (parts / f"chunk-{c:05d}.safetensors").exists())
    bound = min(N, pending * settings.chunk_size) * ((oracle.num_classes - 1) * settings.budget + 1)
    with QueryProgress(N, f"robustness[{settings.method}]", enabled=progress, max_queries=bound) as bar:
        todo = list(range(n_chunks))
        while todo:
            waiting = []
            for c in todo:
                sl = slice(c * settings.chunk_size, min(N, (c + 1) * settings.chunk_size))
                part = parts / f"chunk-{c:05d}.safetensors" if parts is not None else None
                if part is not None and part.exists():
                    try:
                        done[c] = load_file(str(part))
                    except FileNotFoundError:
                        if parts.is_dir():
                            raise
                        raise WorkDirectoryRemoved(parts) from None
                    reused_queries += int(done[c]["queries"].sum()) + (sl.stop - sl.start)
                    bar.advance(sl.stop - sl.start)
                    continue
                if part is not None and not _claim(part):
                    waiting.append(c)  # another live worker is computing it
                    continue
                gen = torch.Generator().manual_seed(_chunk_seed(settings.seed, c))
                try:
                    done[c] = robustness_chunk(oracle, x[sl], settings, pool, gen, on_query=bar.queries)
                    if part is not None:
                        tmp = part.with_name(part.name + ".tmp")
                        save_file({k: v.contiguous() for k, v in done[c].items()}, str(tmp))
                        os.replace(tmp, part)
                finally:
                    if part is not None:
                        _lock_path(part).unlink(missing_ok=True)
                bar.advance(sl.stop - sl.start)
            todo = waiting
            if todo:
                time.sleep(2.0)
                if not parts.is_dir():
                    raise WorkDirectoryRemoved(parts)
    results = [done[c] for c in range(n_chunks)]
    wall = time.perf_counter() - t0
    cat = {k: torch.cat([r[k] for r in results]) for k in results[0]} if results else {}
    spent = oracle.queries - q_before
    prov = dict(provenance or {})
    prov.update(
        settings=asdict(settings),
        settings_key=key,
        estimator=repr(settings.estimator()),
        n_samples=N,
        label_queries=N,
        pair_queries=int(cat["queries"].sum()),
        total_queries=int(cat["queries"].sum()) + N,
        queries_this_session=spent,
        queries_reused_from_chunks=reused_queries,
        wall_time_s=round(wall, 3),
        queries_per_s=round(spent / max(wall, 1e-9), 1),
    )
    prov = json.loads(json.dumps(prov, default=str))  # plain JSON types, as after a save/load
    return RobustnessResult(
        distances=cat["distances"],
        queries=cat["queries"],
        teacher_labels=cat["teacher_labels"],
        indices=indices.cpu().long(),
        checkpoints=torch.tensor(settings.all_checkpoints, dtype=torch.long),
        provenance=prov,
    )


def cleanup_parts(work_dir: str | os.PathLike) -> None:
    """Remove a finished run's chunk directory."""
    shutil.rmtree(work_dir, ignore_errors=True)


class WorkDirectoryRemoved(RuntimeError):
    """The work directory vanished while this worker waited for other workers' chunks:
    normally another worker finished the run, saved the result and cleaned up."""

    def __init__(self, parts: Path) -> None:
        super().__init__(f"work directory {parts} was removed while waiting for other workers' chunks "
                         "(did another worker finish and write the result?)")
        self.parts = parts


def compute_to_file(out: str | os.PathLike, oracle: LabelOracle, x: torch.Tensor, settings: RobustnessSettings,
                    **kwargs) -> RobustnessResult:
    """:func:`compute_robustness` into the file ``out``, with its finished chunks kept in
    ``<out>.parts`` until the result is saved: an interrupted run resumes, and several
    workers (processes running the same command) share the work. The worker that finishes
    last saves the result and removes the chunks; a worker still waiting then loads the saved
    result instead of failing."""
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    try:
        res = compute_robustness(oracle, x, settings, work_dir=parts, **kwargs)
    except WorkDirectoryRemoved:
        if not out.is_file():
            raise
        return RobustnessResult.load(out)
    res.save(out)
    cleanup_parts(parts)
    return res
