"""The ``zsdb3kd`` command: a thin layer, one library call per subcommand.

``main(argv=None) -> int`` so tests call it directly. Errors a user can act on
(bad paths, shapes, budgets, configs) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2
_TEACHER_HELP = "teacher weights (.safetensors/.pt), .onnx, or the http(s):// URL of a label server ('zsdb3kd serve')"


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _kv(text: str) -> dict:
    """``k=v,k2=v2`` with numbers parsed: estimator options."""
    out = {}
    for item in filter(None, text.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist", help="dataset: mnist, fashion-mnist, cifar10, folder, npz")
    p.add_argument("--data-root", default=None, help="dataset directory (or .npz file); default per dataset")
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for model selection")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zsdb3kd", description="Distil a label-only teacher into a student (DB3KD / ZSDB3KD).")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run or resume a whole experiment from a TOML config")
    p.add_argument("config", help="experiment file, e.g. configs/fashion-mnist/db3kd/lenet5-half_from_lenet5.toml")
    p.add_argument("--run-dir", default=None, help="where artifacts go (default runs/<name>)")
    p.add_argument("--force", action="store_true", help="accept a run directory that holds another configuration")
    p.add_argument("--plan", action="store_true",
                   help="print the most teacher queries each stage can spend, then exit without running anything")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train-teacher", help="train a registry model with cross-entropy")
    _add_data(p)
    _add_common(p)
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--augment", default="none", choices=["none", "flip-crop"],
                   help="flip-crop: random mirror and 4-pixel shift of each training image (for CIFAR-10)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")

    p = sub.add_parser("robustness", help="boundary distances (SD/BD/MBD) of samples to every other class")
    _add_data(p)
    _add_common(p)
    p.add_argument("--teacher", required=True, help=_TEACHER_HELP)
    p.add_argument("--arch", default=None, help="architecture of a plain .pt state_dict teacher")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--pseudo", default=None,
                   help="zero-shot: label the pseudo samples of this file (from 'synthesize') instead of --data")
    p.add_argument("--subset", type=int, default=None, help="number of samples (deterministic under --seed)")
    p.add_argument("--method", default="mbd",
                   help="estimator preset: sd, bd, mbd (the paper's settings), hsja, hsja-sub, hsja-sub-circle, "
                        "hybrid (the most query-efficient from 1,000 queries per pair)")
    p.add_argument("--budget", type=int, default=20000, help="queries per (sample, target) pair")
    p.add_argument("--checkpoints", type=_ints, default=None, help="budgets to record, e.g. 1000,2000,4000")
    p.add_argument("--options", type=_kv, default={}, help="estimator options, e.g. k=100,n_dirs=50")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--allocation", default="uniform", choices=["uniform", "nearest"],
                   help="nearest: rank targets with --rank-fraction of the budget, give the rest to the --top-k nearest")
    p.add_argument("--rank-fraction", type=float, default=0.25)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--query-budget", type=int, default=None, help="total teacher queries allowed")
    p.add_argument("--out", required=True, help="result file (.safetensors); <out>.parts/ keeps chunks for resume")

    p = sub.add_parser("synthesize", help="zero-shot pseudo samples from noise (no real data)")
    _add_common(p)
    p.add_argument("--teacher", required=True, help=_TEACHER_HELP)
    p.add_argument("--arch", default=None)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--snapshots", type=_ints, default=None, help="rounds to keep, e.g. 0,5,10")
    p.add_argument("--step", type=float, default=0.5, help="L2 step away from the nearest boundary")
    p.add_argument("--search-budget", type=int, default=300, help="queries per sample per round")
    p.add_argument("--search", default="hsja", choices=["hsja", "signopt"])
    p.add_argument("--noise", default="mixed", choices=["paper", "smooth", "mixed"])
    p.add_argument("--noise-budget", type=int, default=2_000_000)
    p.add_argument("--query-budget", type=int, default=None, help="total teacher queries allowed")
    p.add_argument("--out", required=True, help="pseudo-sample file (.safetensors); <out>.parts/ keeps state")

    p = sub.add_parser("soft-labels", help="teacher logits from a robustness file")
    p.add_argument("robustness", help="file written by 'zsdb3kd robustness'")
    p.add_argument("--budget", type=int, default=None, help="use distances at this many queries per pair")
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--out", required=True, help=".safetensors with logits (N, K), soft (N, K), indices, labels")

    p = sub.add_parser("distill", help="train a student: ce, whitebox-kd, from soft labels, or on random images")
    _add_data(p)
    _add_common(p)
    p.add_argument("--teacher", required=True, help=_TEACHER_HELP)
    p.add_argument("--method", default="soft", choices=["ce", "whitebox-kd", "soft", "random"],
                   help="random (zero-shot): random images labelled by the teacher, one query each")
    p.add_argument("--robustness", default=None, help="robustness file (method soft)")
    p.add_argument("--budget", type=int, default=None, help="queries per pair at which to read distances")
    p.add_argument("--subset", type=int, default=None, help="training images (method ce/whitebox-kd)")
    p.add_argument("--pseudo", default=None, help="zero-shot: train on this pseudo-sample file (methods soft, ce); "
                   "a held-out slice of it selects the model; only the real test split is read")
    p.add_argument("--val-fraction", type=float, default=0.1, help="zero-shot: held-out share of pseudo samples")
    p.add_argument("--random-kind", default="smooth", choices=["smooth", "paper", "mixed", "uniform"],
                   help="method random: the images (smooth: low-frequency blobs)")
    p.add_argument("--random-samples", type=int, default=1_000_000, help="method random: images, incl. held out")
    p.add_argument("--random-val", type=int, default=10_000, help="method random: held out for model selection")
    p.add_argument("--labels-dir", default=None, help="method random: where the teacher's labels are kept, so a "
                   "rerun asks nothing again (default: <out>.labels)")
    p.add_argument("--query-budget", type=int, default=None, help="method random: cap on teacher queries")
    p.add_argument("--student", default="lenet5-half")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--augment", default="none", choices=["none", "flip-crop"],
                   help="flip-crop: random mirror and 4-pixel shift; an image's soft label goes with its copies")
    p.add_argument("--out", required=True)

    p = sub.add_parser("evaluate", help="test accuracy of a weights file, ONNX model or teacher URL")
    _add_data(p)
    p.add_argument("model")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("serve", help="serve a teacher as a label-only HTTP black box (for --teacher http://...)")
    p.add_argument("teacher", help="teacher weights (.safetensors/.pt) or .onnx")
    p.add_argument("--arch", default=None, help="architecture of a plain .pt state_dict teacher")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--max-queries", type=int, default=None, help="quota: refuse requests once this many are answered")
    p.add_argument("--max-batch", type=int, default=1024, help="largest number of images in one request")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log", action="store_true", help="log every request to stderr")
    p.epilog = ("Set ZSDB3KD_SERVE_TOKEN to require 'Authorization: Bearer <token>' (clients: ZSDB3KD_HTTP_AUTH). "
                "Only labels leave the server.")

    p = sub.add_parser("export-onnx", help="export weights to ONNX (to serve or test as a black box)")
    p.add_argument("weights")
    p.add_argument("--out", required=True)

    sub.add_parser("list-models", help="registered architectures")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .data import DataError
    from .oracle import OracleError, QueryBudgetExceeded
    from .pipeline import ConfigError
    from .synthesis import SynthesisError
    from .weights import WeightsError

    restore = _sigterm_interrupts() if args.command != "serve" else None  # serve stops on SIGTERM its own way
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, DataError, WeightsError, QueryBudgetExceeded, SynthesisError, FileNotFoundError,
            ValueError, OracleError) as e:
        print(f"zsdb3kd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"zsdb3kd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if restore is not None:
            restore()


def _sigterm_interrupts():
    """Make SIGTERM (``kill``, a job scheduler's stop) interrupt like Ctrl-C, so long jobs
    save their finished work before exiting. Returns a function that undoes it (or None
    outside the main thread, where signals cannot be handled)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _progress(args) -> bool | None:
    return False if getattr(args, "no_progress", False) else None


def _cmd_run(args) -> int:
    from .pipeline import format_plan, plan_experiment, run_experiment

    if args.plan:
        cfg, rows = plan_experiment(args.config)
        print(format_plan(cfg, rows))
        return 0

    report = run_experiment(args.config, args.run_dir, progress=_progress(args), force=args.force)
    for r in report["students"]:
        print(f"{r['method']:>14}  test {r['test_acc']:6.2f}%  queries {r.get('total_queries') or '-'}")
    return 0


def _cmd_train_teacher(args) -> int:
    from .distill import TrainConfig
    from .pipeline import load_splits, train_teacher

    splits = load_splits(args.data, args.data_root, args.val_size, args.seed)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, augment=args.augment,
                      seed=args.seed)
    m = train_teacher(splits, args.arch, args.out, cfg, device=args.device, progress=_progress(args))
    print(f"{args.arch}: val {m['val_acc']:.2f}%  test {m['test_acc']:.2f}%  -> {args.out}")
    return 0


