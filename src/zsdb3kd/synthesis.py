"""Zero-shot pseudo samples from noise (ZSDB3KD, arXiv 2106.03310 section 3.4; METHOD.md section 5).

No real data is read anywhere in this module: its only inputs are the label-only oracle
and settings. Two stages:

1. **Noise the teacher calls c** (rejection sampling): batches of noise (the released
   formula, low-frequency blobs, or both: :func:`draw_noise`) are labelled, and each class keeps the first ``per_class`` samples it receives. A class
   never hit within ``noise_budget`` queries is an error that reports every class's count.
2. **Push away from every boundary**: for ``iterations`` rounds, the untargeted minimal
   boundary direction ``theta*`` of every sample is estimated (Sign-OPT from random
   directions, warm-started from the last round's ``theta*``), and the sample moves
   ``x <- clip(x - lam * theta*, 0, 1)``; if the teacher would no longer answer ``c``, that
   sample's ``lam`` is halved and the move retried. All samples of all classes are
   searched together. The mean untargeted distance per round is logged (it should grow).

The state is saved after every round, so an interrupted run resumes; round ``i`` uses the
random seed ``(seed, i)``, so a resumed run equals an uninterrupted one.

Beyond the paper, :func:`label_random_images` builds a much larger and cheaper zero-shot
transfer set: random images (by default the low-frequency blobs of :func:`draw_noise`),
each labelled by the teacher with one query. The images are a deterministic function of
the seed (chunk ``i`` uses seed ``(seed, kind, i)``), so only the labels are stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .artifacts import load_tagged, save_tagged
from .oracle import LabelOracle
from .progress import QueryProgress
from .robustness.estimators import BoundaryDistance, HopSkipJump, SignOPT
from .robustness.tracker import UNTARGETED, PairTracker


NOISE_KINDS = ("paper", "smooth", "mixed")


def draw_noise(kind: str, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``n`` noise images ``(n, C, H, W)`` in [0, 1].

    * ``paper``: ``clip((U + 0.2) * s1 + N(0, 1) * s2, 0, 1)``, per-sample ``s1, s2 ~ U(0, 1)``
      (the released code's formula). High-frequency: a LeNet-5 Fashion-MNIST teacher almost
      never calls it "Sneaker" or "Ankle boot".
    * ``smooth``: uniform noise on a coarse ``r x r`` grid (``r`` in 2..7) upsampled
      bilinearly, thresholded and scaled per sample: low-frequency blobs that reach every
      class of such teachers.
    * ``mixed``: half of each.
    """
    if kind == "mixed":
        a = n // 2
        return torch.cat([draw_noise("paper", a, shape, generator), draw_noise("smooth", n - a, shape, generator)])
    if kind == "paper":
        u = torch.rand(n, *shape, generator=generator)
        s1 = torch.rand(n, 1, 1, 1, generator=generator)
        s2 = torch.rand(n, 1, 1, 1, generator=generator)
        return ((u + 0.2) * s1 + torch.randn(n, *shape, generator=generator) * s2).clamp(0, 1)
    if kind == "smooth":
        C, H, W = shape
        r = torch.randint(2, 8, (n,), generator=generator)
        out = torch.empty(n, C, H, W)
        for res in torch.unique(r).tolist():  # one interpolation per grid size, vectorised over samples
            rows = torch.nonzero(r == res).squeeze(1)
            z = torch.rand(rows.numel(), C, res, res, generator=generator)
            out[rows] = torch.nn.functional.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
        lo = out.amin(dim=(1, 2, 3), keepdim=True)
        hi = out.amax(dim=(1, 2, 3), keepdim=True)
        out = (out - lo) / (hi - lo + 1e-8)
        thr = torch.rand(n, 1, 1, 1, generator=generator)
        scale = torch.rand(n, 1, 1, 1, generator=generator) * 1.5
        return (torch.where(out > thr, out, torch.zeros_like(out)) * scale).clamp(0, 1)
    raise ValueError(f"unknown noise kind {kind!r}; known: {NOISE_KINDS}")


class SynthesisError(RuntimeError):
    """Synthesis could not produce the requested samples (e.g. a class the noise never hits)."""


