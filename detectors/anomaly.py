"""Unsupervised anomaly score for cold start and unseen attacks.

Half-space trees (Tan, Ting & Liu, 2011) over activity features mapped onto
[0, 1] by a fixed log scale (``log1p(x) / log1p(cap)``): half-space trees split
the unit cube, and a fixed scale, unlike a running min/max, keeps an attack's
extreme values far from normal traffic instead of stretching the range to
include them. It needs no labels and learns what normal looks like from the
traffic itself.

The trees are River's (``HalfSpaceTrees``, same construction and seed), kept as
arrays so a batch of events walks every tree in a few vector operations. Scores
equal River's: a node's reference mass only changes when a window ends, so the
events of a batch between two window ends are scored together, then learned.
Compiled, the rows walk the trees one by one in C instead: the same integer masses
and one division per row, so the same scores for any batch size, without the
vector operations' cost per batch (~100 µs, most of a small batch's).

>>> a = AnomalyModel(seed=1)
>>> normal = {"user_events_1m": 1.0, "ip_events_1m": 2.0}
>>> for _ in range(600):
...     a.learn_one(normal)
>>> a.score_one({"user_events_1m": 40.0, "ip_events_1m": 300.0}) > a.score_one(normal)
True
"""

from __future__ import annotations

import math
import random
from typing import Mapping

import cython
import numpy as np
from river.tree.padded import make_padded_tree

from detectors.catalog import FEATURE_NAMES
from detectors.model import log_feature_matrix

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
_COLUMNS = np.array([FEATURE_NAMES.index(name) for name in ANOMALY_FEATURES])
_LOG_CAPS = np.array([math.log1p(_CAPS.get(name, _DEFAULT_CAP)) for name in ANOMALY_FEATURES])
_PADDING = 0.15  # River's: splits fall in the middle 70% of a node's range
_FEW_ROWS = 8


