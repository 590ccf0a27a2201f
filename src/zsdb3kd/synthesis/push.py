"""Zero-shot pseudo samples from noise (ZSDB3KD, arXiv 2106.03310 section 3.4).

No real data is read anywhere in this module: its only inputs are the label-only oracle
and settings. Two stages:

1. **Noise the teacher calls c** (rejection sampling): batches of noise (:func:`draw_noise`)
   are labelled, and each class keeps the first ``per_class`` samples it receives. A class
   never hit within ``noise_queries`` queries is an error that reports every class's count.
   Computed once (under torchrun by rank 0; the others read it) and kept for resuming.
2. **Push away from every boundary**: for ``iterations`` rounds, the untargeted minimal
   boundary direction ``theta*`` of every sample is estimated (HSJA or Sign-OPT from random
   directions, warm-started from the last round's ``theta*``), and the sample moves
   ``x <- clip(x - lam * theta*, 0, 1)``; if the teacher would no longer answer ``c``, that
   sample's ``lam`` is halved and the move retried. The mean untargeted distance per round
   is logged (it should grow).

A sample's trajectory depends on its own chunk only: the samples are cut into chunks of
``chunk_size`` (about a minute of queries by default), and chunk ``j`` runs every round
with the random streams ``(seed, round, j)``, then a final measurement with ``(seed,
"final", j)``. Chunks are sharded and kept by :func:`zsdb3kd.parallel.run_chunks`, so the
merged result is the same bits for any number of ``torchrun`` ranks, and a rerun resumes
from the finished chunks; a chunk in progress keeps its last finished round (saved every
``SAVE_EVERY`` seconds and when interrupted), so an interruption loses little.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..oracle import LabelOracle
from ..parallel import all_gather, broadcast, is_main, pool_budget, prepare_work_dir, run_chunks, world
from ..progress import QueryProgress
from ..robustness.estimators import BoundaryDistance, HopSkipJump, SignOPT
from ..robustness.tracker import UNTARGETED, PairTracker
from ..settings import Settings
from ..store import generator, load_tagged, read_tensors, save_tagged, write_tensors
from .noise import draw_noise

log = logging.getLogger("zsdb3kd")

#: a default chunk holds about this many queries (as robustness chunks: about a minute of a LeNet-5 on two cores)
CHUNK_QUERIES = 400_000
#: a chunk in progress saves its last finished round at most this often (and when interrupted)
SAVE_EVERY = 30.0


class SynthesisError(RuntimeError):
    """Synthesis could not produce the requested samples (e.g. a class the noise never hits)."""




class SynthesisFields(Settings):
    """Synthesis: zero-shot pseudo samples pushed away from the teacher's boundaries (ZSDB3KD)."""

    per_class: int = Field(200, ge=1, description="pseudo samples per class")
    iterations: int = Field(10, ge=0, description="rounds of boundary pushing")
    snapshots: tuple[int, ...] = Field((0, 2, 5, 10), description="rounds whose samples are kept for the report")
    step: float = Field(0.5, gt=0, description="L2 step away from the nearest boundary")
    max_halvings: int = Field(4, ge=0, description="halvings of a step that would change the teacher's label")
    noise: Literal["paper", "smooth", "mixed"] = Field(
        "mixed", description="starting noise: the released formula, low-frequency blobs, or half each")
    noise_batch: int = Field(2000, ge=1, description="noise images labelled at once")
    noise_queries: int = Field(2_000_000, ge=1, description="the most queries the noise stage may spend")
    queries_per_search: int = Field(300, ge=2, description="queries per sample per round for its untargeted direction")
    search_dirs: int = Field(4, ge=1, description="random initial directions per search (plus the warm start)")
    search_k: int = Field(40, ge=1, description="probes per gradient estimate (Sign-OPT k, HSJA n0)")
    search: Literal["hsja", "signopt"] = Field("hsja", description="untargeted estimator (signopt: the paper's)")
    first_round_factor: int = Field(3, ge=1, description="round 0 has no warm start: its search gets this many "
                                                         "times the queries")
    chunk_size: int | None = Field(None, ge=1, description="samples pushed together and saved as one resumable chunk "
                                                           "(default: about a minute of queries); with the seed it "
                                                           "decides the random streams")

    @model_validator(mode="after")
    def _search_fits(self) -> "SynthesisSettings":
        if self.queries_per_search < self.search_k + 1:
            raise ValueError(f"queries_per_search ({self.queries_per_search}) must exceed search_k ({self.search_k})")
        return self

    def per_sample_queries(self) -> int:
        """The most queries pushing one sample can cost (every round's search and moves, the final search)."""
        rounds = [self.queries_per_search * (self.first_round_factor if i == 0 else 1) for i in range(self.iterations)]
        final = self.queries_per_search * (1 if self.iterations > 0 else self.first_round_factor)
        return sum(rounds) + self.iterations * (self.max_halvings + 1) + final

    def max_queries(self, num_classes: int) -> int:
        """The most queries a fresh run can make (noise, every round's searches and moves, the final search)."""
        return self.noise_queries + self.per_class * num_classes * self.per_sample_queries()

    def resolve(self) -> "SynthesisFields":
        """These settings with the chunk size fixed (it decides the random streams)."""
        if self.chunk_size is not None:
            return self
        return self.replace(chunk_size=max(8, min(512, CHUNK_QUERIES // self.per_sample_queries())))


class SynthesisSettings(SynthesisFields):
    """Synthesis: zero-shot pseudo samples pushed away from the teacher's boundaries (ZSDB3KD)."""

    seed: int = Field(0, description="random seed")


@dataclass
class PseudoSamples:
    """``x`` ``(N, C, H, W)`` pseudo samples, ``y`` ``(N,)`` the teacher's label of each,
    ``snapshots`` iteration -> ``x`` at that iteration, ``mean_distance`` ``(iterations + 1,)``
    mean untargeted boundary distance before each move (index 0: the raw noise)."""

    x: torch.Tensor
    y: torch.Tensor
    snapshots: dict[int, torch.Tensor]
    mean_distance: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"x": self.x, "y": self.y, "mean_distance": self.mean_distance}
        tensors.update({f"snapshot_{i}": s for i, s in self.snapshots.items()})
        return save_tagged(path, tensors, "zsdb3kd-pseudo-samples", self.provenance)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PseudoSamples":
        t, provenance = load_tagged(path, "zsdb3kd-pseudo-samples", "pseudo-sample")
        snaps = {int(k.split("_")[1]): v for k, v in t.items() if k.startswith("snapshot_")}
        return cls(t["x"], t["y"], dict(sorted(snaps.items())), t["mean_distance"], provenance)



def sample_class_noise(oracle: LabelOracle, settings: SynthesisSettings, device: str | torch.device = "cpu",
                       progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: ``per_class`` noise images per class that the teacher labels as that class.

    Returns ``(x (K * per_class, C, H, W), y)`` sorted by class. Raises :class:`SynthesisError`
    with every class's hit count when ``noise_queries`` queries do not fill every class.
    """
    K, shape, n = oracle.num_classes, oracle.input_shape, settings.per_class
    gen = generator(settings.seed, "noise")
    kept: list[list[torch.Tensor]] = [[] for _ in range(K)]
    counts = torch.zeros(K, dtype=torch.long)
    hits = torch.zeros(K, dtype=torch.long)
    spent = 0
    with QueryProgress(K * n, "synthesis[noise]", enabled=progress) as bar:
        while bool((counts < n).any()):
            b = min(settings.noise_batch, settings.noise_queries - spent)
            if b <= 0:
                report = ", ".join(f"{c}: {int(h)}" for c, h in enumerate(hits))
                raise SynthesisError(
                    f"noise budget of {settings.noise_queries:,} queries spent before every class had "
                    f"{n} samples; teacher labels seen per class: {report}. Raise noise_queries or lower per_class.")
            x = draw_noise(settings.noise, b, shape, gen)
            y = oracle(x.to(device)).cpu()
            bar.queries(b)
            spent += b
            hits += torch.bincount(y, minlength=K)
            for c in torch.unique(y).tolist():  # loop over classes, not samples
                need = n - int(counts[c])
                if need > 0:
                    take = x[y == c][:need]
                    kept[c].append(take)
                    counts[c] += take.shape[0]
                    bar.advance(take.shape[0])
    xs = torch.cat([torch.cat(k) for k in kept])
    ys = torch.arange(K).repeat_interleave(n)
    return xs, ys


def untargeted_search(oracle: LabelOracle, x: torch.Tensor, y: torch.Tensor, settings: SynthesisSettings,
                      generator: torch.Generator, warm: torch.Tensor | None = None, on_query=None):
    """Untargeted minimal boundary direction of each sample: ``(theta (N, D), lam (N,),
    best distance (N,), queries (N,))``."""
    budget = settings.queries_per_search * (1 if warm is not None else settings.first_round_factor)
    tr = PairTracker(oracle, x, y, torch.full_like(y, UNTARGETED), budget, (), on_query)
    init = BoundaryDistance(n=settings.search_dirs, tol=1e-3, random=True, warm=warm)
    if settings.search == "hsja":
        est = HopSkipJump(init=init, n0=settings.search_k, n_max=max(settings.search_k, 4 * settings.search_k))
    else:
        est = SignOPT(init=init, k=settings.search_k)
    res = est(tr, None, generator)
    return res.theta, res.lam, tr.best.clone(), tr.queries.clone()


def push_chunk(oracle: LabelOracle, x: torch.Tensor, y: torch.Tensor, settings: SynthesisSettings, chunk: int, *,
               device: str | torch.device = "cpu", partial: Path | None = None, on_query=None
               ) -> dict[str, torch.Tensor]:
    """Stage 2 for the samples ``x`` ``(n, C, H, W)`` of chunk ``chunk`` (labels ``y``): every
    round, then the final measurement. Returns the chunk's tensors: ``x`` pushed, ``best``
    ``(n, iterations + 1)`` untargeted distance of each sample before each move and at the end
    (``nan`` where none was found), ``snapshot_<round>``, ``queries`` and ``seconds`` (both with
    those of an earlier session, ``resumed`` of the queries read back from ``partial``).

    ``partial``: a file keeping the last finished round, so an interrupted chunk resumes there."""
    t0, q0 = time.perf_counter(), oracle.queries
    n, R = x.shape[0], settings.iterations
    x = x.clone()
    lam = torch.full((n,), settings.step)
    theta = torch.zeros(n, x[0].numel())
    best = torch.full((n, R + 1), float("nan"))
    snaps = {0: x.clone()} if 0 in settings.snapshots else {}
    start, q_before, t_before = 0, 0, 0.0
    if partial is not None and partial.exists():
        st = read_tensors(partial)
        x, lam, theta, best = st["x"], st["lam"], st["theta"], st["best"]
        start, q_before, t_before = int(st["round"]), int(st["queries"]), float(st["seconds"])
        snaps = {int(k.split("_")[1]): v for k, v in st.items() if k.startswith("snapshot_")}

    def state(done: int) -> dict[str, torch.Tensor]:
        return {"x": x.clone(), "lam": lam.clone(), "theta": theta.clone(), "best": best.clone(),
                "round": torch.tensor(done), "queries": torch.tensor(q_before + oracle.queries - q0),
                "seconds": torch.tensor(t_before + time.perf_counter() - t0, dtype=torch.float64),
                **{f"snapshot_{k}": v for k, v in snaps.items()}}

    kept, last_save = None, time.perf_counter()
    try:
        for it in range(start, R):
            gen = generator(settings.seed, "round", it, chunk)
            warm = theta.to(device) if it > 0 else None
            th, _, b, _ = untargeted_search(oracle, x.to(device), y.to(device), settings, gen, warm, on_query)
            th, b = th.cpu(), b.cpu()
            found = torch.isfinite(b)
            best[:, it] = torch.where(found, b, torch.full_like(b, float("nan")))
            # move away from the nearest boundary; halve a sample's step while its label would change
            pending, cur = found.clone(), lam.clone()
            for _ in range(settings.max_halvings + 1):
                if not bool(pending.any()):
                    break
                idx = torch.nonzero(pending).squeeze(1)
                cand = (x[idx].reshape(idx.numel(), -1) - cur[idx, None] * th[idx]).clamp(0, 1).view(-1, *x.shape[1:])
                ok = oracle(cand.to(device)).cpu() == y[idx].cpu()
                if on_query is not None:
                    on_query(idx.numel())
                x[idx[ok]] = cand[ok]
                lam[idx[ok]] = cur[idx[ok]]
                pending[idx[ok]] = False
                cur[idx[~ok]] /= 2
            theta = torch.where(found[:, None], th, theta)  # keep the last good direction if none found
            if (it + 1) in settings.snapshots:
                snaps[it + 1] = x.clone()
            if partial is not None:
                kept = state(it + 1)
                if time.perf_counter() - last_save >= SAVE_EVERY:
                    write_tensors(partial, kept)
                    last_save = time.perf_counter()
        # the final distance (after the last move), so the curve has iterations + 1 points
        gen = generator(settings.seed, "final", chunk)
        _, _, b, _ = untargeted_search(oracle, x.to(device), y.to(device), settings, gen,
                                       theta.to(device) if R > 0 else None, on_query)
        b = b.cpu()
        best[:, R] = torch.where(torch.isfinite(b), b, torch.full_like(b, float("nan")))
    except BaseException:
        if kept is not None and int(kept["round"]) > start:
            write_tensors(partial, kept)  # the last finished round; the one in progress is lost
        raise
    out = state(R) | {"resumed": torch.tensor(q_before)}
    return {k: v for k, v in out.items() if k in ("x", "best", "queries", "seconds", "resumed") or k.startswith("snap")}


def _class_noise(oracle: LabelOracle, settings: SynthesisSettings, device, parts: Path | None, progress
                 ) -> tuple[torch.Tensor, torch.Tensor, int, float, bool]:
    """Stage 1, paid once: ``(x, y, queries, seconds, reused)``. Under torchrun rank 0 samples
    the noise (with the ranks' pooled budget) and the others read it from ``parts`` (or get
    it through ``torch.distributed``); a :class:`SynthesisError` is raised on every rank."""
    path = parts / "noise.safetensors" if parts is not None else None
    if broadcast(path is not None and path.exists()):
        st = read_tensors(path)
        return st["x"], st["y"], int(st["queries"]), float(st["seconds"]), True
    pool_budget(oracle, settings.noise_queries if is_main() else 0)
    got: Any = None
    if is_main():
        t0, q0 = time.perf_counter(), oracle.queries
        try:
            x, y = sample_class_noise(oracle, settings, device, progress)
        except SynthesisError as e:
            if world()[1] == 1:
                raise
            got = str(e)
        else:
            got = {"x": x, "y": y, "queries": torch.tensor(oracle.queries - q0),
                   "seconds": torch.tensor(time.perf_counter() - t0, dtype=torch.float64)}
            if path is not None:
                write_tensors(path, got)
    if world()[1] > 1:  # the others wait here while rank 0 samples
        sent = broadcast(got if path is None or isinstance(got, str) else "saved")
        if isinstance(sent, str) and sent != "saved":
            raise SynthesisError(sent)
        if not is_main():
            got = read_tensors(path) if sent == "saved" else sent
    return got["x"], got["y"], int(got["queries"]), float(got["seconds"]), False


def synthesize(oracle: LabelOracle, settings: SynthesisSettings, *, device: str | torch.device = "cpu",
               work_dir: str | os.PathLike | None = None, progress: bool | None = None) -> PseudoSamples:
    """Run both stages; see the module docstring. ``work_dir`` keeps the class noise and the
    finished chunks (and each chunk's last finished round) for resuming; under torchrun it
    must be shared by the ranks (see :mod:`zsdb3kd.parallel`)."""
    t0, q0 = time.perf_counter(), oracle.queries
    settings = settings.resolve()
    parts = None
    if work_dir is not None:
        parts = prepare_work_dir(work_dir, {"key": settings.key(), "settings": settings.model_dump(mode="json")},
                                 "synthesis state")
    x, y, q_noise, t_noise, noise_reused = _class_noise(oracle, settings, device, parts, progress)
    N, cs = x.shape[0], settings.chunk_size
    n_chunks = math.ceil(N / cs)
    if noise_reused:
        log.info(f"synthesis: class noise read from {parts} ({q_noise:,} queries not paid again)")
    with QueryProgress(N, "synthesis[push]", enabled=progress) as bar:
        def compute(c: int) -> dict[str, torch.Tensor]:
            sl = slice(c * cs, min(N, (c + 1) * cs))
            partial = parts / f"partial-{c:05d}.safetensors" if parts is not None else None
            return push_chunk(oracle, x[sl], y[sl], settings, c, device=device, partial=partial, on_query=bar.queries)

        def before(mine: list[int]) -> None:
            need = sum(min(N, (c + 1) * cs) - c * cs for c in mine) * settings.per_sample_queries()
            bar.max_queries = need
            pool_budget(oracle, need)  # torchrun: the ranks' budgets follow the work each was dealt

        chunks, report = run_chunks(n_chunks, compute, parts, before=before,
                                    on_chunk=lambda c, t, reused: bar.advance(t["x"].shape[0]))
    best = torch.cat([t["best"] for t in chunks])
    dists = [float(col[torch.isfinite(col)].mean()) if bool(torch.isfinite(col).any()) else float("nan")
             for col in best.T]
    snaps = {int(k.split("_")[1]): torch.cat([t[k] for t in chunks]) for k in sorted(chunks[0], key=_round)
             if k.startswith("snapshot_")}
    q_push = sum(int(t["queries"]) for t in chunks)
    reused = [chunks[c] for c in report.reused]
    resumed = sum(int(chunks[c]["resumed"]) for c in range(n_chunks) if c not in report.reused)  # from partials
    q_reused = sum(int(t["queries"]) for t in reused) + (q_noise if noise_reused else 0) + resumed
    if report.reused:
        log.info(f"synthesis: reused {len(report.reused)} of {n_chunks} finished chunks")
    per_rank = all_gather(oracle.queries - q0)  # what each torchrun rank paid ([this process] otherwise)
    wall = time.perf_counter() - t0 + sum(float(t["seconds"]) for t in reused) + (t_noise if noise_reused else 0.0)
    prov = {"settings": settings.model_dump(mode="json"), "queries_noise": q_noise, "queries_push": q_push,
            "total_queries": q_noise + q_push, "queries_this_session": sum(per_rank),
            "queries_reused_from_chunks": q_reused, "chunks_reused": len(report.reused), "ranks": world()[1],
            "wall_time_s": round(wall, 2), "n": N}
    if world()[1] > 1:
        prov["queries_per_rank"] = per_rank
    return PseudoSamples(torch.cat([t["x"] for t in chunks]), y, snaps, torch.tensor(dists), prov)


def _round(key: str) -> int:
    return int(key.split("_")[1]) if key.startswith("snapshot_") else -1


def synthesize_to_file(out: str | os.PathLike, oracle: LabelOracle, settings: SynthesisSettings, *,
                       device: str | torch.device = "cpu", progress: bool | None = None) -> PseudoSamples:
    """:func:`synthesize` into the file ``out``, its state kept in ``<out>.parts`` until the
    result is saved (by rank 0 alone under torchrun, once every rank has read every chunk)."""
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    ps = synthesize(oracle, settings, device=device, work_dir=parts, progress=progress)
    if is_main():
        ps.save(out)
        shutil.rmtree(parts, ignore_errors=True)
    return ps
