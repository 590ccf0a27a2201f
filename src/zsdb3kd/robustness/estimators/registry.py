"""The registry every estimator module adds its factories to (see the package docstring)."""

from __future__ import annotations

from ...registry import Registry
from ..search import Estimator

ESTIMATORS: Registry[Estimator] = Registry("estimator")