def _cmd_robustness(args) -> int:
    import torch

    from .data import load_dataset
    from .oracle import load_oracle, teacher_sha256
    from .pipeline import choose_subset, load_splits
    from .robustness import CandidatePool, RobustnessSettings
    from .robustness.engine import PAPER_CHECKPOINTS, compute_to_file

    oracle = load_oracle(args.teacher, device=args.device, budget=args.query_budget, arch=args.arch)
    if args.pseudo:  # zero-shot: no real data is loaded at all
        from .synthesis import PseudoSamples

        ps = PseudoSamples.load(args.pseudo)
        idx = choose_subset(len(ps.y), args.subset, args.seed) if args.subset is not None else torch.arange(len(ps.y))
        x, pool_x, pool_y, src_name = ps.x[idx], ps.x, ps.y, f"pseudo:{args.pseudo}"
    else:
        splits = load_splits(args.data, args.data_root, args.val_size, args.seed)
        src = splits.train if args.split == "train" else splits.test
        idx = choose_subset(len(src), args.subset, args.seed) if args.subset is not None else torch.arange(len(src))
        x, pool_x, pool_y, src_name = src.x[idx], splits.train.x, splits.train.y, src.name
    cps = tuple(args.checkpoints) if args.checkpoints else tuple(c for c in PAPER_CHECKPOINTS if c <= args.budget)
    settings = RobustnessSettings(method=args.method, budget=args.budget, checkpoints=cps, seed=args.seed,
                                  chunk_size=args.chunk_size, options=args.options, allocation=args.allocation,
                                  rank_fraction=args.rank_fraction, top_k=args.top_k)
    pool = CandidatePool(pool_x.to(args.device), pool_y.to(args.device))
    out = Path(args.out)
    res = compute_to_file(out, oracle, x.to(args.device), settings, pool=pool, indices=idx, progress=_progress(args),
                          provenance={"teacher": args.teacher, "teacher_sha256": teacher_sha256(args.teacher, oracle),
                                      "data": src_name, "split": "pseudo" if args.pseudo else args.split})
    d = res.distances[:, :, -1]
    finite = d[torch.isfinite(d)]
    print(f"{len(idx)} samples, median distance {finite.median():.4f} at {settings.budget} queries/pair, "
          f"{res.total_queries:,} queries, {res.provenance['queries_per_s']:,.0f} q/s -> {out}")
    return 0


