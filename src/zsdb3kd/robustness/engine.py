"""Sample robustness for a whole set of samples: chunked, resumable, shareable, with provenance.

:func:`compute_robustness` labels each sample with the teacher (1 query per sample), then
for every *other* class ``t`` runs the chosen estimator on the pair (sample, ``t``),
relative to the teacher's own label (never against the teacher's own class). Pairs of
``chunk_size`` samples are searched together, all targets at once.

Each finished chunk is written to the work directory at once, so an interrupted run (even
``kill -9``) resumes from its finished chunks; by default a chunk is about a minute of
queries, so an interruption loses at most about that. Chunk ``i`` always uses the random
seed ``(seed, i)``, so a resumed, shared or ``torchrun``-sharded run equals an
uninterrupted one (see :mod:`zsdb3kd.parallel`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..oracle import LabelOracle
from ..parallel import WorkDirectoryRemoved, all_gather, is_main, pool_budget, prepare_work_dir, run_chunks, world
from ..progress import QueryProgress
from ..settings import Settings
from ..store import generator
from .estimators import BoundaryDistance, Estimator, create_estimator, parse_method
from .result import RobustnessResult
from .search import CandidatePool
from .tracker import PairTracker

log = logging.getLogger("zsdb3kd")

#: the released code's budgets at which MBD distances are recorded
PAPER_CHECKPOINTS = (1000, 2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000, 18000, 20000)
#: a default chunk holds about this many queries: about a minute of a LeNet-5 on two cores
CHUNK_QUERIES = 400_000
#: on a GPU, about 20 s of a LeNet-5 on an H200 (1.8M queries/s in chunks of 2,048 samples,
#: 0.24M in chunks of 88: the search's host work per step is paid once for the whole chunk)
GPU_CHUNK_QUERIES = 40_000_000


class SearchFields(Settings):
    """Boundary distances: how each (sample, target) pair is searched."""

    queries_per_pair: int = Field(1000, ge=1, description="the most queries one (sample, target) pair may cost")
    checkpoints: tuple[int, ...] = Field((250, 500, 1000), description="queries per pair at which distances are "
                                                                        "recorded, so one run gives the whole curve")
    chunk_size: int | None = Field(None, ge=1, description="samples searched together and saved as one resumable "
                                                           "chunk (default: about a minute of queries)")
    allocation: Literal["uniform", "nearest"] = Field(
        "uniform", description="nearest: rank the targets with rank_fraction of the budget, then give the rest to "
                               "each sample's top_k nearest targets (iterative methods only)")
    rank_fraction: float = Field(0.25, gt=0, lt=1, description="allocation nearest: share of the budget that ranks")
    top_k: int = Field(3, ge=1, description="allocation nearest: targets refined per sample")

    @field_validator("checkpoints")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in v):
            raise ValueError("checkpoints must be positive")
        return tuple(sorted(set(v)))


class RobustnessSettings(SearchFields):
    """Boundary distances: how each (sample, target) pair is searched."""

    method: str = Field("hybrid", description="estimator and its options: sd, bd, mbd (the paper's), hsja, "
                                              "hsja-sub, hsja-sub-circle, hybrid; e.g. 'hybrid:reuse=0.5'")
    seed: int = Field(0, description="random seed")

    @field_validator("method")
    @classmethod
    def _estimator_exists(cls, v: str) -> str:
        create_estimator(v)
        return v

    @model_validator(mode="after")
    def _allocation_fits(self) -> "RobustnessSettings":
        if self.allocation == "nearest" and not self.estimator().iterative:
            raise ValueError(f"allocation 'nearest' needs an iterative method (mbd, hsja, hybrid...), not {self.method!r}")
        return self

    @property
    def name(self) -> str:
        """The estimator's name without options."""
        return parse_method(self.method)[0]

    def estimator(self) -> Estimator:
        return create_estimator(self.method)

    @property
    def all_checkpoints(self) -> tuple[int, ...]:
        if self.allocation == "nearest":  # per-pair budgets differ; only the final average is defined
            return (self.queries_per_pair,)
        return tuple(sorted({c for c in self.checkpoints if c <= self.queries_per_pair} | {self.queries_per_pair}))

    def per_pair(self) -> int:
        """The most queries one pair can cost (0 for SD)."""
        return self.estimator().max_queries_per_pair(self.queries_per_pair)

    def max_queries(self, n_samples: int, num_classes: int) -> int:
        """The most queries a fresh run on ``n_samples`` can make (labels included)."""
        return n_samples * (1 + (num_classes - 1) * self.per_pair())

    def resolve(self, num_classes: int, device: str | torch.device = "cpu") -> "RobustnessSettings":
        """These settings with the chunk size fixed (it decides the random streams): by default
        about a minute of queries on the CPU, about 20 s (and far more samples) on a GPU."""
        if self.chunk_size is not None:
            return self
        per_sample = 1 + (num_classes - 1) * self.per_pair()
        if torch.device(device).type == "cuda":
            return self.replace(chunk_size=max(8, min(4096, GPU_CHUNK_QUERIES // per_sample)))
        return self.replace(chunk_size=max(8, min(512, CHUNK_QUERIES // per_sample)))


def robustness_chunk(oracle: LabelOracle, x: torch.Tensor, settings: RobustnessSettings, pool: CandidatePool | None,
                     gen: torch.Generator, estimator: Estimator | None = None, on_query=None) -> dict[str, torch.Tensor]:
    """Distances for one chunk of samples ``x`` ``(n, C, H, W)`` to every other class."""
    n, K = x.shape[0], oracle.num_classes
    est = estimator if estimator is not None else settings.estimator()
    labels = oracle(x)  # the teacher's own labels: 1 query per sample
    if on_query is not None:
        on_query(n)
    src = labels.repeat_interleave(K - 1)
    tgt = (src + torch.arange(1, K, device=x.device).repeat(n)) % K  # every class except the teacher's own
    rows = torch.arange(n, device=x.device).repeat_interleave(K - 1)
    if settings.allocation == "nearest":
        queries, best = _allocate_nearest(oracle, x[rows], src, tgt, n, K, settings, est, pool, gen, on_query)
        best = best[:, None]
    else:
        tracker = PairTracker(oracle, x[rows], src, tgt, settings.queries_per_pair, settings.all_checkpoints,
                              on_query)
        est(tracker, pool, gen)
        queries, best = tracker.queries, tracker.at
    dist = torch.full((n, K, best.shape[1]), float("nan"))
    dist[rows.cpu(), tgt.cpu()] = best.cpu()
    q = torch.zeros(n, K, dtype=torch.long)
    q[rows.cpu(), tgt.cpu()] = queries.cpu()
    return {"distances": dist, "queries": q, "teacher_labels": labels.cpu()}


def _allocate_nearest(oracle, x0, src, tgt, n, K, settings, est, pool, gen, on_query):
    """Rank every target with a small budget, then spend the rest on each sample's nearest ones."""
    budget = settings.queries_per_pair
    b1 = max(1, int(budget * settings.rank_fraction))
    k = min(settings.top_k, K - 1)
    extra = (K - 1) * (budget - b1)  # per sample
    tracker = PairTracker(oracle, x0, src, tgt, b1, (b1 + (extra + k - 1) // k,), on_query)
    first = est(tracker, pool, gen)
    d = tracker.best.view(n, K - 1)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]  # nearest targets first (inf last)
    rows = (order + torch.arange(n, device=d.device)[:, None] * (K - 1)).reshape(-1)
    share = torch.full((n, k), extra // k, dtype=torch.long)
    share[:, : extra % k] += 1  # the remainder goes to the nearest, so no query of the sample's total is lost
    sub = tracker.subset(rows, b1 + share.reshape(-1).to(rows.device))
    cont = copy.copy(est)
    cont.init = BoundaryDistance(n=1, tol=1e-5, warm=first.theta[rows], warm_len=first.lam[rows])
    cont(sub, None, gen)
    tracker.merge(rows, sub)
    return tracker.queries, tracker.best


def compute_robustness(
    oracle: LabelOracle,
    x: torch.Tensor,
    settings: RobustnessSettings | None = None,
    *,
    estimator: str | Estimator | None = None,
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
        estimator: an estimator object (or method spec) used instead of ``settings.method``,
            e.g. one a benchmark built itself; it is recorded by its ``repr``.
        pool: images grouped by class for SD/BD/MBD initial directions.
        indices: ``(N,)`` positions of ``x`` in its dataset (recorded in the output).
        work_dir: where finished chunks are kept for resuming (``None``: no resume).
        provenance: extra fields recorded in the result (teacher hash, dataset, ...).
    """
    settings = (settings or RobustnessSettings()).resolve(oracle.num_classes, x.device)
    est = create_estimator(estimator) if estimator is not None else settings.estimator()
    N = x.shape[0]
    if tuple(x.shape[1:]) != oracle.input_shape:
        raise ValueError(f"samples have shape {tuple(x.shape[1:])}, the teacher expects {oracle.input_shape}")
    indices = torch.arange(N) if indices is None else indices
    key = settings.key() if estimator is None else hashlib.sha256(f"{settings.key()}{est!r}".encode()).hexdigest()[:16]
    parts = None
    if work_dir is not None:
        parts = prepare_work_dir(work_dir, {"key": key, "settings": settings.model_dump(mode="json"), "n": N,
                                            "indices_sha": hashlib.sha256(indices.cpu().numpy().tobytes()).hexdigest()},
                                 "robustness chunks")
    cs = settings.chunk_size
    n_chunks = (N + cs - 1) // cs
    q_before, t0 = oracle.queries, time.perf_counter()
    per_sample = 1 + (oracle.num_classes - 1) * est.max_queries_per_pair(settings.queries_per_pair)

    def need(chunks: list[int]) -> int:
        """The most queries ``chunks`` can cost."""
        return sum(min(N, (c + 1) * cs) - c * cs for c in chunks) * per_sample

    with QueryProgress(N, f"robustness[{settings.name}]", enabled=progress) as bar:
        def compute(c: int) -> dict[str, torch.Tensor]:
            sl = slice(c * cs, min(N, (c + 1) * cs))
            return robustness_chunk(oracle, x[sl], settings, pool, generator(settings.seed, "robustness-chunk", c),
                                    est, on_query=bar.queries)

        def before(mine: list[int]) -> None:
            bar.max_queries = need(mine)
            pool_budget(oracle, need(mine))  # torchrun: the ranks' budgets follow the work each was dealt

        chunks, report = run_chunks(n_chunks, compute, parts, before=before,
                                    on_chunk=lambda c, t, reused: bar.advance(len(t["teacher_labels"])))
    wall = time.perf_counter() - t0
    cat = {k: torch.cat([r[k] for r in chunks]) for k in chunks[0]}
    reused_queries = sum(int(chunks[c]["queries"].sum()) + len(chunks[c]["teacher_labels"]) for c in report.reused)
    per_rank = all_gather(oracle.queries - q_before)  # what each torchrun rank paid ([this process] otherwise)
    spent = sum(per_rank)
    if report.reused:
        log.info(f"robustness[{settings.name}]: reused {len(report.reused)} of {n_chunks} finished chunks "
                 f"({reused_queries:,} queries not paid again); paid {spent:,} new queries")
    prov = dict(provenance or {})
    prov.update(settings=settings.model_dump(mode="json"), settings_key=key, estimator=repr(est), n_samples=N,
                label_queries=N, pair_queries=int(cat["queries"].sum()), total_queries=int(cat["queries"].sum()) + N,
                queries_this_session=spent, queries_reused_from_chunks=reused_queries,
                chunks_reused=len(report.reused), chunks_computed=n_chunks - len(report.reused), ranks=world()[1],
                wall_time_s=round(wall, 3), queries_per_s=round(spent / max(wall, 1e-9), 1))
    if world()[1] > 1:
        prov["queries_per_rank"] = per_rank
    return RobustnessResult(distances=cat["distances"], queries=cat["queries"], teacher_labels=cat["teacher_labels"],
                            indices=indices.cpu().long(), checkpoints=torch.tensor(settings.all_checkpoints),
                            provenance=prov)


def compute_to_file(out: str | os.PathLike, oracle: LabelOracle, x: torch.Tensor, settings: RobustnessSettings,
                    **kwargs) -> RobustnessResult:
    """:func:`compute_robustness` into the file ``out``, with its finished chunks kept in
    ``<out>.parts`` until the result is saved: an interrupted run resumes, and several
    workers (processes running the same command, or torchrun ranks) share the work. The
    result is saved once (by the worker that finishes last, or rank 0, once every rank has
    read every chunk) and the chunks are removed; a worker still waiting then loads the
    saved result."""
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    try:
        res = compute_robustness(oracle, x, settings, work_dir=parts, **kwargs)
    except WorkDirectoryRemoved:
        if not out.is_file():
            raise
        return RobustnessResult.load(out)
    if is_main():  # under torchrun run_chunks returned after its last barrier: nobody reads the chunks any more
        res.save(out)
        shutil.rmtree(parts, ignore_errors=True)
    return res
