"""The budgeted student: rounds of synthesise -> choose -> query -> train.

Round 0 spends ``init_fraction`` of the budget on fresh candidates (there is no student yet
to choose with). Every later round

1. builds ``pool_factor`` free candidates per query: zero-shot, fresh synthetic images
   (:mod:`.candidates`) and variations of images the teacher has already labelled (their
   parents drawn class-balanced over its labels); with a real ``pool``, pool images not
   queried yet;
2. scores them with the current student (:mod:`.select`) and chooses the round's queries:
   class-balanced by the student's prediction, the most uncertain of a random subset;
3. asks the teacher, once, through the :class:`~.ledger.QueryLedger` (stored on disk at once);
4. trains the student, warm-started, on every labelled image (:mod:`.train`).

A slice of each round's queries (``val_fraction``) is held out and never trained on: the
round's log reports the student's agreement with the teacher there. Nothing here reads a
real label.

Under torchrun every rank runs the same rounds and the teacher's calls are split over the
ranks (see :mod:`.ledger`): the same student bits as one process, each image paid once.

Resumable: with ``work_dir``, every teacher call is stored when answered and the student
after every round, and a round's training state every ``SAVE_EVERY`` seconds; a rerun
replays the stored calls (nothing is paid twice) and continues after the last finished
round, part way through its training where that was saved. Every random stream is derived
from ``(seed, round, purpose)`` and the initial weights from the seed, so a resumed run
ends with the same student bits as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..models import create_model, on_device
from ..parallel import is_main
from ..settings import content_key
from ..store import TrainingCheckpoint, derive_seed, generator, read_tensors, write_json, write_tensors
from . import candidates as C
from .ledger import QueryLedger, digest
from .select import choose, predict, same_class_partners, uncertainty
from .settings import BudgetSettings, plan_rounds
from .train import agreement, fit

STATE_VERSION = 2
#: seconds between two saves of a round's training state (``training-<round>.pt``)
SAVE_EVERY = 60.0


@dataclass
class BudgetResult:
    """What :func:`train_budgeted` returns."""

    student: nn.Module
    x: torch.Tensor  #: every queried image ``(N, C, H, W)``, in query order
    y: torch.Tensor  #: the teacher's labels ``(N,)``
    is_val: torch.Tensor  #: ``(N,)`` bool: held out from training
    log: list[dict] = field(default_factory=list)  #: one entry per round
    queries: int = 0  #: queries of the whole run (resumed parts included)
    paid: int = 0  #: queries this process paid the oracle (the rest were replayed from work_dir)


def build_student(arch: str, num_classes: int, input_shape: tuple[int, ...], seed: int) -> nn.Module:
    """The student with seed-determined initial weights, checked on a dummy batch of
    ``input_shape``: a ``ValueError`` here comes before any query is spent."""
    shape = tuple(int(v) for v in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**31)
        try:
            model = create_model(arch, num_classes=num_classes, input_shape=shape)
            model.eval()
            with torch.no_grad():
                out = model(torch.zeros(2, *shape))
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"student {arch!r} cannot take {shape} images ({e}); choose another architecture "
                             "(mlp and cnn-small take any input size)") from None
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"student {arch!r} gives {tuple(out.shape[1:])} outputs, not ({num_classes},)")
    return model


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


class _Run:
    """One run's state; ``x, y, v`` hold every finished round's images (uint8), labels and
    held-out flags."""

    def __init__(self, oracle, arch: str, budget: int, s: BudgetSettings, seed: int, pool, work_dir, device,
                 progress) -> None:
        self.shape = tuple(int(v) for v in oracle.input_shape)
        s = s.for_input(self.shape)  # recipe "auto" -> the named recipe for these images
        self.s, self.seed, self.arch, self.budget = s, int(seed), arch, int(budget)
        self.k = int(oracle.num_classes)
        self.device = torch.device(device)
        self.progress = progress
        self.plan = plan_rounds(self.budget, s.rounds, s.init_fraction)
        self.student = on_device(build_student(arch, self.k, self.shape, seed), self.device)
        if pool is not None:
            if pool.dim() != 4 or tuple(pool.shape[1:]) != self.shape:
                raise ValueError(f"the pool must hold (N, {', '.join(map(str, self.shape))}) images, got "
                                 f"{tuple(pool.shape)}")
            if pool.shape[0] < self.budget:
                raise ValueError(f"a pool of {pool.shape[0]:,} images cannot feed a budget of {self.budget:,} queries")
            pool = _f32(_u8(pool.detach().to("cpu", torch.float32)))
        self.pool = pool
        self.used = torch.zeros(0 if pool is None else pool.shape[0], dtype=torch.bool)
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.log: list[dict] = []
        self.earlier: dict[str, torch.Tensor] | None = None  # committee: the student before the last training
        self.dir = None if work_dir is None else Path(work_dir)
        self.ledger = QueryLedger(oracle, self.budget, self.dir)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._resume()

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict:
        return {"version": STATE_VERSION, "settings": self.s.identity(), "arch": self.arch,
                "budget": self.budget, "seed": self.seed, "shape": list(self.shape), "num_classes": self.k,
                "pool": None if self.pool is None else digest(_u8(self.pool))}

    def _resume(self) -> None:
        f = self.dir / "state.json"
        if not f.exists():
            return
        state = json.loads(f.read_text())
        if content_key(state.get("meta")) != content_key(self._meta()):
            raise ValueError(f"{self.dir} holds a run with other settings, budget, seed, student, teacher shape or "
                             "pool; use a new work directory")
        self.log = state["log"]
        done = len(self.log)
        if done:
            t = read_tensors(self.dir / f"student-{done - 1}.safetensors")
            self.student.load_state_dict({k[2:]: v for k, v in t.items() if k.startswith("s.")})
            self.earlier = {k[2:]: v for k, v in t.items() if k.startswith("p.")} or None
            if self.pool is not None:
                self.used = t["used"].bool()
        for r in range(done):
            d = read_tensors(self.dir / f"round-{r}.safetensors")
            self.x.append(d["x"])
            self.y.append(d["y"].long())
            self.v.append(d["v"].bool())
        self.ledger.spent = sum(e["queries"] for e in self.log)

    def _training_checkpoint(self, r: int, y: torch.Tensor) -> TrainingCheckpoint | None:
        """Where round ``r``'s training keeps its state part way (a long final training resumes
        where it was, not from its first step); ``None`` without a work directory."""
        if self.dir is None:
            return None
        return TrainingCheckpoint(self.dir / f"training-{r}.pt", {"run": content_key(self._meta()), "round": r,
                                                                  "labels": digest(y)})

    def _commit(self, r: int) -> None:
        if self.dir is None or not is_main():  # every rank holds the same state; rank 0 writes it
            return
        write_tensors(self.dir / f"round-{r}.safetensors", {"x": self.x[r], "y": self.y[r], "v": self.v[r]})
        t = {f"s.{k}": v for k, v in self.student.state_dict().items()}
        t.update({f"p.{k}": v for k, v in (self.earlier or {}).items()})
        if self.pool is not None:
            t["used"] = self.used.to(torch.uint8)
        write_tensors(self.dir / f"student-{r}.safetensors", t)
        write_json(self.dir / "state.json", {"meta": self._meta(), "log": self.log})
        (self.dir / f"student-{r - 1}.safetensors").unlink(missing_ok=True)
        (self.dir / f"training-{r}.pt").unlink(missing_ok=True)

    # ------------------------------------------------------------------ one round
    def labelled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.x:
            return torch.empty(0, *self.shape), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool)
        return _f32(torch.cat(self.x)), torch.cat(self.y), torch.cat(self.v)

    def candidates(self, r: int, m: int, xl: torch.Tensor, yl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``m`` free candidates and their pool indices (-1: synthetic)."""
        s, g = self.s, generator(self.seed, "budget", r, "candidates")
        if self.pool is not None:
            free = torch.nonzero(~self.used).squeeze(1)
            if free.numel() > m:
                free = free[torch.randperm(free.numel(), generator=g)[:m]].sort().values
            return self.pool[free], free
        n_mut = int(round(m * s.mutate_fraction)) if r > 0 and xl.shape[0] else 0
        fresh = C.synthesize(m - n_mut, self.shape, g, s.candidates, deform_p=s.deform_p, cutmix_p=s.cutmix_p)
        parts = [fresh]
        if n_mut:  # parents drawn class-balanced over the teacher's labels
            pi = self.parents(xl, yl, n_mut, g)
            mates = same_class_partners(yl, pi, g) if s.mutate_same_class > 0 else None
            parts.append(C.mutate(xl[pi], n_mut, g, fresh=fresh, partners=None if mates is None else xl[mates],
                                  p_partner=s.mutate_same_class))
        x = _f32(_u8(torch.cat(parts)))  # what is stored is exactly what is asked
        return x, torch.full((x.shape[0],), -1, dtype=torch.long)

    def parents(self, xl: torch.Tensor, yl: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        """Indices of ``n`` labelled images to vary, class-balanced over the teacher's labels; a share
        ``mutate_errors`` of them among those the current student gets wrong."""
        w = (1.0 / torch.bincount(yl, minlength=self.k).float().clamp_min(1))[yl]
        n_err = int(round(n * self.s.mutate_errors))
        if n_err:
            wrong = predict(self.student, xl.to(self.device)).argmax(1).cpu() != yl
            if wrong.any():
                we = (1.0 / torch.bincount(yl[wrong], minlength=self.k).float().clamp_min(1))[yl] * wrong
                picked = [torch.multinomial(we, n_err, replacement=True, generator=g)]
                if n > n_err:
                    picked.insert(0, torch.multinomial(w, n - n_err, replacement=True, generator=g))
                return torch.cat(picked)
        return torch.multinomial(w, n, replacement=True, generator=g)

    def choose_queries(self, r: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's ``q`` images to ask about and their pool indices."""
        s = self.s
        xl, yl, vl = self.labelled()
        if r == 0:
            return self.candidates(r, q, xl, yl)
        cand, pidx = self.candidates(r, max(q, int(math.ceil(q * s.pool_factor))), xl[~vl], yl[~vl])
        if cand.shape[0] < q:
            raise RuntimeError(f"round {r}: only {cand.shape[0]:,} candidates for {q:,} queries")
        p = predict(self.student, cand.to(self.device)).cpu()
        earlier = None
        if s.acquisition == "committee" and self.earlier is not None and r > 1:  # round 1's is untrained
            snap = on_device(build_student(self.arch, self.k, self.shape, self.seed), self.device)
            snap.load_state_dict(self.earlier)
            earlier = predict(snap, cand.to(self.device)).cpu()
        weight = (1.0 + torch.bincount(yl, minlength=self.k).float()) ** -s.rare_boost if s.rare_boost else None
        idx = choose(uncertainty(p, s.acquisition, earlier), p.argmax(1), q, self.k,
                     generator(self.seed, "budget", r, "choose"), balance=s.class_balance, explore=s.explore,
                     class_weight=weight)
        return cand[idx], pidx[idx]

    def round(self, r: int) -> None:
        s, q = self.s, self.plan[r]
        t0 = time.perf_counter()
        x, pidx = self.choose_queries(r, q)
        y = self.ledger(x, f"r{r}")
        before = agreement(self.student, x, y, self.device) if r > 0 else None
        self.x.append(_u8(x))
        self.y.append(y)
        self.v.append(torch.rand(q, generator=generator(self.seed, "budget", r, "val")) < s.val_fraction)
        if self.pool is not None:
            self.used[pidx[pidx >= 0]] = True
        t1 = time.perf_counter()
        xl, yl, vl = self.labelled()
        last = r == len(self.plan) - 1
        if last and s.final_fresh and r > 0:
            self.student = on_device(build_student(self.arch, self.k, self.shape,
                                                   derive_seed(self.seed, "budget", "final")), self.device)
        if s.acquisition == "committee":
            self.earlier = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        stats = fit(self.student, xl[~vl], yl[~vl], s.final_epochs if last else s.epochs_per_round, s,
                    generator(self.seed, "budget", r, "train"), self.k, self.device, cosine=last,
                    checkpoint=self._training_checkpoint(r, yl[~vl]), save_every=SAVE_EVERY if is_main() else math.inf,
                    desc=None if self.progress is None or not is_main() else
                    f"training round {r + 1}/{len(self.plan)}" + (" (final)" if last else ""))
        entry = {"round": r, "queries": q, "total_queries": self.ledger.spent, "train": int((~vl).sum()),
                 "held_out": int(vl.sum()), "agreement_held_out": agreement(self.student, xl[vl], yl[vl], self.device),
                 "agreement_before_training": before,
                 "class_counts": torch.bincount(y, minlength=self.k).tolist(),
                 "choose_s": round(t1 - t0, 2), "train_s": round(time.perf_counter() - t1, 2), **stats}
        self.log.append(entry)
        self._commit(r)
        if self.progress is not None and is_main():
            self.progress(entry, len(self.plan))

    def run(self) -> BudgetResult:
        for r in range(len(self.log), len(self.plan)):
            self.round(r)
        x, y, v = self.labelled()
        self.student.eval()
        return BudgetResult(self.student, x, y, v, list(self.log), self.ledger.spent, self.ledger.paid_here)


def train_budgeted(oracle, student: str, budget: int, settings: BudgetSettings | None = None, *, seed: int = 0,
                   pool: torch.Tensor | None = None, work_dir=None, device: str | torch.device = "cpu",
                   progress: Callable[[dict, int], None] | None = None) -> BudgetResult:
    """The best student for ``budget`` teacher queries.

    Args:
        oracle: label-only teacher with ``input_shape``, ``num_classes`` and a ``queries``
            count (any :class:`zsdb3kd.oracle.LabelOracle`); over the whole run, resumes
            included, it is asked about ``budget`` images, never more.
        student: a registered architecture (``zsdb3kd list-models``).
        budget: total teacher queries.
        settings: the recipe (default ``recipe = "auto"``: the best measured for the images'
            channels, :meth:`BudgetSettings.for_input`).
        seed: every random stream and the initial weights derive from it.
        pool: real unlabelled images ``(N, C, H, W)`` in [0, 1] (the DB3KD setting without
            labels): they replace the synthetic candidates.
        work_dir: folder for resumable state (``None``: nothing is written).
        device: where the student trains.
        progress: called with each round's log entry and the number of rounds.

    The student is built and run on the input shape before any query is spent.
    """
    return _Run(oracle, student, budget, settings or BudgetSettings(), seed, pool, work_dir, device, progress).run()