def _cmd_soft_labels(args) -> int:
    from safetensors.torch import save_file

    from .robustness import RobustnessResult
    from .softlabels import logits_from_distances, soft_targets

    res = RobustnessResult.load(args.robustness)
    budget = args.budget if args.budget is not None else int(res.checkpoints[-1])
    z = logits_from_distances(res.at(budget), res.teacher_labels)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": z.contiguous(), "soft": soft_targets(z, args.temperature).contiguous(),
               "indices": res.indices.contiguous(), "teacher_labels": res.teacher_labels.contiguous()}, args.out,
              metadata={"format": "zsdb3kd-soft-labels", "budget": str(budget), "temperature": str(args.temperature),
                        "source": str(args.robustness)})
    print(f"{z.shape[0]} soft labels at {budget} queries/pair -> {args.out}")
    return 0


def _cmd_distill(args) -> int:
    import torch

    from .distill import TrainConfig
    from .oracle import is_url, load_oracle
    from .pipeline import choose_subset, distill_student, load_splits, teacher_logits_whitebox
    from .robustness import RobustnessResult
    from .softlabels import logits_from_distances

    if args.method == "random":
        return _distill_random(args)
    if args.pseudo:
        return _distill_zero_shot(args)
    splits = load_splits(args.data, args.data_root, args.val_size, args.seed)
    tl = None
    if args.method == "soft":
        if not args.robustness:
            raise ValueError("--method soft needs --robustness FILE (from 'zsdb3kd robustness')")
        res = RobustnessResult.load(args.robustness)
        idx = res.indices
        if res.provenance.get("split", "train") != "train" or int(idx.max()) >= len(splits.train):
            raise ValueError(f"{args.robustness} does not index this training split (same --data/--val-size/--seed?)")
        tl = logits_from_distances(res.at(args.budget if args.budget is not None else int(res.checkpoints[-1])), res.teacher_labels)
    else:
        idx = choose_subset(len(splits.train), args.subset, args.seed) if args.subset is not None else torch.arange(len(splits.train))
    sub = splits.train.subset(idx)
    y = sub.y
    if args.method == "ce":
        y = load_oracle(args.teacher, device=args.device)(sub.x.to(args.device)).cpu()
    elif args.method == "whitebox-kd":
        if is_url(args.teacher):
            raise ValueError("--method whitebox-kd reads the teacher's logits, so it needs its weights file, not a URL")
        tl = teacher_logits_whitebox(args.teacher, sub.x, args.device)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, temperature=args.temperature,
                      augment=args.augment, seed=args.seed)
    m = distill_student(args.student, sub.x, y, (splits.val.x, splits.val.y), (splits.test.x, splits.test.y), cfg,
                        args.out, teacher_logits=tl, num_classes=len(splits.train.classes), device=args.device,
                        desc=f"student[{args.method}]", progress=_progress(args), extra={"method": args.method})
    print(f"{args.student} ({args.method}): val {m['val_acc']:.2f}%  test {m['test_acc']:.2f}%  -> {args.out}")
    return 0


