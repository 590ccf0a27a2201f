"""Render the results pages and the README's headline table from the JSON the benchmarks wrote.

    python scripts/results_pages.py          # rewrites docs/results/budget.md and the README table

Each table is generated from ``docs/results/<name>.json`` (written by ``benchmarks/<name>.py``),
with the command that produced it, so a rerun of the benchmark followed by this script
refreshes the docs. Text between ``<!-- generated:NAME -->`` and ``<!-- /generated -->``
markers is replaced; everything else in a page is left as written.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

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


def budget_tables(doc: dict) -> str:
    recs = doc["records"]
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in recs):
        rows = [r for r in recs if r["dataset"] == dataset]
        budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
        methods = list(dict.fromkeys(r["method"] for r in rows))
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
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        seeds = sorted({r["seed"] for r in rows})
        wall = max(r["wall_s"] for r in rows)
        out += ["", f"Seeds: {', '.join(map(str, seeds))}; the longest cell took {wall:,.0f} s "
                f"({rows[0].get('threads', 1)} thread(s)).", ""]
    return "\n".join(out)


def headline(doc: dict) -> str:
    """The README's table: the budgeted student and ``random`` at the budgets the field reports."""
    recs = doc["records"]
    want = {"fashion-mnist": (10_000, 50_000), "mnist": (20_000,), "cifar10": (50_000,)}
    lines = ["| data | queries | random images (before) | **budgeted student** (no data) | best published (hard "
             "labels, no data) | budgeted, real unlabelled pool | all training images labelled |",
             "|---|---:|---:|---:|---|---:|---:|"]
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
            lines.append(f"| {dataset} | {b:,} | {cell['random']} | **{cell['budgeted']}** | {quoted} | "
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


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- generated:{name} --> block found")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main() -> int:
    budget = RESULTS / "budget.json"
    if budget.exists():
        doc = json.loads(budget.read_text())
        page = RESULTS / "budget.md"
        text = page.read_text()
        commands = dict.fromkeys(r.get("command", doc["command"]) for r in doc["records"])
        text = replace_block(text, "budget", "```bash\n" + "\n".join(commands) + "\n```\n\n" + budget_tables(doc))
        page.write_text(text)
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), "headline", headline(doc)))
    scale = RESULTS / "scale.json"
    if scale.exists():
        page = RESULTS / "scale.md"
        page.write_text(replace_block(page.read_text(), "scale", scale_table(json.loads(scale.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
