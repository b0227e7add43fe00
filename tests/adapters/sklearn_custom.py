"""A user-defined transformer: outside the default allow-list, as every user's own class is."""

from __future__ import annotations

from typing import Any

from sklearn.base import BaseEstimator, TransformerMixin


class ClipTransformer(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    def __init__(self, low: float = -1.0, high: float = 1.0) -> None:
        self.low, self.high = low, high

    def fit(self, x: Any, y: Any = None) -> ClipTransformer:
        self.n_features_in_ = x.shape[1]
        return self

    def transform(self, x: Any) -> Any:
        return x.clip(self.low, self.high)
