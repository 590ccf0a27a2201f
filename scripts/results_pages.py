"""Render the results pages and the README's headline table from the JSON the benchmarks wrote.

    python scripts/results_pages.py          # rewrites every generated block of docs/results/ and the README
    python scripts/results_pages.py --record runs/quickstart db3kd-fashion-mnist --command "bash scripts/quickstart.sh"
                                             # keeps a run's report.json as docs/results/<page>.json

Each table is generated from ``docs/results/<name>.json`` (written by ``benchmarks/<name>.py``, or
the ``report.json`` of a ``zsdb3kd run`` kept with ``--record``), with the command that produced it, so a rerun of the benchmark followed by this script
refreshes the docs. Text between ``<!-- generated:NAME -->`` and ``<!-- /generated -->``
markers is replaced; everything else in a page is left as written.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BUDGET_BENCHMARK = ROOT / "benchmarks" / "budget.py"  # its ABLATIONS say what each budgeted-<x> row changed

#: published hard-label, data-free numbers (quoted, not run here): dataset -> (method, budget, accuracy)
QUOTED = {
    "fashion-mnist": [("DIP-KD (quoted)", 50_000, "83.98"), ("DFHL-RS (quoted)", None, "~83.9"),
                      ("IDEAL (quoted)", None, "82.8-83.9")],
    "mnist": [("DIP-KD (quoted)", 20_000, "98.59"), ("DFHL-RS (quoted)", None, "~98.5"), ("IDEAL (quoted)", None,
                                                                                          "96.3-97.0")],
    "cifar10": [("DIP-KD (quoted, ResNet-18)", 50_000, "83.41")],
}


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


#: row order of the budget tables: baselines, the budgeted student, its ablations, levers, pool, references
ORDER = ("random", "paper", "budgeted", "budgeted-off", "budgeted-no-", "budgeted-blobs", "budgeted-one-round",
         "budgeted-", "pool", "pool-", "all-labels", "whitebox-kd")


def _method_order(m: str) -> int:
    return next(i for i, p in enumerate(ORDER) if m == p or (p.endswith("-") and m.startswith(p)))


def budget_tables(doc: dict) -> str:
    recs = doc["records"]
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in recs):
        rows = [r for r in recs if r["dataset"] == dataset]
        budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
        methods = sorted(dict.fromkeys(r["method"] for r in rows), key=_method_order)
        acc: dict[tuple, list[float]] = defaultdict(list)
        fid: dict[tuple, list[float]] = defaultdict(list)
        for r in rows:
            acc[(r["method"], r["budget"])].append(r["test_acc"])
            fid[(r["method"], r["budget"])].append(r["fidelity"])
        teacher = rows[0]["teacher_acc"]
        out += [f"### {dataset} (teacher {teacher:.2f}%)", "",
                "Test accuracy (%), mean ± sd over seeds; fidelity (agreement with the teacher on the test set) "
                "in parentheses.", "",
                "| method | " + " | ".join(f"{b:,} queries" for b in budgets) + " | no budget |",
                "|---|" + "---:|" * (len(budgets) + 1)]
        for m in methods:
            cells = []
            for b in budgets + [None]:
                a, f = acc.get((m, b), []), fid.get((m, b), [])
                cells.append(f"{_cell(a)} ({statistics.mean(f):.1f})" if a else "")
            out.append(f"| `{m}` | " + " | ".join(cells) + " |")
        for name, b, v in QUOTED.get(dataset, []):
            cells = [v if b == x else "" for x in budgets] + ["" if b in budgets else v]
            if b is not None and b not in budgets:
                name = f"{name}, {b:,} queries"
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        seeds = sorted({r["seed"] for r in rows})
        wall = max(r["wall_s"] for r in rows)
        threads = " or ".join(map(str, sorted({r.get("threads", 1) for r in rows})))
        out += ["", f"Seeds: {', '.join(map(str, seeds))}; the longest cell took {wall:,.0f} s; each cell ran on "
                f"{threads} thread(s) (the record says which: the same seed can end a few points apart on another "
                "thread count).", ""]
    return "\n".join(out)


def recipes() -> dict[str, str]:
    """settings_key -> name of the budgeted student's recipes: v1 (the first defaults) and v2."""
    from zsdb3kd.budget import BudgetSettings

    return {BudgetSettings(recipe="v1").key(): "v1", BudgetSettings(recipe="v2").key(): "v2"}


