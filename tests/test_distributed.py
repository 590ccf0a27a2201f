"""Scale-out on PyTorch's own engine: real ``torchrun`` jobs of 2 CPU ranks (gloo) on 8x8 images.

The data are 8x8 noise images labelled by the shared linear teacher; the teacher the commands
query is a small MLP trained on them (one process, in this process). Every multi-process run is
a subprocess ``python -m torch.distributed.run --nproc-per-node 2 ... -m zsdb3kd ...`` on
127.0.0.1 with a free port; single-process references run in this process (one thread, as
torchrun's ranks). Each test takes a few seconds of two ranks' start-up plus well under a
minute of work. The CUDA tests at the end skip cleanly without a GPU.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import SHAPE, LinearTeacher
from safetensors.torch import load_file

from zsdb3kd.cli import main
from zsdb3kd.robustness import RobustnessResult
from zsdb3kd.synthesis import PseudoSamples

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

N_TRAIN, N_TEST, VAL = 2000, 500, 200
LAUNCH_TIMEOUT = 120  # seconds a torchrun job may take before the test fails (normally 5-10)


def _run(argv: list) -> tuple[int, str, str]:
    """``main(argv)`` in this process, output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list, nproc: int = 2, module: bool = True) -> subprocess.Popen:
    """A torchrun job of ``nproc`` CPU ranks running ``zsdb3kd args`` (or the script ``args[0]``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), *(["-m", "zsdb3kd"] if module else []),
           *[str(a) for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen, ok: bool = True) -> str:
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    if ok:
        assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """``data``: train.npz/test.npz of 8x8 noise labelled by the linear teacher; ``teacher``: an MLP
    trained on them with ``train-teacher``."""
    d = tmp_path_factory.mktemp("dist-data")
    t, g = LinearTeacher(), torch.Generator().manual_seed(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = torch.rand(n, *SHAPE, generator=g)
        with torch.no_grad():
            np.savez(d / f"{split}.npz", x=x[:, 0].numpy(), y=t(x).argmax(1).numpy())
    teacher = d / "T.safetensors"
    rc, _, err = _run(["train-teacher", *_data(d), "--arch", "mlp", "--epochs", "10", "--lr", "3e-3",
                         "--batch-size", "64", "--out", teacher, "--no-progress"])
    assert rc == 0, err
    return {"data": d, "teacher": teacher}


def _data(d: Path) -> list:
    return ["--data", "npz", "--data-root", d, "--val-size", VAL]


def _same_robustness(a: RobustnessResult, b: RobustnessResult) -> None:
    torch.testing.assert_close(a.distances, b.distances, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(a.queries, b.queries) and torch.equal(a.teacher_labels, b.teacher_labels)
    assert torch.equal(a.indices, b.indices)


def _same_pseudo(a: PseudoSamples, b: PseudoSamples) -> None:
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    torch.testing.assert_close(a.mean_distance, b.mean_distance, rtol=0, atol=0, equal_nan=True)
    assert sorted(a.snapshots) == sorted(b.snapshots)
    assert all(torch.equal(a.snapshots[k], b.snapshots[k]) for k in a.snapshots)


# ---------------------------------------------------------------------------------------
# the same bits for any number of ranks
# ---------------------------------------------------------------------------------------

ROB = ["--subset", 12, "--method", "hsja", "--queries-per-pair", 200, "--checkpoints", "100,200", "--chunk-size", 4,
       "--no-progress"]


def test_sharded_robustness_is_the_single_process_result_within_the_total_budget(files, tmp_path):
    """3 chunks on 2 ranks: rank 0 has twice rank 1's work, yet the budget of exactly the plan holds
    (the ranks' shares follow their work), only rank 0 writes, and the chunks are removed."""
    common = ["robustness", "--teacher", files["teacher"], *_data(files["data"]), *ROB]
    rc, _, err = _run([*common, "--out", tmp_path / "one.safetensors"])
    assert rc == 0, err
    one = RobustnessResult.load(tmp_path / "one.safetensors")
    planned = 12 * (1 + 3 * 200)
    _finish(_torchrun([*common, "--out", tmp_path / "two.safetensors", "--query-budget", planned]))
    two = RobustnessResult.load(tmp_path / "two.safetensors")
    _same_robustness(two, one)
    prov = two.provenance
    assert prov["ranks"] == 2 and len(prov["queries_per_rank"]) == 2 and min(prov["queries_per_rank"]) > 0
    assert prov["queries_this_session"] == sum(prov["queries_per_rank"]) == one.total_queries <= planned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]  # no .parts left


