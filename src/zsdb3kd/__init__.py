"""zsdb3kd: knowledge distillation from a decision-based (label-only) black-box teacher.

Implements DB3KD and zero-shot ZSDB3KD (Wang, ICML 2021, arXiv 2106.03310).
Pipeline, one module per idea, data flowing one way:

    oracle (label-only teacher access) -> data -> models/weights
    -> robustness (boundary-distance estimators) -> softlabels
    -> synthesis (zero-shot pseudo samples) -> distill -> pipeline / cli
"""

__version__ = "0.1.0"
