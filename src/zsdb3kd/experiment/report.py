"""The run report: ``report.md`` (what the run shows, in words, then the table), ``report.json``
and plots (test accuracy against teacher queries; zero-shot: pseudo samples per round)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..store import write_json

log = logging.getLogger("zsdb3kd")

#: differences between single-seed students below this many points are within seed noise
#: (ten seeds of the same student differed by 0.6 to 1.0 points in our DB3KD study)
NOISE_POINTS = 1.0

#: the budgeted engine's row kinds (``<kind>@<total queries>``) and how the plot names them
BUDGETED_LABELS = {"budgeted": "budgeted (synthetic images)", "budgeted-pool": "budgeted (real unlabelled pool)",
                   "random": "random images (ingredients off)"}


def _kind(row: dict[str, Any]) -> tuple[str, int | None]:
    kind, _, total = row["method"].partition("@")
    return (kind, int(total)) if kind in BUDGETED_LABELS and total.isdigit() else (kind, None)


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def findings(report: dict[str, Any]) -> list[str]:
    """Plain sentences on what the table shows (best student, cost, and why some are below others)."""
    rows = [r for r in report["students"] if r.get("test_acc") is not None]
    if not rows:
        return []
    out = []
    paid = [r for r in rows if r.get("total_queries")]
    best = max(paid or rows, key=lambda r: r["test_acc"])
    t = report["teacher"].get("test_acc")
    out.append(f"The best label-only student is `{best['method']}` ({best.get('label', '')}): "
               f"{best['test_acc']:.2f}% test accuracy for {_fmt(best.get('total_queries'))} teacher queries"
               + (f", against the teacher's {t:.2f}%." if t is not None else "."))
    by = {_kind(r): r for r in rows}
    for (kind, n), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        rnd = by.get(("random", n))
        if kind in ("budgeted", "budgeted-pool") and rnd is not None:
            out.append(f"At {n:,} queries the {BUDGETED_LABELS[kind]} student reaches {r['test_acc']:.2f}%, "
                       f"{r['test_acc'] - rnd['test_acc']:+.2f} points against random images for the same bill.")
    base = next((r for r in rows if r["method"] in ("ce", "zs-ce")), None)
    soft_below = False
    if base is not None:
        for r in rows:
            if r is base or not r.get("queries_per_pair"):
                continue
            diff = r["test_acc"] - base["test_acc"]
            ratio = (r.get("total_queries") or 0) / max(1, base.get("total_queries") or 1)
            verdict = ("within seed noise of" if abs(diff) < NOISE_POINTS else "above" if diff > 0 else "below")
            out.append(f"`{r['method']}` is {diff:+.2f} points, {verdict} the hard labels (`{base['method']}`), "
                       f"for {ratio:,.0f}x their queries.")
            soft_below |= diff < NOISE_POINTS
    if soft_below:
        out.append("Boundary-distance soft labels (the paper's DB3KD) spend hundreds of queries on each image's label. "
                   "On the same few images they add little to a hard label, and per query they are far behind: "
                   "the same bill buys hard labels for hundreds of times more images, which the budgeted student "
                   "spends on images it chooses.")
    wb = next((r for r in rows if r["method"] == "whitebox-kd"), None)
    if wb is not None and base is not None and wb["test_acc"] < base["test_acc"] - NOISE_POINTS:
        out.append(_whitebox_below(wb, report["data"].get("subset")))
    out.append(f"One seed per student: differences under about {NOISE_POINTS:g} point are within seed noise.")
    return out


def _whitebox_below(wb: dict[str, Any], subset: int | None) -> str:
    """Why white-box KD can end below the hard labels, for the loss this run used."""
    head = "White-box KD (the teacher's real logits) is below the hard labels here. "
    t = wb.get("temperature", 20.0)
    if wb.get("kl_reduction") == "sum":
        return head + (f"Its KL is summed over the batch (`kl_reduction = \"sum\"`, the released loss), so at "
                       f"T = {t:g} it outweighs the cross-entropy on the label; the default `batchmean` weighs "
                       "them evenly.")
    if t >= 10:
        return head + (f"At T = {t:g} (the paper's temperature for its boundary-distance soft labels) the real "
                       "logits soften to nearly uniform targets that add little to the label, so a seed a point "
                       "or two apart is noise; at T = 4 they were about a point above the hard labels "
                       "(docs/results/whitebox-kd.md).")
    few = f" ({subset:,} images)" if subset else ""
    return head + (f"On a small training set{few} check that the students train for enough steps (epochs times "
                   "images over batch size): too few leave the soft targets unfitted (docs/results/whitebox-kd.md).")


def timing(report: dict[str, Any]) -> str:
    """The run's time in one sentence; a rerun that reused stages says what they cost when made."""
    here = f"{report['wall_time_s']} s"
    st = report.get("stages")
    if not st or not st["reused"]:
        return f"Total wall time of this invocation: {here}."
    made = ", ".join(st["made"]) or "nothing new"
    return (f"This invocation took {here}: it made {made} and reused {', '.join(st['reused'])} from an earlier "
            f"invocation. Every stage of this report took {st['time_s']:.1f} s when it was made (training, "
            "synthesis and soft labels, not loading and evaluation).")


