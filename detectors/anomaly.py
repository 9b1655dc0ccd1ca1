"""Unsupervised anomaly score for cold start and unseen attacks.

River's HalfSpaceTrees over activity features mapped onto [0, 1] by a fixed
log scale (``log1p(x) / log1p(cap)``): half-space trees split the unit cube,
and a fixed scale, unlike a running min/max, keeps an attack's extreme values
far from normal traffic instead of stretching the range to include them. It
needs no labels and learns what normal looks like from the traffic itself.

>>> a = AnomalyModel(seed=1)
>>> normal = {"user_events_1m": 1.0, "ip_events_1m": 2.0}
>>> for _ in range(600):
...     a.learn_one(normal)
>>> a.score_one({"user_events_1m": 40.0, "ip_events_1m": 300.0}) > a.score_one(normal)
True
"""

from __future__ import annotations

import math
from typing import Mapping

from river import anomaly

# Activity volumes, novelty and fan-out: what an attack changes first.
_CAPS = {"user_age_h": 24 * 365.0}
_DEFAULT_CAP = 1000.0
ANOMALY_FEATURES = (
    "user_events_1m", "user_events_1h", "user_login_failures_1h", "user_content_1m", "user_follows_1m",
    "user_payments_1h", "user_payments_declined_1h", "user_near_duplicate_texts_1h", "user_age_h",
    "ip_events_1m", "ip_login_failures_10m", "ip_distinct_users_10m", "ip_signups_1h",
    "device_signups_10m", "device_distinct_users_24h", "merchant_payments_10m", "card_payments_1h",
    "text_links", "login_failed",
)
_LOG_CAPS = tuple((k, math.log1p(_CAPS.get(k, _DEFAULT_CAP))) for k in ANOMALY_FEATURES)


class AnomalyModel:
    version = "hst/1"

    def __init__(self, seed: int = 42, window_size: int = 250):
        self.window_size = window_size
        self.trees = anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=window_size, seed=seed)
        self.seen = 0

    @staticmethod
    def _inputs(features: Mapping[str, float]) -> dict[str, float]:
        log1p, get = math.log1p, features.get
        return {k: min(1.0, log1p(max(0.0, get(k, 0.0))) / scale) for k, scale in _LOG_CAPS}

    def score_one(self, features: Mapping[str, float]) -> float:
        return self._score(self._inputs(features))

    def _score(self, inputs: dict[str, float]) -> float:
        if self.seen < 2 * self.window_size:  # half-space trees know nothing before two windows
            return 0.0
        return float(self.trees.score_one(inputs))

    def learn_one(self, features: Mapping[str, float]) -> None:
        self._learn(self._inputs(features))

    def _learn(self, inputs: dict[str, float]) -> None:
        self.trees.learn_one(inputs)
        self.seen += 1

    def score_then_learn(self, features: Mapping[str, float]) -> float:
        """``score_one`` then ``learn_one``, mapping the features once."""
        inputs = self._inputs(features)
        score = self._score(inputs)
        self._learn(inputs)
        return score