class AnomalyModel:
    version = "hst/2"

    def __init__(self, seed: int = 42, window_size: int = 250, trees: int = 10, height: int = 8):
        self.window_size = window_size
        self.height = height
        self.seen = 0
        self._in_window = 0  # events learned since the last window ended
        inner = (1 << height) - 1  # nodes are numbered heap-wise: node i's children are 2i+1 and 2i+2
        self._feature = np.zeros((trees, inner), dtype=np.intp)
        self._threshold = np.zeros((trees, inner))
        rng = random.Random(seed)
        column = {name: i for i, name in enumerate(ANOMALY_FEATURES)}
        for t in range(trees):
            limits = {name: (0.0, 1.0) for name in sorted(ANOMALY_FEATURES)}
            self._place(make_padded_tree(limits, height, _PADDING, rng, r_mass=0, l_mass=0), 0, t, column)
        self._few_rows_trees = (self._feature.tolist(), self._threshold.tolist())
        nodes = (1 << (height + 1)) - 1
        self._reference = np.zeros((trees, nodes), dtype=np.int64)  # masses of the last full window
        self._latest = np.zeros((trees, nodes), dtype=np.int64)  # masses of the window being filled
        self._depth_weight = 1 << np.arange(height + 1, dtype=np.int64)
        self._max_score = trees * window_size * ((1 << (height + 1)) - 1)

    def _place(self, node: object, i: int, tree: int, column: dict[str, int]) -> None:
        if i >= self._feature.shape[1]:
            return
        self._feature[tree, i] = column[node.feature]  # type: ignore[attr-defined]
        self._threshold[tree, i] = node.threshold  # type: ignore[attr-defined]
        left, right = node.children  # type: ignore[attr-defined]
        self._place(left, 2 * i + 1, tree, column)
        self._place(right, 2 * i + 2, tree, column)

    @staticmethod
    def inputs_many(log_features: np.ndarray) -> np.ndarray:
        """The trees' inputs from ``log_feature_matrix`` rows: log1p(max(0, x)) / log1p(cap), at most 1."""
        return np.minimum(1.0, np.maximum(log_features[:, _COLUMNS], 0.0) / _LOG_CAPS)

    def _paths(self, inputs: np.ndarray) -> np.ndarray:
        """Every node each row visits in each tree: (rows, trees, height + 1)."""
        if len(inputs) <= _FEW_ROWS:
            return self._paths_of_few(inputs)
        rows, (trees, inner) = len(inputs), self._feature.shape
        flat_inputs, feature, threshold = inputs.ravel(), self._feature.ravel(), self._threshold.ravel()
        row_start = (np.arange(rows) * inputs.shape[1])[:, None]
        tree_start = np.arange(trees) * inner
        node = np.zeros((rows, trees), dtype=np.intp)
        paths = np.zeros((rows, trees, self.height + 1), dtype=np.intp)
        for depth in range(1, self.height + 1):
            at = tree_start + node
            node = 2 * node + 1 + (flat_inputs.take(row_start + feature.take(at)) >= threshold.take(at))
            paths[:, :, depth] = node
        return paths

    def _paths_of_few(self, inputs: np.ndarray) -> np.ndarray:
        # A vector operation costs a microsecond however small: for one event (replay,
        # evaluation), walking the trees in Python is several times faster.
        features, thresholds = self._few_rows_trees
        paths = []
        for row in inputs.tolist():
            for feature, threshold in zip(features, thresholds):
                node = 0
                path = [0]
                for _ in range(self.height):
                    node = 2 * node + 1 + (row[feature[node]] >= threshold[node])
                    path.append(node)
                paths.append(path)
        return np.array(paths, dtype=np.intp).reshape(len(inputs), len(features), self.height + 1)

    def _score_paths(self, paths: np.ndarray) -> np.ndarray:
        masses = self._reference[np.arange(paths.shape[1])[:, None], paths]
        # A walk stops after the first node whose mass is under a tenth of a window.
        big = masses >= 0.1 * self.window_size
        reached = np.ones_like(big)
        reached[:, :, 1:] = np.logical_and.accumulate(big[:, :, :-1], axis=2)
        total = (masses * self._depth_weight * reached).sum(axis=(1, 2))
        return 1.0 - total / self._max_score

    def _learn_paths(self, paths: np.ndarray) -> None:
        trees, nodes = self._latest.shape
        flat = (np.arange(trees)[:, None] * nodes + paths).ravel()
        self._latest += np.bincount(flat, minlength=trees * nodes).reshape(trees, nodes)
        self._in_window += len(paths)
        self.seen += len(paths)
        if self._in_window == self.window_size:
            self._reference, self._latest = self._latest, np.zeros_like(self._latest)
            self._in_window = 0

    def score_then_learn_many(self, log_features: np.ndarray) -> np.ndarray:
        """Each row scored, then learned, in order; ``log_features`` as ``log_feature_matrix`` builds it."""
        if cython.compiled:
            return _score_then_learn_rows(self, np.ascontiguousarray(log_features, dtype=float))
        return self._score_then_learn_vectors(log_features)

    def _score_then_learn_vectors(self, log_features: np.ndarray) -> np.ndarray:
        """The reference: the batch's paths at once, then each stretch between window ends scored and learned."""
        paths = self._paths(self.inputs_many(log_features))
        scores = np.zeros(len(paths))
        start = 0
        while start < len(paths):
            end = min(len(paths), start + self.window_size - self._in_window)
            # half-space trees know nothing before two windows
            known = max(start, min(end, start + 2 * self.window_size - self.seen))
            if known < end:
                scores[known:end] = self._score_paths(paths[known:end])
            self._learn_paths(paths[start:end])
            start = end
        return scores

    def score_many(self, log_features: np.ndarray) -> np.ndarray:
        if self.seen < 2 * self.window_size:
            return np.zeros(len(log_features))
        return self._score_paths(self._paths(self.inputs_many(log_features)))

    def score_one(self, features: Mapping[str, float]) -> float:
        return float(self.score_many(log_feature_matrix([features]))[0])

    def learn_one(self, features: Mapping[str, float]) -> None:
        self._learn_paths(self._paths(self.inputs_many(log_feature_matrix([features]))))