def recipe_of(doc: dict) -> str:
    """Which recipe the ``budgeted`` records of ``doc`` ran: a record without a key predates the
    keys, which came before v2, so it ran v1."""
    names = recipes()
    found = {"v1" if r.get("settings_key") is None else names.get(r["settings_key"], "another")
             for r in doc["records"] if r["method"] == "budgeted"}
    return " and ".join(sorted(found)) or "none"


RECIPE_NOTE = {"v1": "recipe v1, the defaults until 2026-12-04 (`budgeted-v1` now); each `budgeted-<lever>` "
                     "row is one change to the recipe its pair below names (`against`: `budgeted`, v1, or "
                     "`budgeted-combo`, v2)",
               "v2": "recipe v2, the defaults since 2026-12-04 (`budgeted-combo` names the same settings)"}


def grid_block(doc: dict) -> str:
    """The commands that wrote a budget grid's records, the recipe its ``budgeted`` rows ran, then its tables."""
    commands = dict.fromkeys(r.get("command", doc["command"]) for r in doc["records"])
    used = recipe_of(doc)
    note = f"`budgeted` rows here: {RECIPE_NOTE.get(used, used)}.\n\n" if used != "none" else ""
    return "```bash\n" + "\n".join(commands) + "\n```\n\n" + note + budget_tables(doc)


def headline(doc: dict, v2: dict | None = None) -> str:
    """The README's table: the budgeted student and ``random`` at the budgets the field reports;
    with ``v2`` (a grid whose ``budgeted-combo`` rows ran recipe v2 with a retrained teacher), those too."""
    recs = doc["records"]
    want = {"fashion-mnist": (10_000, 50_000), "mnist": (20_000,), "cifar10": (10_000, 50_000)}
    lines = [f"| data | queries | random images (before) | budgeted student, recipe {recipe_of(doc)} (no data) | "
             "**recipe v2**, the default on one-channel images (no data; a retrained teacher) | best published (hard "
             "labels, no data) | budgeted, real unlabelled pool | all training images labelled |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for dataset, budgets in want.items():
        for b in budgets:
            cell = {}
            for m in ("random", "budgeted", "pool"):
                v = [r["test_acc"] for r in recs if r["dataset"] == dataset and r["method"] == m and r["budget"] == b]
                cell[m] = _cell(v)
            if not cell["budgeted"]:
                continue
            quoted = next((f"{n.replace(' (quoted)', '').replace(' (quoted, ResNet-18)', ' (ResNet-18)')} {v}"
                           for n, qb, v in QUOTED.get(dataset, []) if qb == b), "")
            refs = [r for r in recs if r["dataset"] == dataset and r["method"] == "all-labels"]
            ref = f"{_cell([r['test_acc'] for r in refs])} ({refs[0]['queries']:,} queries)" if refs else ""
            same = [r for r in (v2 or {}).get("records", []) if (r["dataset"], r["budget"]) == (dataset, b)]
            v = [r["test_acc"] for r in same if r["method"] == "budgeted-combo"]
            v1 = [r["test_acc"] for r in same if r["method"] in ("budgeted", "budgeted-v1")
                  and recipes().get(r.get("settings_key")) == "v1"]
            new = (f"**{_cell(v)}** ({len(v)} seed{'s' if len(v) > 1 else ''}; v1 with this teacher "
                   f"{statistics.mean(v1):.1f})" if v and v1 else f"**{_cell(v)}**" if v else "")
            lines.append(f"| {dataset} | {b:,} | {cell['random']} | {cell['budgeted']} | {new} | {quoted} | "
                         f"{cell['pool']} | {ref} |")
    return "\n".join(lines)


def scale_table(doc: dict) -> str:
    """The 1-vs-2-process soft-label stage and the full-scale projection (benchmarks/scale.py)."""
    lines = [f"```bash\npython benchmarks/{doc['command']}\n```", "",
             f"{doc['method']} soft labels for {doc['samples']} images x 9 targets, at most {doc['queries_per_pair']:,} "
             f"queries per pair, chunks of {doc['chunk_size']}; teacher raw forward rate "
             f"{doc['raw_forward_images_per_s']:,} images/s; {doc['cpu_count']} cores, load average "
             f"{doc['load_average'][0]:.1f} when it ran.", "",
             "| processes | threads each | queries | per rank | stage time (s) | queries/s |",
             "|---:|---:|---:|---|---:|---:|"]
    for r in doc["runs"]:
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['queries']:,} | "
                     f"{', '.join(f'{q:,}' for q in r['queries_per_rank'])} | {r['stage_s']:.1f} | "
                     f"{r['stage_queries_per_s']:,.0f} |")
    p = doc["projection_full_mnist_db3kd"]
    lines += ["", f"Sharded result equal to one process, bit for bit: {doc['sharded_equals_one_process']}. "
              f"Speed-up with 2 processes: {doc['speedup_2_processes']:.2f}x; with 2 threads in one process: "
              f"{doc['speedup_2_threads']:.2f}x. Engine at {doc['engine_over_raw'] * 100:.0f}% of the teacher's raw "
              "forward rate.", "",
              f"Projection for full MNIST DB3KD ({p['queries']:,} queries): {p['one_process_h']} h in one process "
              f"at the measured {p['per_query_s'] * 1e6:.0f} us per query; {p['ranks_like_this_h']} h on "
              f"{p['ranks']} ranks like the measured ones. GPUs: "
              + (f"{p['gpus_h']} h on {p['ranks']} GPUs." if p.get("gpus_h") else f"{p['gpu_queries_per_s']}.")]
    return "\n".join(lines)


