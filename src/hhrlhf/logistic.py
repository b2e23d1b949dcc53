"""The logistic function and its logarithm: the one definition in hhrlhf, numerically stable.

A preference model predicts P(a preferred to b) = sigmoid(score(a) - score(b)). Written as
``1 / (1 + exp(-x))`` it overflows for margins below about -709 (``math.exp`` raises, numpy
warns and returns inf); these never take ``exp`` of a positive number. Training losses use
torch's own ``logsigmoid``, which is stable too.
"""

from __future__ import annotations

from typing import overload

import numpy as np


@overload
def sigmoid(x: float) -> float: ...


@overload
def sigmoid(x: np.ndarray) -> np.ndarray: ...


def sigmoid(x: float | np.ndarray) -> float | np.ndarray:
    """1 / (1 + exp(-x)), elementwise; a float for a scalar, float64 array for an array."""
    a = np.asarray(x, dtype=np.float64)
    z = np.exp(-np.abs(a))  # in (0, 1]: never overflows
    out = np.where(a >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    return float(out) if out.ndim == 0 else out


@overload
def log_sigmoid(x: float) -> float: ...


@overload
def log_sigmoid(x: np.ndarray) -> np.ndarray: ...


def log_sigmoid(x: float | np.ndarray) -> float | np.ndarray:
    """log(sigmoid(x)) = -log(1 + exp(-x)), elementwise, exact for large |x| of either sign."""
    out = -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))
    return float(out) if out.ndim == 0 else out