_MOST_INPUTS = 32  # the size of the C arrays below (C needs the number)
if len(ANOMALY_FEATURES) > _MOST_INPUTS:
    raise ValueError(f"the anomaly model reads at most {_MOST_INPUTS} features, ANOMALY_FEATURES has "
                     f"{len(ANOMALY_FEATURES)}: raise _MOST_INPUTS and the arrays' size with it")
_C_COLUMNS = cython.declare(cython.Py_ssize_t[32], [int(c) for c in _COLUMNS] + [0] * (_MOST_INPUTS - len(_COLUMNS)))
_C_LOG_CAPS = cython.declare(cython.double[32], [float(c) for c in _LOG_CAPS] + [1.0] * (_MOST_INPUTS - len(_LOG_CAPS)))
_C_INPUTS = cython.declare(cython.Py_ssize_t, len(ANOMALY_FEATURES))


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)  # IEEE division, as numpy's (the divisors are never 0)
@cython.locals(x=cython.double[:, ::1], feature=cython.Py_ssize_t[:, ::1], threshold=cython.double[:, ::1],
               reference=cython.long[:, ::1], latest=cython.long[:, ::1], scores=cython.double[::1],
               rows=cython.Py_ssize_t, r=cython.Py_ssize_t, t=cython.Py_ssize_t, trees=cython.Py_ssize_t,
               depth=cython.Py_ssize_t, height=cython.Py_ssize_t, j=cython.Py_ssize_t, node=cython.Py_ssize_t,
               v=cython.double, big_mass=cython.double, total=cython.long, mass=cython.long,
               reached=cython.bint, scored=cython.bint, window=cython.long, in_window=cython.long,
               seen=cython.long, max_score=cython.double)
def _score_then_learn_rows(model: AnomalyModel, log_features: np.ndarray) -> np.ndarray:
    """``_score_then_learn_vectors`` a row at a time in C, only called when compiled
    (tests/unit/test_compiled.py compares the two, scores and masses): each row's inputs
    as ``inputs_many`` makes them (NaN kept, so it goes left as there), its path in every
    tree, its score from the reference masses as ``_score_paths`` sums them (integers, then
    one division), its path learned into the window's masses, windows ended as
    ``_learn_paths`` ends them."""
    x, feature, threshold = log_features, model._feature, model._threshold
    rows, trees, height = x.shape[0], feature.shape[0], model.height
    window, in_window, seen, max_score = model.window_size, model._in_window, model.seen, model._max_score
    big_mass = 0.1 * window
    reference, latest = model._reference, model._latest
    out = np.zeros(rows)
    scores = out
    inputs = cython.declare(cython.double[32])
    for r in range(rows):
        for j in range(_C_INPUTS):
            v = x[r, _C_COLUMNS[j]]
            if v < 0.0:  # np.maximum(v, 0.0) but for NaN, which it keeps
                v = 0.0
            v = v / _C_LOG_CAPS[j]
            if v > 1.0:
                v = 1.0
            inputs[j] = v
        scored = seen >= 2 * window  # half-space trees know nothing before two windows
        total = 0
        for t in range(trees):
            node = 0
            reached = True  # a walk stops after the first node under a tenth of a window
            for depth in range(height + 1):
                mass = reference[t, node]
                if scored and reached:
                    total += mass << depth
                    reached = mass >= big_mass
                latest[t, node] += 1
                if depth < height:
                    node = 2 * node + 1 + (inputs[feature[t, node]] >= threshold[t, node])
        if scored:
            scores[r] = 1.0 - total / max_score
        in_window += 1
        seen += 1
        if in_window == window:
            model._reference, model._latest = model._latest, np.zeros_like(model._latest)
            reference, latest = model._reference, model._latest
            in_window = 0
    model._in_window, model.seen = in_window, seen
    return out