@dataclass(frozen=True)
class SynthesisSettings:
    """Pseudo-sample synthesis settings (released: 200 x 10 x 15 rounds, 40 iterations,
    lam 0.5, 5,000 queries per search; our defaults spend far fewer queries)."""

    per_class: int = 200
    iterations: int = 10
    snapshots: tuple[int, ...] = (0, 2, 5, 10)
    step: float = 0.5
    max_halvings: int = 4
    noise: str = "mixed"  # "paper" (released formula), "smooth" (low-frequency blobs) or "mixed" (half each)
    noise_batch: int = 2000
    noise_budget: int = 2_000_000
    search_budget: int = 300  # queries per sample per round for the untargeted direction
    search_dirs: int = 4  # random initial directions per search (plus the warm start)
    search_k: int = 40  # probes per gradient estimate (Sign-OPT k / HSJA n0)
    search: str = "hsja"  # untargeted estimator: "hsja" or "signopt" (the paper's)
    first_budget_factor: int = 3  # round 0 has no warm start: give its search this many times the budget
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.iterations < 0 or self.step <= 0:
            raise ValueError("per_class >= 1, iterations >= 0 and step > 0 are required")
        if self.search_budget < self.search_k + 1:
            raise ValueError(f"search_budget ({self.search_budget}) must exceed search_k ({self.search_k})")
        if self.noise_batch < 1 or self.noise_budget < 1:
            raise ValueError("noise_batch and noise_budget must be >= 1")
        if self.search not in ("hsja", "signopt"):
            raise ValueError(f"search must be 'hsja' or 'signopt', got {self.search!r}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


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


def _seed(seed: int, *parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr((seed, *parts)).encode()).digest()[:7], "little")


