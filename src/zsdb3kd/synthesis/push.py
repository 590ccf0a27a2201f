"""Zero-shot pseudo samples from noise (ZSDB3KD, arXiv 2106.03310 section 3.4).

No real data is read anywhere in this module: its only inputs are the label-only oracle
and settings. Two stages:

1. **Noise the teacher calls c** (rejection sampling): batches of noise (:func:`draw_noise`)
   are labelled, and each class keeps the first ``per_class`` samples it receives. A class
   never hit within ``noise_queries`` queries is an error that reports every class's count.
2. **Push away from every boundary**: for ``iterations`` rounds, the untargeted minimal
   boundary direction ``theta*`` of every sample is estimated (HSJA or Sign-OPT from random
   directions, warm-started from the last round's ``theta*``), and the sample moves
   ``x <- clip(x - lam * theta*, 0, 1)``; if the teacher would no longer answer ``c``, that
   sample's ``lam`` is halved and the move retried. All samples of all classes are
   searched together. The mean untargeted distance per round is logged (it should grow).

The state is saved after every round, so an interrupted run resumes; round ``i`` uses the
random seed ``(seed, i)``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..oracle import LabelOracle
from ..parallel import prepare_work_dir
from ..progress import QueryProgress
from ..robustness.estimators import BoundaryDistance, HopSkipJump, SignOPT
from ..robustness.tracker import UNTARGETED, PairTracker
from ..settings import Settings
from ..store import generator, load_tagged, read_tensors, save_tagged, write_tensors
from .noise import draw_noise

log = logging.getLogger("zsdb3kd")


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

    @model_validator(mode="after")
    def _search_fits(self) -> "SynthesisSettings":
        if self.queries_per_search < self.search_k + 1:
            raise ValueError(f"queries_per_search ({self.queries_per_search}) must exceed search_k ({self.search_k})")
        return self

    def max_queries(self, num_classes: int) -> int:
        """The most queries a fresh run can make (noise, every round's searches and moves, the final search)."""
        n = self.per_class * num_classes
        rounds = [self.queries_per_search * (self.first_round_factor if i == 0 else 1) for i in range(self.iterations)]
        final = self.queries_per_search * (1 if self.iterations > 0 else self.first_round_factor)
        return self.noise_queries + n * (sum(rounds) + self.iterations * (self.max_halvings + 1) + final)


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


def synthesize(oracle: LabelOracle, settings: SynthesisSettings, *, device: str | torch.device = "cpu",
               work_dir: str | os.PathLike | None = None, progress: bool | None = None) -> PseudoSamples:
    """Run both stages; see the module docstring. ``work_dir`` keeps per-round state for resuming."""
    t0 = time.perf_counter()
    q0 = oracle.queries
    state_path = Path(work_dir) / "state.safetensors" if work_dir is not None else None
    if work_dir is not None:
        prepare_work_dir(work_dir, {"key": settings.key(), "settings": settings.model_dump(mode="json")},
                         "synthesis state")
    snaps: dict[int, torch.Tensor] = {}
    if state_path is not None and state_path.exists():
        st = read_tensors(state_path)
        x, y, lam, theta = st["x"], st["y"], st["lam"], st["theta"]
        dists = st["mean_distance"].tolist()
        start = int(st["round"])
        q_noise, q_push = int(st["q_noise"]), int(st["q_push"])
        wall_before = float(st["wall"]) if "wall" in st else 0.0
        snaps = {int(k.split("_")[1]): v for k, v in st.items() if k.startswith("snapshot_")}
        log.info(f"synthesis: resuming after round {start} of {settings.iterations} ({q_noise + q_push:,} queries "
                 "already paid are not paid again)")
    else:
        before = oracle.queries
        wall_before = 0.0
        x, y = sample_class_noise(oracle, settings, device, progress)
        q_noise = oracle.queries - before
        q_push = 0
        lam = torch.full((x.shape[0],), settings.step)
        theta = torch.zeros(x.shape[0], x[0].numel())
        dists = []
        start = 0
        if 0 in settings.snapshots:
            snaps[0] = x.clone()
    N = x.shape[0]
    with QueryProgress(settings.iterations, "synthesis[push]", unit="round", enabled=progress,
                       initial=start, log_every=0.0) as bar:
        for it in range(start, settings.iterations):
            gen = generator(settings.seed, "round", it)
            before = oracle.queries
            xd, yd = x.to(device), y.to(device)
            warm = theta.to(device) if it > 0 else None
            th, _, best, _ = untargeted_search(oracle, xd, yd, settings, gen, warm, bar.queries)
            found = torch.isfinite(best)
            dists.append(float(best[found].mean()) if bool(found.any()) else float("nan"))
            # move away from the nearest boundary; halve a sample's step while its label would change
            th = th.cpu()
            pending = found.cpu().clone()
            cur = lam.clone()
            for _ in range(settings.max_halvings + 1):
                if not bool(pending.any()):
                    break
                idx = torch.nonzero(pending).squeeze(1)
                cand = (x[idx].reshape(idx.numel(), -1) - cur[idx, None] * th[idx]).clamp(0, 1).view(-1, *x.shape[1:])
                ok = (oracle(cand.to(device)).cpu() == y[idx])
                bar.queries(idx.numel())
                x[idx[ok]] = cand[ok]
                lam[idx[ok]] = cur[idx[ok]]
                pending[idx[ok]] = False
                cur[idx[~ok]] /= 2
            theta = torch.where(found.cpu()[:, None], th, theta)  # keep the last good direction if none found
            q_push += oracle.queries - before
            if (it + 1) in settings.snapshots:
                snaps[it + 1] = x.clone()
            if state_path is not None:
                st = {"x": x, "y": y, "lam": lam, "theta": theta, "mean_distance": torch.tensor(dists),
                      "round": torch.tensor(it + 1), "q_noise": torch.tensor(q_noise), "q_push": torch.tensor(q_push),
                      "wall": torch.tensor(wall_before + time.perf_counter() - t0, dtype=torch.float64)}
                st.update({f"snapshot_{k}": v for k, v in snaps.items()})
                write_tensors(state_path, st)
            bar.advance(1)
    # final distance (after the last move), so the curve has iterations + 1 points
    if settings.iterations > 0 or not dists:
        gen = generator(settings.seed, "final")
        before = oracle.queries
        _, _, best, _ = untargeted_search(oracle, x.to(device), y.to(device), settings, gen,
                                          theta.to(device) if settings.iterations > 0 else None)
        q_push += oracle.queries - before
        found = torch.isfinite(best)
        dists.append(float(best[found].mean()) if bool(found.any()) else float("nan"))
    prov = {"settings": settings.model_dump(mode="json"), "queries_noise": q_noise, "queries_push": q_push,
            "total_queries": q_noise + q_push, "queries_this_session": oracle.queries - q0,
            "wall_time_s": round(wall_before + time.perf_counter() - t0, 2), "n": N}
    return PseudoSamples(x, y, snaps, torch.tensor(dists), prov)


