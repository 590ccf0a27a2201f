"""Sample robustness: distances from samples to the teacher's decision boundaries.

``tracker`` (per-pair query accounting) -> ``estimators`` (SD, BD, Sign-OPT MBD, ...)
-> ``engine`` (whole datasets, chunked and resumable).
"""

from .engine import PAPER_CHECKPOINTS, PRESETS, RobustnessResult, RobustnessSettings, compute_robustness
from .estimators import ESTIMATORS, BoundaryDistance, CandidatePool, Estimator, SampleDistance, SearchResult, SignOPT
from .tracker import UNTARGETED, PairTracker

__all__ = [
    "PAPER_CHECKPOINTS", "PRESETS", "RobustnessResult", "RobustnessSettings", "compute_robustness",
    "ESTIMATORS", "BoundaryDistance", "CandidatePool", "Estimator", "SampleDistance", "SearchResult", "SignOPT",
    "UNTARGETED", "PairTracker",
]