def invariance_table(doc: dict) -> str:
    """How often the teacher keeps its label under a small transform (benchmarks/invariance.py)."""
    first = doc["records"][0]
    names = sorted((k for k in first if isinstance(first[k], dict)), key=lambda k: (k == "hflip", k))  # shifts first
    lines = [f"```bash\n{doc['command']}\n```", "",
             "| teacher | images | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for r in doc["records"]:
        lines.append(f"| {r['dataset']} | {r['images']} ({r['n']:,}) | "
                     + " | ".join(f"{r[k]['all']:.1f} (worst class {r[k]['worst_class']:.0f})" for k in names) + " |")
    return "\n".join(lines)


def whitebox_kd_table(doc: dict) -> str:
    """Hard labels against the teacher's logits on the quickstart's images (benchmarks/whitebox_kd.py),
    per number of training steps, each KD row paired by seed with ``ce`` trained alike."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in doc["records"]:
        by[(r["batch_size"], r["epochs"], r["variant"])].append(r)
    lines = [f"```bash\n{doc['command']}\n```", "",
             f"{doc['subset']} Fashion-MNIST training images, LeNet-5-half, 1 thread; teacher sha256 "
             f"`{doc['teacher_sha256'][:12]}`.", "",
             "| student | T | KL weight | batch | epochs | steps | seeds | test accuracy (%) | against `ce` trained alike |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (bs, ep, name), rs in sorted(by.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2] != "ce", kv[0][2])):
        base = {r["seed"]: r["test_acc"] for r in by.get((bs, ep, "ce"), [])}
        gaps = [r["test_acc"] - base[r["seed"]] for r in rs if r["seed"] in base and name != "ce"]
        gap = (f"{statistics.mean(gaps):+.2f}" + (f" ± {statistics.stdev(gaps):.2f}" if len(gaps) > 1 else "")
               if gaps else "")
        t, w = rs[0]["temperature"], rs[0]["kl_weight"]
        lines.append(f"| `{name}` | {'' if t is None else f'{t:g}'} | {'' if w is None else f'{w:g}'} | {bs} | {ep} | "
                     f"{rs[0]['steps']} | {len(rs)} | {_cell([r['test_acc'] for r in rs])} | {gap} |")
    return "\n".join(lines)


def paper_chain_table(doc: dict) -> str:
    """The paper's zero-shot chain scaled to a budget, beside random images and the budgeted student
    at the same budgets (the ``paper`` records of budget.json)."""
    recs = doc["records"]
    methods = ("paper", "random", "budgeted-off", "budgeted")
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in recs if r["method"] == "paper"):
        rows = [r for r in recs if r["dataset"] == dataset and r["method"] in methods]
        budgets = sorted({r["budget"] for r in rows if r["method"] == "paper"})
        out += [f"### {dataset} (teacher {rows[0]['teacher_acc']:.2f}%)", "",
                "| method | " + " | ".join(f"{b:,} queries" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
        for m in methods:
            cells = [_cell([r["test_acc"] for r in rows if r["method"] == m and r["budget"] == b]) for b in budgets]
            if any(cells):
                out.append(f"| `{m}` | " + " | ".join(cells) + " |")
        paper = [r for r in rows if r["method"] == "paper"]
        out += ["", "Seeds: " + ", ".join(sorted({str(r["seed"]) for r in paper})) + "; the paper chain's cells took "
                + ", ".join(f"{r['wall_s']:,.0f} s" for r in paper) + ".", ""]
    return "\n".join(out)


def boundary_table(doc: dict) -> str:
    """Median (and 90th-percentile) distance reached per query budget, as a ratio to the paper's MBD
    at the reference budget (benchmarks/boundary.py --out)."""
    ref, budgets = doc["reference"], [str(b) for b in doc["budgets"]]
    best = {b: min(r["median_ratio"][b] for r in doc["rows"]) for b in budgets}
    lines = [f"```bash\n{doc['command']}\n```", "",
             f"{doc['samples']} {doc['data']} test images x {doc['targets']} targets = {doc['pairs']} pairs, "
             f"{doc['threads']} thread(s). Reference: the paper-faithful MBD at {ref['queries_per_pair']:,} queries "
             f"per pair ({ref['queries']:,} queries, {ref['wall_s']:,.0f} s, median distance "
             f"{ref['median_distance']:.3f}). Cells: median over pairs of the distance reached within that many "
             "queries per pair, divided by the pair's reference distance (lower is better, best in bold); p90: the "
             "90th percentile of that ratio; KL (T = 20) and top-2 agreement compare the soft labels with the "
             "reference's.", "",
             "| estimator | " + " | ".join(f"{int(b):,}" for b in budgets)
             + " | p90, 2k | p90, 4k | KL, 1k | top-2, 1k | KL, 2k | top-2, 2k | wall to 4k (s) | q/s |",
             "|---|" + "---:|" * (len(budgets) + 8)]
    for r in doc["rows"]:
        med = [(f"**{r['median_ratio'][b]:.3f}**" if r["median_ratio"][b] == best[b] else f"{r['median_ratio'][b]:.3f}")
               for b in budgets]
        lines.append(f"| `{r['estimator']}` | " + " | ".join(med) + " | "
                     + " | ".join(f"{v:.3f}" for v in r["p90_ratio"].values())
                     + f" | {r['kl']['1000']:.4f} | {r['top2']['1000']:.2f} | {r['kl']['2000']:.4f} | "
                     f"{r['top2']['2000']:.2f} | {r['wall_s']:,.0f} | {r['queries'] / r['wall_s']:,.0f} |")
    if doc.get("reach"):
        lines += ["", f"Queries per pair to come within a factor of the reference (searched to "
                  f"{doc['reach'][0]['searched_to']:,}, in steps of 1,000):", "",
                  "| estimator | target | queries per pair | wall (s) |", "|---|---:|---:|---:|"]
        for r in doc["reach"]:
            hit = f"{r['queries_per_pair']:,}" if r["queries_per_pair"] else f"not reached ({r['median_at_end']:.3f}x)"
            wall = f"{r['wall_s']:,.0f}" if r["wall_s"] else ""
            lines.append(f"| `{r['estimator']}` | {r['target']:.2f}x | {hit} | {wall} |")
    return "\n".join(lines)


def _run_time(rep: dict) -> str:
    """How long the run took; for a rerun that reused stages, what they cost when they were made."""
    st = rep.get("stages")
    if not st or not st["reused"]:
        return f"the whole run took {rep['wall_time_s'] / 60:.1f} min"
    return (f"this report is a rerun that reused {len(st['reused'])} of its {len(st['reused']) + len(st['made'])} "
            f"stages; their training, synthesis and soft labels took {st['time_s'] / 60:.1f} min when they were made, "
            f"this invocation {rep['wall_time_s'] / 60:.1f} min")


def run_table(doc: dict) -> str:
    """The students of one ``zsdb3kd run`` (its report.json kept with ``--record``)."""
    rep = doc["report"]
    t, data = rep["teacher"], rep["data"]
    lines = [f"```bash\n{doc['command']}\n```", "",
             f"Mode {rep['mode']}, {data['name']}; teacher `{t['arch']}` {t['test_acc']:.2f}% test accuracy "
             f"({t['train_config']['epochs']} epochs); "
             + _run_time(rep)
             + f" on {rep['environment']['threads']} thread(s) (zsdb3kd {rep['environment']['zsdb3kd']}, torch "
             f"{rep['environment']['torch']}).", "",
             "| student | method | teacher queries | test acc (%) | train time (s) |", "|---|---|---:|---:|---:|"]
    best = max(s["test_acc"] for s in rep["students"] if s["total_queries"] is not None)
    for s in rep["students"]:
        q = f"{s['total_queries']:,}" if s["total_queries"] is not None else "logits"
        acc = f"**{s['test_acc']:.2f}**" if s["test_acc"] == best else f"{s['test_acc']:.2f}"
        lines.append(f"| {s['label']} | `{s['method']}` | {q} | {acc} | {s['train_time_s']:.0f} |")
    stages = [f"{m}: {r['total_queries']:,} queries in {r['wall_time_s']:.0f} s ({r['queries_per_s']:,.0f} q/s)"
              for m, r in rep.get("robustness", {}).items()]
    if stages:
        lines += ["", "Soft labels: " + "; ".join(stages) + "."]
    return "\n".join(lines)


def quickstart_table(doc: dict) -> str:
    """The README's short table of the quickstart run (kept as db3kd-fashion-mnist.json)."""
    lines = ["| student | what it is given | teacher queries | test accuracy |", "|---|---|---:|---:|"]
    for s in sorted(doc["report"]["students"], key=lambda s: -1 if s["total_queries"] is None else s["total_queries"]):
        q = f"{s['total_queries']:,}" if s["total_queries"] is not None else "- (logits)"
        lines.append(f"| `{s['method']}` | {s['label']} | {q} | {s['test_acc']:.1f}% |")
    return "\n".join(lines)


def record(run_dir: Path, page: str, command: str) -> Path:
    """Keep ``run_dir/report.json`` (the report of ``zsdb3kd run``) as ``docs/results/<page>.json``."""
    report = json.loads((run_dir / "report.json").read_text())
    out = RESULTS / f"{page}.json"
    out.write_text(json.dumps({"command": command, "report": report}, indent=1, sort_keys=True) + "\n")
    return out


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- generated:{name} --> block found")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def _pair_key(r: dict) -> tuple:
    """Runs that may be compared seed by seed: same data, budget, seed, thread count and
    teacher (its test accuracy; another teacher gives other labels, hence other students)."""
    return r["dataset"], r["budget"], r["seed"], r.get("threads", 1), r.get("teacher_acc")


def levers_table(doc: dict, recipe: list[dict], method: str = "budgeted") -> str:
    """Each lever of benchmarks/levers.py beside the recipe's run (``method`` in ``recipe``, the
    records of budget.json) on the same dataset, budget, seed, thread count and teacher: paired
    by seed."""
    base = {_pair_key(r): r["test_acc"] for r in recipe if r["method"] == method}
    commands = dict.fromkeys(r["command"] for r in doc["records"])
    lines = ["```bash", *commands, "```", "",
             "| lever | data | queries | seed | test acc. (%) | fidelity (%) | recipe, same seed (%) | difference |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    paired: dict[tuple, list[float]] = defaultdict(list)
    for r in sorted(doc["records"], key=lambda r: (r["method"], r["dataset"], r["budget"], r["seed"])):
        b = base.get(_pair_key(r))
        fid = "" if r.get("fidelity") is None else f"{r['fidelity']:.2f}"
        diff = "" if b is None else f"{r['test_acc'] - b:+.2f}"
        lines.append(f"| `{r['method']}` | {r['dataset']} | {r['budget']:,} | {r['seed']} | {r['test_acc']:.2f} | "
                     f"{fid} | {'' if b is None else f'{b:.2f}'} | {diff} |")
        if b is not None:
            paired[(r["method"], r["dataset"], r["budget"])].append(r["test_acc"] - b)
    lines += ["", "Mean difference from the recipe, paired by seed (points):", ""]
    lines += [f"* `{m}`, {d} at {b:,} queries: {_cell(v)} over {len(v)} seed(s)" for (m, d, b), v in paired.items()]
    return "\n".join(lines)


def priors_table(doc: dict, recipe: list[dict]) -> str:
    """benchmarks/priors.py: its run prototypes beside recipe v2 (``budgeted-combo`` of the
    retrained teacher's grid) and the recipe's mean over every seed of that budget; its
    ensembles of fresh final students as members and ensemble."""
    runs = {"records": [r for r in doc["records"] if "members" not in r]}
    ens = [r for r in doc["records"] if "members" in r]
    out = []
    if runs["records"]:
        out.append(levers_table(runs, recipe, method="budgeted-combo"))
        for d, b in sorted({(r["dataset"], r["budget"]) for r in runs["records"]}):
            v = [r["test_acc"] for r in recipe
                 if r["method"] == "budgeted-combo" and (r["dataset"], r["budget"]) == (d, b)]
            if v:
                out.append(f"* recipe v2 (`budgeted-combo`), {d} at {b:,} queries, every seed: {_cell(v)} "
                           f"({len(v)} seeds, {min(v):.2f} to {max(v):.2f})")
    if ens:
        lines = ["", "```bash", *dict.fromkeys(r["command"] for r in ens), "```", "",
                 "| run | data | labelled images | fresh students | each (%) | their mean (%) | ensemble (%) | "
                 "one student distilled from them (%) | fidelity (%), distilled or else ensemble |",
                 "|---|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in ens:
            together, one = (r["ensemble_acc"], f"{r['test_acc']:.2f}") if "ensemble_acc" in r else (r["test_acc"], "")
            lines.append(f"| `{r['method']}` | {r['dataset']} | {r['budget']:,} | {len(r['members'])} | "
                         f"{', '.join(f'{m:.2f}' for m in r['members'])} | {_cell(r['members'])} | "
                         f"{together:.2f} | {one} | {r['fidelity']:.2f} |")
        out.append("\n".join(lines))
    return "\n".join(out)


def _ablations() -> dict:
    """benchmarks/budget.py's ``ABLATIONS``: method suffix -> the settings it changes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_budget_benchmark", BUDGET_BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ABLATIONS


def against(r: dict, ablations: dict) -> str:
    """The row a ``budgeted-<x>`` record is paired with: ``budgeted-combo`` when its settings are
    recipe v2 with ``<x>``'s change (an ablation or lever measured while v2 was the default) or
    recipe v1 itself (``budgeted-v1``, run after v2 became the default), else ``budgeted``
    (recipe v1 with it, or a record that predates the settings keys)."""
    from zsdb3kd.budget import V1, BudgetSettings

    if r.get("settings_key") == BudgetSettings(**V1).key():  # v1 itself, beside the default it was replaced by
        return "budgeted-combo"
    change = ablations.get(r["method"][len("budgeted"):])
    if r.get("settings_key") is None or r["method"] == "budgeted-combo" or change is None:
        return "budgeted"
    on_v1 = BudgetSettings(recipe="v1").replace(**change).key()
    on_v2 = BudgetSettings(recipe="v2").replace(**change).key()
    return "budgeted-combo" if r["settings_key"] == on_v2 != on_v1 else "budgeted"


def paired_table(doc: dict) -> str:
    """Every ``budgeted-<x>`` row of a budget grid beside the recipe it changes (:func:`against`)
    on the same dataset, budget and seed: only pairs run on the same number of threads (another
    thread count buys other images) and with the same teacher, so a lever's gain is not confused
    with the spread between seeds."""
    ablations = _ablations()
    base = {(r["method"], *_pair_key(r)): r["test_acc"] for r in doc["records"]
            if r["method"] in ("budgeted", "budgeted-combo")}
    diffs: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in doc["records"]:
        if not r["method"].startswith("budgeted-"):
            continue
        ref = against(r, ablations)
        b = base.get((ref, *_pair_key(r)))
        if b is not None and ref != r["method"]:
            diffs[(r["dataset"], r["budget"], r["method"], ref)].append((r["test_acc"], b))
    if not diffs:
        return ""
    lines = ["| data | queries | lever | against | seeds | lever (%) | against, same seeds (%) | difference (points) | "
             "lever ahead |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    order = lambda kv: (kv[0][0], kv[0][1], kv[0][3], _method_order(kv[0][2]), kv[0][2])  # noqa: E731
    for (d, b, m, ref), v in sorted(diffs.items(), key=order):
        lever, refs = [a for a, _ in v], [c for _, c in v]
        gap = [a - c for a, c in v]
        lines.append(f"| {d} | {b:,} | `{m}` | `{ref}` | {len(v)} | {_cell(lever)} | {_cell(refs)} | "
                     f"{statistics.mean(gap):+.2f}{f' ± {statistics.stdev(gap):.2f}' if len(gap) > 1 else ''} | "
                     f"{sum(g > 0 for g in gap)} of {len(gap)} |")
    return "\n".join(lines)


def blocks() -> dict[Path, list[tuple[str, str]]]:
    """Every generated block: file -> [(block name, body)], from the JSON in docs/results/."""
    out: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for path in sorted(RESULTS.glob("*.json")):  # run reports kept with --record
        doc = json.loads(path.read_text())
        if "report" in doc:
            out[RESULTS / f"{path.stem}.md"].append(("run", run_table(doc)))
    if (RESULTS / "boundary-distances.json").exists():
        doc = json.loads((RESULTS / "boundary-distances.json").read_text())
        out[RESULTS / "boundary-distances.md"].append(("boundary", boundary_table(doc)))
    if (RESULTS / "db3kd-fashion-mnist.json").exists():
        doc = json.loads((RESULTS / "db3kd-fashion-mnist.json").read_text())
        out[ROOT / "README.md"].append(("quickstart", quickstart_table(doc)))
    if (RESULTS / "budget.json").exists():
        doc = json.loads((RESULTS / "budget.json").read_text())
        out[RESULTS / "budget.md"].append(("budget", grid_block(doc)))
        out[RESULTS / "budget.md"].append(("paired", paired_table(doc)))
        v2 = RESULTS / "budget-retrained-teacher.json"
        out[ROOT / "README.md"].append(("headline", headline(doc, json.loads(v2.read_text()) if v2.exists() else None)))
        if any(r["method"] == "paper" for r in doc["records"]):
            out[RESULTS / "zero-shot-paper-chain.md"].append(("paper-chain", paper_chain_table(doc)))
    for path in sorted(RESULTS.glob("budget-*.json")):  # the same grid measured with another teacher
        doc = json.loads(path.read_text())
        out[RESULTS / "budget.md"].append((path.stem, grid_block(doc) + "\n" + paired_table(doc)))
    if (RESULTS / "levers.json").exists() and (RESULTS / "budget.json").exists():
        recipe = json.loads((RESULTS / "budget.json").read_text())["records"]
        out[RESULTS / "levers.md"].append(("levers", levers_table(json.loads((RESULTS / "levers.json").read_text()),
                                                                  recipe)))
    if (RESULTS / "priors.json").exists() and (RESULTS / "budget-retrained-teacher.json").exists():
        recipe = json.loads((RESULTS / "budget-retrained-teacher.json").read_text())["records"]
        priors = json.loads((RESULTS / "priors.json").read_text())
        out[RESULTS / "levers.md"].append(("priors", priors_table(priors, recipe)))
    if (RESULTS / "invariance.json").exists():
        out[ROOT / "docs" / "budget.md"].append(("invariance",
                                                 invariance_table(json.loads((RESULTS / "invariance.json").read_text()))))
    if (RESULTS / "whitebox-kd.json").exists():
        out[RESULTS / "whitebox-kd.md"].append(("whitebox-kd",
                                                whitebox_kd_table(json.loads((RESULTS / "whitebox-kd.json").read_text()))))
    if (RESULTS / "scale.json").exists():
        out[RESULTS / "scale.md"].append(("scale", scale_table(json.loads((RESULTS / "scale.json").read_text()))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", nargs=2, metavar=("RUN_DIR", "PAGE"), help="keep RUN_DIR/report.json for PAGE first")
    ap.add_argument("--command", help="with --record: the command that produced the run")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is not what its JSON gives")
    args = ap.parse_args(argv)
    if args.record:
        if not args.command:
            ap.error("--record needs --command (the command that produced the run)")
        print(f"kept {record(Path(args.record[0]), args.record[1], args.command)}")
    stale = []
    for path, parts in blocks().items():
        text = old = path.read_text()
        for name, body in parts:
            text = replace_block(text, name, body)
        if text != old:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("not generated from their JSON: " + ", ".join(map(str, stale)) + " (run python scripts/results_pages.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