def write_report(run: Path, report: dict[str, Any], extras: dict[str, Any] | None = None) -> Path:
    """``report.md``, ``report.json`` and the plots in ``run``."""
    extras = extras or {}
    t, d = report["teacher"], report["data"]
    zero = report.get("mode") == "zero-shot"
    if zero and not d["subset"]:
        data_line = f"No real training data; test on {d['test']:,} real test images of {d['name']}."
    elif zero:
        data_line = (f"Transfer set: {d['subset']:,} pseudo samples synthesised from noise (no real training data); "
                     f"selection on {d['val']:,} held-out pseudo samples; test on {d['test']:,} real test images of "
                     f"{d['name']}.")
    else:
        data_line = (f"Distillation subset: {d['subset']:,} training images of {d['name']}; selection on "
                     f"{d['val']:,} held-out training images; test on {d['test']:,}.")
    lines = [f"# {report['name']}", "",
             f"Teacher `{t.get('arch', t.get('path'))}`: test accuracy {_fmt(t.get('test_acc'))}% "
             f"(sha256 `{t['sha256'][:12]}`). {data_line}", "", "## What this run shows", ""]
    lines += [f"- {s}" for s in findings(report)]
    lines += ["", "![test accuracy against teacher queries](accuracy_vs_queries.png)", "",
              "*Test accuracy of each student against the teacher queries it cost (log scale). Lines join the "
              "budgeted students of one kind at growing budgets and the soft-label students of one boundary-distance "
              "method at growing queries per pair; dashed lines are "
              "students that cost no extra queries or need white-box access.*", "", "## Students", "",
              "| student | method | budget per pair | mean queries per pair | total teacher queries | soft-label time (s) "
              "| train time (s) | val acc (%) | test acc (%) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["students"]:
        lines.append(f"| {r['method']} | {r.get('label', '')} | {_fmt(r.get('queries_per_pair'))} | "
                     f"{_fmt(r.get('mean_queries_per_pair'), 1)} | {_fmt(r.get('total_queries'))} | "
                     f"{_fmt(r.get('soft_label_time_s'), 1)} | {_fmt(r.get('train_time_s'), 1)} | "
                     f"{_fmt(r.get('val_acc'))} | {_fmt(r.get('test_acc'))} |")
    if zero and report.get("synthesis"):
        syn = report["synthesis"]
        curve = ", ".join(f"{v:.3f}" for v in syn["mean_distance"])
        lines += ["", f"Synthesis: {syn['n']:,} pseudo samples, {_fmt(syn['queries_noise'])} queries for class noise "
                  f"+ {_fmt(syn['queries_push'])} for boundary pushing = {_fmt(syn['total_queries'])} queries, "
                  f"{_fmt(syn['wall_time_s'], 1)} s. Mean untargeted boundary distance per round: {curve}.", "",
                  "![distance curve](synthesis_distance.png)", ""]
        pseudo = extras.get("pseudo")
        for it in sorted(pseudo.snapshots) if pseudo is not None else []:
            lines.append(f"![pseudo samples, round {it}](pseudo_round{it}.png)")
    if report.get("robustness"):
        lines += ["", "Soft-label stage (teacher queries, wall time, queries per second):", ""]
        for m, info in report["robustness"].items():
            reused = f"; {info['chunks_reused']} chunks reused" if info.get("chunks_reused") else ""
            lines.append(f"- {m}: {_fmt(info.get('total_queries'))} queries, {_fmt(info.get('wall_time_s'), 1)} s, "
                         f"{_fmt(info.get('queries_per_s'), 0)} q/s{reused}")
    lines += ["", timing(report), ""]
    md = run / "report.md"
    md.write_text("\n".join(lines))
    write_json(run / "report.json", report)
    try:
        _plot(run / "accuracy_vs_queries.png", report)
        if zero and extras.get("pseudo") is not None:
            _plot_synthesis(run, extras["pseudo"], extras.get("classes"))
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install 'zsdb3kd[plot]')")
    log.info(f"report: {md}")
    return md


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'zsdb3kd[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(path: Path, report: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in report["students"]:
        acc, q = r["test_acc"], r.get("total_queries")
        kind, n = _kind(r)
        if n is not None:
            curves.setdefault(BUDGETED_LABELS[kind], []).append((q, acc))
        elif r.get("queries_per_pair"):
            curves.setdefault(r["method"].rpartition("@")[0], []).append((q, acc))
        elif q:
            ax.plot([q], [acc], "o", ms=7, label=f"{r['method']} ({acc:.2f}%)")
        else:
            ax.axhline(acc, color="tab:green", ls="--", label=f"{r['method']} ({acc:.2f}%, no label queries)")
    prefix = "ZSDB3KD" if report.get("mode") == "zero-shot" else "DB3KD"
    for name, pts in curves.items():
        pts.sort()
        label = name if name in BUDGETED_LABELS.values() else f"{prefix}-{name} (soft labels)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "^-" if name in BUDGETED_LABELS.values() else "s-",
                label=label)
    if report["teacher"].get("test_acc") is not None:
        ax.axhline(report["teacher"]["test_acc"], color="k", ls=":", label="teacher")
    ax.set_xscale("log")
    ax.set_xlabel("teacher queries spent (total)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{report['name']}: accuracy per query", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_synthesis(run: Path, pseudo, classes) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(range(len(pseudo.mean_distance)), pseudo.mean_distance.tolist(), "o-")
    ax.set_xlabel("synthesis round")
    ax.set_ylabel("mean untargeted boundary distance (L2)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "synthesis_distance.png", dpi=120)
    plt.close(fig)
    K, per = int(pseudo.y.max()) + 1, 8
    for it, xs in pseudo.snapshots.items():
        fig, axes = plt.subplots(K, per, figsize=(per * 0.8, K * 0.85), squeeze=False)
        for c in range(K):
            members = torch.nonzero(pseudo.y == c).squeeze(1)[:per]
            for j in range(per):
                a = axes[c, j]
                a.axis("off")
                if j < members.numel():
                    img = xs[members[j]]
                    a.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            axes[c, 0].set_title(str(classes[c]) if classes else str(c), fontsize=6, loc="left")
        fig.suptitle(f"pseudo samples per class, round {it}", fontsize=8)
        fig.tight_layout()
        fig.savefig(run / f"pseudo_round{it}.png", dpi=100)
        plt.close(fig)