def _distill_random(args) -> int:
    """Zero-shot student on random images labelled by the teacher; only the test split is read."""
    from .data import load_dataset
    from .distill import TrainConfig
    from .oracle import load_oracle
    from .pipeline import distill_student
    from .synthesis import label_random_images

    if args.pseudo or args.robustness:
        raise ValueError("--method random takes neither --pseudo nor --robustness")
    if not 1 <= args.random_val < args.random_samples:
        raise ValueError(f"need 1 <= --random-val < --random-samples, got {args.random_val}, {args.random_samples}")
    oracle = load_oracle(args.teacher, device=args.device, budget=args.query_budget)
    test = load_dataset(args.data, args.data_root, "test")
    if tuple(test.x.shape[1:]) != tuple(oracle.input_shape):
        raise ValueError(f"test images have shape {tuple(test.x.shape[1:])}, the teacher expects {oracle.input_shape}")
    labels_dir = args.labels_dir or f"{args.out}.labels"
    x, y = label_random_images(oracle, args.random_kind, args.random_samples, args.seed, device=args.device,
                               work_dir=labels_dir, progress=_progress(args))
    n = args.random_samples - args.random_val
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, temperature=args.temperature,
                      augment=args.augment, seed=args.seed)
    m = distill_student(args.student, x[:n], y[:n], (x[n:], y[n:]), (test.x, test.y), cfg, args.out,
                        num_classes=len(test.classes), device=args.device, desc="student[random]",
                        progress=_progress(args),
                        extra={"method": f"random-{args.random_kind}", "teacher_queries": str(oracle.queries)})
    print(f"{args.student} (random {args.random_kind}, {n:,} images, {oracle.queries:,} new teacher queries): "
          f"val {m['val_acc']:.2f}% (held-out random images)  test {m['test_acc']:.2f}%  -> {args.out}")
    return 0


