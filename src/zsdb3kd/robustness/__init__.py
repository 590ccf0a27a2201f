"""Sample robustness: distances from samples to the teacher's decision boundaries.

``tracker`` (per-pair query accounting) -> ``search`` (the estimator contract and shared
searches) -> ``estimators`` (SD, BD, MBD, HSJA, hybrid; one file each, created by name)
-> ``engine`` (whole datasets, chunked and resumable) -> ``result``.
"""

from .engine import PAPER_CHECKPOINTS, RobustnessSettings, SearchFields, compute_robustness, compute_to_file
from .estimators import (ESTIMATORS, BoundaryDistance, HopSkipJump, SampleDistance, SignOPT, create_estimator,
                         parse_method)
from .result import RobustnessResult
from .search import CandidatePool, Capped, Estimator, SearchResult
from .tracker import UNTARGETED, PairTracker

__all__ = [
    "ESTIMATORS", "PAPER_CHECKPOINTS", "BoundaryDistance", "CandidatePool", "Capped", "Estimator", "HopSkipJump",
    "PairTracker", "RobustnessResult", "RobustnessSettings", "SampleDistance", "SearchFields", "SearchResult", "SignOPT",
    "UNTARGETED", "compute_robustness", "compute_to_file", "create_estimator", "parse_method",
]
