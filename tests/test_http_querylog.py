"""The query log: every oracle answers images it has already paid for from a persistent,
append-only file, and asks the teacher once per distinct image; ``queries`` counts what the
caller got (so a resumed run's accounting equals an uninterrupted one's), ``paid`` what the
teacher was asked. The log survives a kill -9 mid-append.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import SHAPE, LinearTeacher
from test_server_support import TESTS

from zsdb3kd.oracle import FunctionOracle, OracleError, QueryBudgetExceeded, TorchOracle
from zsdb3kd.oracle.querylog import MAGIC, RECORD, QueryLog

K = 4


class Counting(LinearTeacher):
    def __init__(self) -> None:
        super().__init__(seed=3, k=K)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return super().forward(x)


def oracle(log, model=None, **kw):
    kw.setdefault("teacher_id", "linear-3")
    return TorchOracle(model or Counting(), SHAPE, K, query_log=log, max_batch=8, **kw)


def x_(n, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_logged_images_are_answered_from_the_log_and_a_rerun_pays_nothing(tmp_path):
    log = tmp_path / "q.log"
    a = oracle(log)
    x = x_(20)
    labels = a(x)
    assert (a.queries, a.paid, a._TorchOracle__model.seen) == (20, 20, 20)
    assert torch.equal(a(x[5:15]), labels[5:15])  # a repeat within the run
    assert (a.queries, a.paid) == (30, 20)
    b = oracle(log)  # a rerun
    mixed = torch.cat([x, x_(4, seed=1)])
    assert torch.equal(b(mixed)[:20], labels)
    assert (b.queries, b.paid, b._TorchOracle__model.seen) == (24, 4, 4)
    assert b.log_stats() == {"path": str(log), "records": 24, "hits": 20, "appended": 4, "dropped": 0,
                             "queries": 24, "paid": 4}


def test_repeats_within_one_batch_are_asked_once_and_the_order_is_kept(tmp_path):
    a = oracle(tmp_path / "q.log")
    x = x_(6)
    batch = x[[0, 1, 0, 2, 1, 5, 5, 3]]
    expected = LinearTeacher(seed=3, k=K)(batch).argmax(1)
    assert torch.equal(a(batch), expected)
    assert (a.queries, a.paid) == (8, 5)


def test_budgets_count_answers_from_the_log_like_any_other(tmp_path):
    log = tmp_path / "q.log"
    oracle(log)(x_(10))
    b = oracle(log, budget=12)
    b(x_(10))
    with pytest.raises(QueryBudgetExceeded):
        b(x_(3, seed=1))
    assert (b.queries, b.paid) == (10, 0)


def test_a_failing_teacher_keeps_what_it_answered(tmp_path):
    log = tmp_path / "q.log"
    calls = []

    def teacher(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise OracleError("gone")
        return LinearTeacher(seed=3, k=K)(x).argmax(1)

    a = FunctionOracle(teacher, SHAPE, K, query_log=log, max_batch=4, teacher_id="linear-3")
    x = x_(16)
    with pytest.raises(OracleError):
        a(x)
    assert (a.queries, a.paid, a.log_stats()["records"]) == (8, 8, 8)
    b = FunctionOracle(lambda x: LinearTeacher(seed=3, k=K)(x).argmax(1), SHAPE, K, query_log=log, max_batch=4,
                       teacher_id="linear-3")
    b(x)
    assert (b.queries, b.paid) == (16, 8)


def test_teachers_do_not_share_answers(tmp_path):
    log = tmp_path / "q.log"
    x = x_(5)
    oracle(log, teacher_id="one")(x)
    two = oracle(log, teacher_id="two")
    two(x)
    assert two.paid == 5
    assert oracle(log, teacher_id="one").teacher_id == "one"
    plain = TorchOracle(Counting(), SHAPE, K, query_log=log)
    assert plain.teacher_id == f"TorchOracle:{SHAPE}:{K}"
    with pytest.warns(UserWarning, match="one log per teacher"):
        plain(x)


def test_a_torn_tail_is_ignored_and_cut_and_bad_records_are_skipped(tmp_path):
    log = tmp_path / "q.log"
    oracle(log)(x_(10))
    size = log.stat().st_size
    assert size == len(MAGIC) + 10 * RECORD.itemsize
    with open(log, "ab") as f:
        f.write(b"\x01" * 11)  # a record torn by a kill
    with open(log, "r+b") as f:  # and one record zeroed (a crash on a filesystem that zero-fills)
        f.seek(len(MAGIC) + 3 * RECORD.itemsize)
        f.write(b"\0" * RECORD.itemsize)
    b = oracle(log)
    assert b.log_stats()["records"] == 9 and b.log_stats()["dropped"] == 1
    assert log.stat().st_size == size  # the torn tail was cut
    b(x_(10))
    assert b.paid == 1  # only the zeroed record is asked again
    assert log.stat().st_size == size + RECORD.itemsize


def test_a_file_that_is_not_a_log_is_refused(tmp_path):
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"something else entirely, long enough")
    with pytest.raises(ValueError, match="not a zsdb3kd query log"):
        oracle(other)(x_(1))


_APPENDER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from zsdb3kd.oracle.querylog import QueryLog
log = QueryLog(sys.argv[1], "t", (1, 8, 8))
print("ready", flush=True)
i = len(log)  # records 0, 1, 2, ... across runs
while True:  # 1.5 MB a write, so that a kill often lands mid-write
    keys = np.arange(i, i + 65536, dtype="<u8").repeat(2).reshape(-1, 2)
    log.append(keys, np.arange(i, i + 65536) % 4)
    i += 65536
"""


def test_a_kill_9_mid_append_leaves_a_usable_log(tmp_path):
    log = tmp_path / "q.log"
    torn_seen = 0
    for attempt in range(2):  # until a kill lands mid-write (a torn tail), at most 2 kills
        proc = subprocess.Popen([sys.executable, "-c", _APPENDER.format(tests=str(TESTS)), str(log)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        t_end = time.monotonic() + 10
        start = log.stat().st_size
        while log.stat().st_size < start + (4 << 20) and time.monotonic() < t_end:
            time.sleep(0.01)  # polling the file it writes, bounded
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        torn = (log.stat().st_size - len(MAGIC)) % RECORD.itemsize
        q = QueryLog(log, "t", (1, 8, 8))
        assert q.dropped == 0 and len(q) == (log.stat().st_size - len(MAGIC)) // RECORD.itemsize
        keys = np.arange(0, len(q), dtype="<u8").repeat(2).reshape(-1, 2)
        found, labels = q.lookup(keys)
        assert found.all() and (labels == np.arange(len(q)) % 4).all()
        q.close()
        torn_seen += bool(torn)
        if torn:
            break
    print(f"\n{attempt + 1} kill(s), torn tail seen: {bool(torn_seen)}")


def test_hashing_a_batch_costs_little_next_to_a_lenet_forward(tmp_path):
    from zsdb3kd.models import create_model

    model = create_model("lenet5", num_classes=10, input_shape=(1, 28, 28)).eval()
    q = QueryLog(tmp_path / "q.log", "t", (1, 28, 28))
    x = torch.rand(256, 1, 28, 28)

    def best(fn, n=5):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        forward = best(lambda: model(x).argmax(1))
    hashing = best(lambda: q.lookup(q.keys(x)))
    print(f"\nhash+lookup of 256 images {hashing * 1e3:.2f} ms, LeNet-5 forward {forward * 1e3:.2f} ms "
          f"({hashing / forward:.1%})")
    assert hashing < 0.10 * forward