SYN = ["--per-class", 6, "--iterations", 3, "--snapshots", "0,1,3", "--queries-per-search", 60, "--search-k", 10,
       "--search-dirs", 2, "--noise-batch", 64, "--noise-queries", 5000, "--chunk-size", 5, "--no-progress"]


def test_sharded_synthesis_is_the_single_process_result(files, tmp_path):
    """24 samples in 5 chunks: the noise is sampled once (rank 0), the chunks are shared out, and
    the merged pseudo samples, snapshots and distance curve are the single process's bits."""
    common = ["synthesize", "--teacher", files["teacher"], *SYN]
    rc, _, err = _run([*common, "--out", tmp_path / "one.safetensors"])
    assert rc == 0, err
    one = PseudoSamples.load(tmp_path / "one.safetensors")
    _finish(_torchrun([*common, "--out", tmp_path / "two.safetensors", "--query-budget", 20_000]))
    two = PseudoSamples.load(tmp_path / "two.safetensors")
    _same_pseudo(two, one)
    prov = two.provenance
    assert prov["ranks"] == 2 and prov["total_queries"] == one.provenance["total_queries"]
    assert prov["queries_this_session"] == sum(prov["queries_per_rank"]) == prov["total_queries"]  # noise paid once
    assert not (tmp_path / "two.safetensors.parts").exists()


@pytest.mark.parametrize("budget, needs", [(7212, [4808, 2404]), (10_001, [300, 0, 4000]), (5000, [4000, 4000]),
                                           (100, [0, 0])])