def sample_class_noise(oracle: LabelOracle, settings: SynthesisSettings, device: str | torch.device = "cpu",
                       progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: ``per_class`` noise images per class that the teacher labels as that class.

    Returns ``(x (K * per_class, C, H, W), y)`` sorted by class. Raises :class:`SynthesisError`
    with every class's hit count when ``noise_budget`` queries do not fill every class.
    """
    K, shape, n = oracle.num_classes, oracle.input_shape, settings.per_class
    gen = torch.Generator().manual_seed(_seed(settings.seed, "noise"))
    kept: list[list[torch.Tensor]] = [[] for _ in range(K)]
    counts = torch.zeros(K, dtype=torch.long)
    hits = torch.zeros(K, dtype=torch.long)
    spent = 0
    with QueryProgress(K * n, "synthesis[noise]", enabled=progress) as bar:
        while bool((counts < n).any()):
            b = min(settings.noise_batch, settings.noise_budget - spent)
            if b <= 0:
                report = ", ".join(f"{c}: {int(h)}" for c, h in enumerate(hits))
                raise SynthesisError(
                    f"noise budget of {settings.noise_budget:,} queries spent before every class had "
                    f"{n} samples; teacher labels seen per class: {report}. Raise noise_budget or lower per_class.")
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
    budget = settings.search_budget * (1 if warm is not None else settings.first_budget_factor)
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
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        stamp = Path(work_dir) / "settings.json"
        if stamp.exists() and json.loads(stamp.read_text()).get("key") != settings.key():
            raise ValueError(f"{work_dir} holds the state of a different synthesis; delete it or use another path")
        stamp.write_text(json.dumps({"key": settings.key(), "settings": asdict(settings)}, indent=1))
    snaps: dict[int, torch.Tensor] = {}
    if state_path is not None and state_path.exists():
        st = load_file(str(state_path))
        x, y, lam, theta = st["x"], st["y"], st["lam"], st["theta"]
        dists = st["mean_distance"].tolist()
        start = int(st["round"])
        q_noise, q_push = int(st["q_noise"]), int(st["q_push"])
        wall_before = float(st["wall"]) if "wall" in st else 0.0
        snaps = {int(k.split("_")[1]): v for k, v in st.items() if k.startswith("snapshot_")}
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
            gen = torch.Generator().manual_seed(_seed(settings.seed, "round", it))
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
                tmp = state_path.with_name("state.tmp")
                save_file({k: v.contiguous() for k, v in st.items()}, str(tmp))
                os.replace(tmp, state_path)
            bar.advance(1)
    # final distance (after the last move), so the curve has iterations + 1 points
    if settings.iterations > 0 or not dists:
        gen = torch.Generator().manual_seed(_seed(settings.seed, "final"))
        before = oracle.queries
        _, _, best, _ = untargeted_search(oracle, x.to(device), y.to(device), settings, gen,
                                          theta.to(device) if settings.iterations > 0 else None)
        q_push += oracle.queries - before
        found = torch.isfinite(best)
        dists.append(float(best[found].mean()) if bool(found.any()) else float("nan"))
    prov = {"settings": asdict(settings), "queries_noise": q_noise, "queries_push": q_push,
            "total_queries": q_noise + q_push, "queries_this_session": oracle.queries - q0,
            "wall_time_s": round(wall_before + time.perf_counter() - t0, 2), "n": N}
    return PseudoSamples(x, y, snaps, torch.tensor(dists), prov)


def random_images(kind: str, n: int, shape: tuple[int, int, int], seed: int, chunk: int = 50_000,
                  start: int = 0) -> torch.Tensor:
    """Images ``start .. start + n`` of the deterministic random sequence ``(kind, seed)``,
    quantised to 8 bits: ``(n, C, H, W)`` uint8. Chunk ``i`` of ``chunk`` images is drawn
    from its own seed, so any slice can be regenerated without the rest."""
    if kind not in NOISE_KINDS and kind != "uniform":
        raise ValueError(f"unknown image kind {kind!r}; known: uniform, {', '.join(NOISE_KINDS)}")
    out = torch.empty(n, *shape, dtype=torch.uint8)
    first, last = start // chunk, (start + n - 1) // chunk if n else start // chunk - 1
    for c in range(first, last + 1):
        g = torch.Generator().manual_seed(_seed(seed, kind, c))
        size = chunk
        x = torch.rand(size, *shape, generator=g) if kind == "uniform" else draw_noise(kind, size, shape, g)
        lo, hi = max(start, c * chunk), min(start + n, (c + 1) * chunk)
        out[lo - start: hi - start] = (x[lo - c * chunk: hi - c * chunk] * 255).round().to(torch.uint8)
    return out


def label_random_images(oracle: LabelOracle, kind: str, n: int, seed: int, *, chunk: int = 50_000,
                        device: str | torch.device = "cpu", work_dir: str | os.PathLike | None = None,
                        progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images of ``kind`` (:func:`random_images`) and the teacher's label of each.

    Returns ``(x uint8 (n, C, H, W), y (n,))``; the teacher sees exactly the 8-bit images
    (as ``x / 255``), one query per image. With ``work_dir`` each finished chunk's labels
    are kept, so an interrupted run resumes without asking the teacher again.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 random images, got {n}")
    shape = tuple(oracle.input_shape)
    parts = Path(work_dir) if work_dir is not None else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
    xs = torch.empty(n, *shape, dtype=torch.uint8)
    ys = torch.empty(n, dtype=torch.long)
    n_chunks = -(-n // chunk)
    with QueryProgress(n, f"random[{kind}]", unit="image", enabled=progress) as bar:
        for c in range(n_chunks):
            lo, hi = c * chunk, min(n, (c + 1) * chunk)
            x = random_images(kind, hi - lo, shape, seed, chunk, start=lo)
            f = parts / f"labels_{kind}_{seed}_{chunk}_{c}.safetensors" if parts is not None else None
            if f is not None and f.exists():
                y = load_file(str(f))["y"]
                if y.shape != (hi - lo,):
                    raise ValueError(f"{f} holds {tuple(y.shape)} labels, expected {hi - lo}: delete it")
            else:
                y = oracle(x.to(device).float().div_(255)).cpu()
                bar.queries(hi - lo)
                if f is not None:
                    tmp = f.with_suffix(".tmp")
                    save_file({"y": y.contiguous()}, str(tmp))
                    os.replace(tmp, f)
            xs[lo:hi], ys[lo:hi] = x, y
            bar.advance(hi - lo)
    return xs, ys
