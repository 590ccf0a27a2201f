"""Progress reporting for long, query-bound jobs: items done, queries/s and ETA."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class QueryProgress:
    """A progress bar over work items that also shows the teacher's query rate.

    ``enabled=None`` shows the bar only on an interactive terminal; otherwise a plain
    line is printed every ``log_every`` seconds so that logs still show progress. With
    ``quiet_start`` the first plain line waits ``log_every`` seconds and the last is printed
    only after an earlier one: work shorter than that leaves the log alone.
    """

    def __init__(self, total: int, desc: str, unit: str = "sample", enabled: bool | None = None,
                 initial: int = 0, log_every: float = 30.0, max_queries: int | None = None,
                 quiet_start: bool = False) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self.initial = initial
        self.max_queries = max_queries  # upper bound on this session's queries: gives an ETA before any item is done
        self.n_queries = 0
        self.t0 = time.perf_counter()
        self._last = self.t0 if quiet_start else 0.0
        self._quiet = quiet_start  # until a first line is printed
        self.log_every = log_every
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                         smoothing=0.1) if self.enabled else None

    @property
    def rate(self) -> float:
        return self.n_queries / max(time.perf_counter() - self.t0, 1e-9)

    def queries(self, n: int) -> None:
        self.n_queries += n
        now = time.perf_counter()
        if self._bar is not None:
            if now - self._last >= 0.5:
                self._last = now
                left = ""
                if self.max_queries and self.done < self.total:
                    left = f", ETA <= {max(self.max_queries - self.n_queries, 0) / self.rate:.0f}s"
                self._bar.set_postfix_str(f"{self.rate:,.0f} q/s, {self.n_queries:,} queries{left}", refresh=True)
        elif now - self._last >= self.log_every > 0:
            self._log(now)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.log_every or (self.done >= self.total and not self._quiet):
            self._log(now)

    def _log(self, now: float) -> None:
        self._last, self._quiet = now, False
        elapsed = now - self.t0
        done_here = self.done - self.initial
        if self.done >= self.total:
            eta = "done"
        elif self.max_queries and self.n_queries:
            eta = f"ETA <= {max(self.max_queries - self.n_queries, 0) / self.rate:.0f}s"
        elif done_here > 0:
            eta = f"ETA {elapsed / done_here * (self.total - self.done):.0f}s"
        else:
            eta = "ETA -"
        rate = f"{self.rate:,.0f} q/s, {self.n_queries:,} queries, " if self.n_queries else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {rate}{elapsed:.0f}s elapsed, {eta}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "QueryProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
