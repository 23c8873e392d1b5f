"""FedAvg: the sample-weighted mean of the client updates, per block."""

from __future__ import annotations

import numpy as np

from . import coefficients
from .base import Strategy


class FedAvg(Strategy):
    """β = w / Σw. Reports the same conflict statistics as CMGA, so runs compare line by line."""

    name = "fedavg"

    def coefficients(self, gram: np.ndarray, weights: np.ndarray, groups: list[str], *,
                     block: str, round: int) -> tuple[np.ndarray, dict]:
        return coefficients.fedavg_coefficients(gram, weights, groups)
