"""What a run can cost before it spends anything: the most teacher queries of every stage."""

from __future__ import annotations

from typing import Any

import torch

from ..data import train_val_split
from ..robustness import RobustnessSettings
from ..synthesis import SynthesisSettings
from .config import BUDGETED, RunConfig, needs_pseudo_samples, parse_student_method


def robustness_settings(cfg: RunConfig, method: str) -> RobustnessSettings:
    """The settings of one ``[robustness]`` method."""
    fields = cfg.robustness.model_dump(exclude={"methods"})
    if method.split(":")[0] in ("sd", "bd"):
        fields.update(allocation="uniform")
    return RobustnessSettings(method=method, seed=cfg.seed, **fields)


def synthesis_settings(cfg: RunConfig) -> SynthesisSettings:
    return SynthesisSettings(seed=cfg.seed, **cfg.synthesis.model_dump())


def zero_shot_samples(cfg: RunConfig, num_classes: int) -> int:
    """Pseudo samples that get soft labels (those not held out for selection)."""
    labels = torch.arange(num_classes).repeat_interleave(cfg.synthesis.per_class)
    return len(train_val_split(labels, cfg.student.val_fraction, cfg.seed)[0])


def plan_queries(cfg: RunConfig, num_classes: int, n_test: int) -> list[dict[str, Any]]:
    """The most teacher queries each stage of a fresh run of ``cfg`` can spend.

    Rows ``{"stage", "what", "queries", "in_budget"}``; ``in_budget`` is False for the
    teacher's test accuracy, which is measured outside ``query_budget``. Budgets per pair
    are caps, so a run spends at most this; stages already finished in the run directory
    spend nothing.
    """
    K = num_classes
    rows: list[dict[str, Any]] = []

    def add(stage, what, queries, in_budget=True):
        rows.append({"stage": stage, "what": what, "queries": int(queries), "in_budget": in_budget})

    t = cfg.teacher
    add("teacher", f"given: {t.path}" if t.path else f"train {t.arch} on the real training data ({t.epochs} epochs)", 0)
    add("teacher accuracy", f"{n_test:,} test images (measured outside query_budget)", n_test, in_budget=False)
    needed = {parse_student_method(s, cfg)[0] for s in cfg.student.methods}
    syn_total = 0
    if cfg.mode == "zero-shot" and needs_pseudo_samples(cfg):
        ss = synthesis_settings(cfg)
        syn_total = ss.max_queries(K)
        add("synthesis", f"noise until {ss.per_class} per class (at most {ss.noise_queries:,}), then {ss.iterations} "
                         f"rounds of {ss.per_class * K:,} searches", syn_total)
        n_samples, where = zero_shot_samples(cfg, K), "pseudo samples"
    else:
        n_samples, where = cfg.data.subset, "training images"
    robust: dict[str, int] = {}
    for method in cfg.robustness.methods:
        if method not in needed:
            continue
        rs = robustness_settings(cfg, method)
        robust[method] = rs.max_queries(n_samples, K)
        add(f"robustness[{method}]", f"{n_samples:,} {where} x {K - 1} targets x {rs.per_pair():,} + their labels",
            robust[method])
    for spec in cfg.student.methods:
        method, total = parse_student_method(spec, cfg)
        st = cfg.student
        if method in BUDGETED["db3kd"]:
            rounds = 1 if method == "random" else cfg.budget.rounds + 1
            add(f"student[{spec}]", f"{total:,} images chosen in {rounds} round(s) (kept for reruns)", total)
        elif method == "ce":
            add(f"student[{spec}]", f"labels of {n_samples:,} {where}", n_samples)
        elif method == "noise-ce":
            most = max([syn_total, st.random_samples if "random-ce" in needed else 0,
                        *(syn_total + q for q in robust.values())])
            n = st.noise_samples or min(most, st.noise_cap)
            add(f"student[{spec}]", f"labels of up to {n:,} uniform-noise images", n)
        elif method == "random-ce":
            add(f"student[{spec}]", f"labels of {st.random_samples:,} random images (kept for reruns)",
                st.random_samples)
    return rows


def planned_total(rows: list[dict[str, Any]]) -> int:
    return sum(r["queries"] for r in rows if r["in_budget"])


def format_plan(cfg: RunConfig, rows: list[dict[str, Any]]) -> str:
    width = max(len(r["stage"]) for r in rows)
    lines = [f"{r['stage']:<{width}}  {r['queries']:>14,}  {r['what']}" for r in rows]
    budget = "no query_budget set" if cfg.query_budget is None else f"query_budget is {cfg.query_budget:,}"
    lines.append(f"{'total':<{width}}  {planned_total(rows):>14,}  counted against query_budget ({budget}); worst "
                 "case for a fresh run: finished stages in the run directory cost nothing")
    return "\n".join(lines)
