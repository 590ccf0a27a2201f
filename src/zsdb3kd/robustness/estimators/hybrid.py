"""``hybrid``: ``hsja-sub-circle`` for each pair's first queries, then Sign-OPT from where it stopped."""

from __future__ import annotations

from ..search import Capped, Estimator
from .registry import ESTIMATORS
from .hsja import hsja_sub_circle
from .signopt import SignOPT


@ESTIMATORS.register("hybrid")
def hybrid(switch: int = 1000, k: int = 100, alpha: float = 0.2, beta: float = 0.01, reuse: float = 0.0,
           **kw) -> Estimator:
    """The most query-efficient from 1,000 queries per pair: ``hsja-sub-circle`` (options ``kw``) for
    ``switch`` queries, then Sign-OPT with ``k`` probes at radius ``beta``."""
    return SignOPT(init=Capped(hsja_sub_circle(**kw), switch), k=k, alpha=alpha, beta=beta, reuse=reuse)