def _distill_zero_shot(args) -> int:
    import torch

    from .data import load_dataset, train_val_split
    from .distill import TrainConfig
    from .pipeline import distill_student
    from .robustness import RobustnessResult
    from .softlabels import logits_from_distances
    from .synthesis import PseudoSamples

    if args.method == "whitebox-kd":
        raise ValueError("--pseudo supports --method soft or ce")
    ps = PseudoSamples.load(args.pseudo)
    test = load_dataset(args.data, args.data_root, "test")
    if args.method == "soft":
        if not args.robustness:
            raise ValueError("--method soft needs --robustness FILE (from 'zsdb3kd robustness --pseudo')")
        res = RobustnessResult.load(args.robustness)
        if res.provenance.get("split") != "pseudo":
            raise ValueError(f"{args.robustness} was not computed on pseudo samples ('robustness --pseudo')")
        z = logits_from_distances(res.at(args.budget if args.budget is not None else int(res.checkpoints[-1])),
                                  res.teacher_labels)
        logits = torch.zeros(len(ps.y), z.shape[1])
        have = torch.zeros(len(ps.y), dtype=torch.bool)
        logits[res.indices], have[res.indices] = z, True
    tr, va = train_val_split(ps.y, args.val_fraction, args.seed)
    if args.method == "soft":
        tr = tr[have[tr]]
    tl = logits[tr] if args.method == "soft" else None
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, temperature=args.temperature,
                      augment=args.augment, seed=args.seed)
    m = distill_student(args.student, ps.x[tr], ps.y[tr], (ps.x[va], ps.y[va]), (test.x, test.y), cfg, args.out,
                        teacher_logits=tl, num_classes=len(test.classes), device=args.device,
                        desc=f"student[zero-shot {args.method}]", progress=_progress(args),
                        extra={"method": f"zero-shot-{args.method}"})
    print(f"{args.student} (zero-shot {args.method}): val {m['val_acc']:.2f}% (pseudo)  test {m['test_acc']:.2f}%"
          f"  -> {args.out}")
    return 0


def _cmd_synthesize(args) -> int:
    from .oracle import load_oracle
    from .synthesis import SynthesisSettings, synthesize

    oracle = load_oracle(args.teacher, device=args.device, budget=args.query_budget, arch=args.arch)
    snaps = tuple(args.snapshots) if args.snapshots else tuple(sorted({0, args.iterations // 2, args.iterations}))
    settings = SynthesisSettings(per_class=args.per_class, iterations=args.iterations, snapshots=snaps,
                                 step=args.step, search_budget=args.search_budget, search=args.search,
                                 noise=args.noise, noise_budget=args.noise_budget, seed=args.seed)
    out = Path(args.out)
    parts = out.with_name(out.name + ".parts")
    ps = synthesize(oracle, settings, device=args.device, work_dir=parts, progress=_progress(args))
    ps.save(out)
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    curve = ", ".join(f"{v:.3f}" for v in ps.mean_distance.tolist())
    print(f"{len(ps.y)} pseudo samples, {ps.provenance['total_queries']:,} queries, mean boundary distance per "
          f"round: {curve} -> {out}")
    return 0


def _cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .oracle import load_oracle

    test = load_dataset(args.data, args.data_root, "test")
    oracle = load_oracle(args.model, device=args.device)
    acc = float((oracle(test.x.to(args.device)).cpu() == test.y).float().mean() * 100)
    print(f"{args.model}: test accuracy {acc:.2f}% on {len(test)} images of {test.name}")
    return 0


def _cmd_serve(args) -> int:
    from .oracle import load_oracle, teacher_sha256
    from .serve import make_server, serve_forever

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queries is not None and args.max_queries < 0:
        raise ValueError(f"--max-queries must be >= 0, got {args.max_queries}")
    oracle = load_oracle(args.teacher, device=args.device, budget=args.max_queries, arch=args.arch)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.log else None
    try:
        server = make_server(oracle, args.host, args.port, max_batch=args.max_batch,
                             model_sha256=teacher_sha256(args.teacher, oracle),
                             token=os.environ.get("ZSDB3KD_SERVE_TOKEN") or None, log=log)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    quota = "no quota" if args.max_queries is None else f"quota {args.max_queries:,} queries"
    token = "token required" if os.environ.get("ZSDB3KD_SERVE_TOKEN") else "no token"
    print(f"serving {args.teacher} (labels only, {quota}, {token}) at {server.url} ; Ctrl-C to stop", flush=True)
    serve_forever(server)
    return 0


def _cmd_export_onnx(args) -> int:
    from .export import export_onnx

    path = export_onnx(args.weights, args.out)
    print(f"-> {path}")
    return 0


def _cmd_list_models(args) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


_COMMANDS = {
    "run": _cmd_run,
    "train-teacher": _cmd_train_teacher,
    "robustness": _cmd_robustness,
    "synthesize": _cmd_synthesize,
    "soft-labels": _cmd_soft_labels,
    "distill": _cmd_distill,
    "evaluate": _cmd_evaluate,
    "serve": _cmd_serve,
    "export-onnx": _cmd_export_onnx,
    "list-models": _cmd_list_models,
}
