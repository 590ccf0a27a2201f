"""Progress lines in logs (no terminal): when they are printed, on a fake clock."""

from __future__ import annotations

import pytest

from zsdb3kd import progress as P


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 1000.0}
    monkeypatch.setattr(P.time, "perf_counter", lambda: now["t"])
    return now


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_a_plain_line_at_once_then_every_interval_and_at_the_end(clock, capsys):
    with P.QueryProgress(10, "work", unit="step", enabled=False, log_every=30.0) as bar:
        bar.advance(1)  # the first line at once
        clock["t"] += 10
        bar.advance(1)  # too soon
        clock["t"] += 25
        bar.advance(1)  # 35 s after the first line
        bar.advance(7)  # the end
    lines = _lines(capsys)
    assert [line.split(",")[0] for line in lines] == ["work: 1/10 steps", "work: 3/10 steps", "work: 10/10 steps"]
    assert lines[-1].endswith("done")


def test_quiet_start_leaves_short_work_out_of_the_log(clock, capsys):
    with P.QueryProgress(10, "short", unit="step", enabled=False, log_every=30.0, quiet_start=True) as bar:
        for _ in range(10):
            clock["t"] += 1
            bar.advance(1)
    assert _lines(capsys) == []
    with P.QueryProgress(10, "long", unit="step", enabled=False, log_every=30.0, quiet_start=True) as bar:
        clock["t"] += 31
        bar.advance(5)  # after the interval: a line, with an ETA
        clock["t"] += 1
        bar.advance(5)  # so the end has one too
    lines = _lines(capsys)
    assert [line.split(",")[0] for line in lines] == ["long: 5/10 steps", "long: 10/10 steps"]
    assert "ETA 31s" in lines[0]