def test_budget_shares_follow_the_work_and_never_add_up_to_more(budget, needs, monkeypatch):
    """``split_budget`` then ``pool_budget`` on each of ``len(needs)`` simulated ranks."""
    from types import SimpleNamespace

    from zsdb3kd import parallel

    size = len(needs)
    oracles = []
    for r in range(size):
        monkeypatch.setattr(parallel, "world", lambda r=r: (r, size))
        oracles.append(SimpleNamespace(budget=parallel.split_budget(budget), queries=0,
                                       remaining=parallel.split_budget(budget)))
    assert sum(o.budget for o in oracles) == budget
    rows = [(o.remaining, n) for o, n in zip(oracles, needs)]
    monkeypatch.setattr(parallel, "all_gather", lambda obj: rows)
    for r, o in enumerate(oracles):
        monkeypatch.setattr(parallel, "world", lambda r=r: (r, size))
        parallel.pool_budget(o, needs[r])
    shares = [o.budget for o in oracles]
    assert sum(shares) <= budget
    if budget >= sum(needs):
        assert all(s >= n for s, n in zip(shares, needs)) and sum(shares) == budget
    else:
        assert shares == [budget * n // sum(needs) for n in needs]


# ---------------------------------------------------------------------------------------
# a rank killed mid-run: the rerun resumes and asks nothing finished again
# ---------------------------------------------------------------------------------------


def _rank_pid(agent: int, rank: int, timeout: float = LAUNCH_TIMEOUT) -> int:
    """The pid of torchrun worker ``rank`` (a child of the agent ``agent`` with ``RANK=rank``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != agent:
                    continue
                env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(p)
        time.sleep(0.01)
    raise TimeoutError(f"no rank {rank} under torchrun agent {agent}")


def _kill_after(proc: subprocess.Popen, path: Path, rank: int) -> None:
    """SIGKILL torchrun worker ``rank`` as soon as ``path`` (its first chunk) exists; then the agent
    stops the other ranks and the job fails."""
    pid = _rank_pid(proc.pid, rank)
    end = time.monotonic() + LAUNCH_TIMEOUT
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < end, "the job ended before the chunk appeared"
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    _finish(proc, ok=False)
    assert proc.returncode != 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("command", ["robustness", "synthesize"])
def test_a_killed_rank_resumes_without_repeating_a_query(command, files, tmp_path):
    """Rank 1 is killed (kill -9) right after its first chunk is saved; torchrun stops rank 0. The
    rerun gives the single-process bits, and what it paid plus what it read from finished chunks
    is exactly the single-process total: no finished query is asked twice."""
    if command == "robustness":
        common = ["robustness", "--teacher", files["teacher"], *_data(files["data"]), "--subset", 40, "--method",
                  "hsja", "--queries-per-pair", 1000, "--checkpoints", 1000, "--chunk-size", 4, "--no-progress"]
        load, same = RobustnessResult.load, _same_robustness
    else:
        common = ["synthesize", "--teacher", files["teacher"], "--per-class", 10, "--iterations", 4,
                  "--queries-per-search", 150, "--search-k", 10, "--search-dirs", 2, "--noise-batch", 64,
                  "--noise-queries", 5000, "--chunk-size", 4, "--no-progress"]
        load, same = PseudoSamples.load, _same_pseudo
    rc, _, err = _run([*common, "--out", tmp_path / "one.safetensors"])
    assert rc == 0, err
    one = load(tmp_path / "one.safetensors")
    total = one.total_queries if command == "robustness" else one.provenance["total_queries"]
    out = tmp_path / "two.safetensors"
    parts = tmp_path / "two.safetensors.parts"
    _kill_after(_torchrun([*common, "--out", out]), parts / "chunk-00001.safetensors", rank=1)  # rank 1's first
    assert not out.exists()
    finished = sorted(p.name for p in parts.glob("chunk-*.safetensors"))
    assert "chunk-00001.safetensors" in finished and len(finished) < 10  # killed mid-run
    _finish(_torchrun([*common, "--out", out]))
    two = load(out)
    same(two, one)
    prov = two.provenance
    assert prov["chunks_reused"] == len(finished)
    assert prov["queries_reused_from_chunks"] > 0 and prov["queries_this_session"] > 0
    assert prov["queries_this_session"] + prov["queries_reused_from_chunks"] == total


# ---------------------------------------------------------------------------------------
# DistributedDataParallel training
# ---------------------------------------------------------------------------------------


def test_ddp_student_reaches_the_single_process_accuracy(files, tmp_path):
    common = ["distill", "--teacher", files["teacher"], *_data(files["data"]), "--method", "ce", "--student", "mlp",
              "--epochs", 6, "--batch-size", 64, "--lr", "3e-3", "--no-progress"]
    rc, out1, err = _run([*common, "--out", tmp_path / "one.safetensors"])
    assert rc == 0, err
    out2 = _finish(_torchrun([*common, "--out", tmp_path / "two.safetensors"]))

    def test_acc(text: str) -> float:
        return float(text.split("test ")[1].split("%")[0])

    one, two = test_acc(out1), test_acc(out2)
    assert one > 60  # the student learned (the teacher itself is about 70% right on these labels)
    # the same steps on the same batches, only summed in another order: within noise (measured: equal)
    assert abs(two - one) <= 2.0, (one, two)
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


WORKER = '''
import sys, torch
from zsdb3kd.distill import TrainSettings, train
from zsdb3kd.models import create_model
from zsdb3kd.parallel import finish, init_from_env, world

init_from_env("cpu")
rank, _ = world()
x, y, xv, yv = torch.load(sys.argv[1], weights_only=True)
torch.manual_seed(0)
model = create_model("cnn-small", num_classes=4, input_shape=(1, 8, 8))
res = train(model, x, y, xv, yv, TrainSettings(epochs=4, batch_size=50, lr=3e-3), seed=0, progress=False,
            checkpoint=sys.argv[2] + "/train.pt", checkpoint_every=0.0)
torch.save({"state": model.state_dict(), "best_epoch": res.best_epoch, "history": res.history},
           f"{sys.argv[2]}/rank{rank}.pt")
finish()  # leave the process group together: a rank exiting alone can abort its peer (SIGABRT)
'''


def test_ddp_ranks_select_the_same_epoch_and_end_with_the_same_model(tmp_path):
    """A BatchNorm student: each rank normalises its own rows, but rank 0's statistics and its
    validation accuracy decide for all, so both ranks end with the same weights and history."""
    t, g = LinearTeacher(), torch.Generator().manual_seed(2)
    x = torch.rand(600, *SHAPE, generator=g)
    y = t(x).argmax(1)
    torch.save((x[:500], y[:500], x[500:], y[500:]), tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    _finish(_torchrun([tmp_path / "worker.py", tmp_path / "data.pt", tmp_path], module=False))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["best_epoch"] == r1["best_epoch"] and r0["history"] == r1["history"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert not (tmp_path / "train.pt").exists()  # rank 0's checkpoint, removed at the end
    assert r0["history"][-1]["loss"] < r0["history"][0]["loss"]


# ---------------------------------------------------------------------------------------
# --device cuda (skipped without a GPU)
# ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("command", ["robustness", "synthesize", "distill"])
def test_commands_run_on_cuda(command, files, tmp_path):
    """Oracle, estimators, synthesis and training on the GPU: the same properties as on the CPU."""
    out = tmp_path / "out.safetensors"
    if command == "robustness":
        argv = ["robustness", "--teacher", files["teacher"], *_data(files["data"]), *ROB]
    elif command == "synthesize":
        argv = ["synthesize", "--teacher", files["teacher"], *SYN]
    else:
        argv = ["distill", "--teacher", files["teacher"], *_data(files["data"]), "--method", "ce", "--student",
                "cnn-small", "--epochs", 2, "--no-progress"]
    rc, _, err = _run([*argv, "--device", "cuda", "--out", out])
    assert rc == 0, err
    if command == "robustness":
        res = RobustnessResult.load(out)
        d = res.at()
        pairs = d[~torch.isnan(d)]  # nan: the teacher's own class
        assert pairs.numel() == 12 * 3 and torch.isfinite(pairs).float().mean() > 0.9
        assert res.total_queries <= 12 * (1 + 3 * 200)
    elif command == "synthesize":
        ps = PseudoSamples.load(out)
        from zsdb3kd.oracle import load_oracle

        assert torch.equal(load_oracle(str(files["teacher"]))(ps.x), ps.y)  # pushing kept every label
        assert float(ps.mean_distance[-1]) > float(ps.mean_distance[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sharded_robustness_on_two_gpus_is_the_one_gpu_result(files, tmp_path):
    common = ["robustness", "--teacher", files["teacher"], *_data(files["data"]), *ROB, "--device", "cuda"]
    rc, _, err = _run([*common, "--out", tmp_path / "one.safetensors"])
    assert rc == 0, err
    _finish(_torchrun([*common, "--out", tmp_path / "two.safetensors"]))
    _same_robustness(RobustnessResult.load(tmp_path / "two.safetensors"),
                     RobustnessResult.load(tmp_path / "one.safetensors"))


def test_budgeted_student_on_two_ranks_is_the_single_process_student(files, tmp_path):
    """Every rank runs the same rounds and asks half of each call: the same student bits as one
    process, the budget paid exactly once over the ranks, and a rerun pays nothing."""
    common = ["extract", "--teacher", files["teacher"], "--budget", 300, "--student", "mlp", "--no-evaluate",
              "--rounds", 2, "--epochs-per-round", 1, "--final-epochs", 2, "--pool-factor", 2, "--batch-size", 32]
    rc, _, err = _run([*common, "--out", tmp_path / "one.safetensors"])
    assert rc == 0, err
    _finish(_torchrun([*common, "--out", tmp_path / "two.safetensors", "--query-budget", 300]))
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    m = json.loads((tmp_path / "two.safetensors.json").read_text())
    assert m["queries"] == m["paid_this_run"] == sum(m["paid_per_rank"]) == 300 and min(m["paid_per_rank"]) == 150
    _finish(_torchrun([*common, "--out", tmp_path / "two.safetensors"]))
    again = json.loads((tmp_path / "two.safetensors.json").read_text())
    assert again["paid_this_run"] == 0 and again["paid_per_rank"] == [0, 0]
