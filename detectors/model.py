"""Online risk model: a River logistic regression learning from late labels.

Counts are log-scaled and standardised (running statistics over *all* scored
traffic, not only labelled events), then fed to a logistic regression trained
one label at a time with class weights that undo label imbalance.

>>> m = OnlineRiskModel(min_labels_per_class=1)
>>> bad = {"user_login_failures_1h": 9.0, "device_new_for_user": 1.0}
>>> good = {"user_login_failures_1h": 0.0, "device_new_for_user": 0.0}
>>> for _ in range(50):
...     m.observe(bad); m.observe(good)
...     m.learn_one(bad, True); m.learn_one(good, False)
>>> m.predict_proba_one(bad) > 0.8 > 0.2 > m.predict_proba_one(good)
True
>>> m.explain_one(bad)[0]["code"] in bad
True
"""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter
from typing import Mapping, Sequence

import cython
import numpy as np
from cython.cimports.libc.math import exp, pow, sqrt
from river import linear_model, optim, utils

from detectors.catalog import FEATURE_NAMES, describe
from detectors.rounding import rounded

MODEL_NAME = "online-logreg"
MODEL_GENERATION = 1
MAX_CLASS_WEIGHT = 20.0


_PICK = itemgetter(*FEATURE_NAMES)


def log_feature_matrix(rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    """One row per event in catalogue order, ``log1p``-scaled where positive; a
    catalogue feature a row lacks counts as 0, a name outside the catalogue is not a feature.

    >>> log_feature_matrix([{"user_events_1m": np.e - 1}]).shape == (1, len(FEATURE_NAMES))
    True
    """
    x = _feature_matrix_compiled(rows) if cython.compiled else None
    if x is None:
        x = _feature_matrix(rows)
    return np.log1p(x, out=x, where=x > 0)


def _feature_matrix(rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    """The reference: the rows' values in catalogue order, as numpy converts them."""
    try:
        values = [_PICK(row) for row in rows]
    except KeyError:
        values = [tuple(row.get(name, 0.0) for name in FEATURE_NAMES) for row in rows]
    return np.array(values, dtype=float).reshape(len(values), len(FEATURE_NAMES))


_COLUMNS = {name: j for j, name in enumerate(FEATURE_NAMES)}


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(matrix=cython.double[:, ::1], i=cython.Py_ssize_t, j=cython.Py_ssize_t, values=dict, columns=dict)
def _feature_matrix_compiled(rows: Sequence[Mapping[str, float]]) -> np.ndarray | None:
    """``_feature_matrix`` filled in C, only called when compiled (tests/unit/test_compiled.py
    compares the two); None for a row that is not a dict or a catalogue value that is not a number
    (numpy's own conversion decides those). A row holds the features that are not 0
    (``features.extract``, a risk score's): each is put in its column, the rest stay 0."""
    columns = _COLUMNS
    x = np.zeros((len(rows), len(columns)))
    matrix = x
    for i, row in enumerate(rows):
        if type(row) is not dict:
            return None
        values = row
        for name, value in values.items():
            column = columns.get(name)
            if column is None:  # not a catalogue feature
                continue
            j = column
            if type(value) is float or type(value) is int:
                matrix[i, j] = value
            else:
                return None
    return x


class Standardiser:
    """Running mean and variance (Welford) of every catalogue feature, log-scaled.

    Each feature is ``log1p``-scaled if positive, then standardised by the statistics
    of all traffic seen so far, itself included. The statistics are numpy vectors in
    catalogue order, and a batch is standardised as one matrix. Statistics saved under
    an older catalogue are aligned to the current one on load (new features start
    empty, retired ones are dropped).

    >>> s = Standardiser()
    >>> z = s.learn_transform_many(log_feature_matrix([{"user_events_1m": v} for v in (0.0, 1.0, 3.0)]))
    >>> column = FEATURE_NAMES.index("user_events_1m")
    >>> round(float(z[2, column]), 3), float(z[2, FEATURE_NAMES.index("ip_events_1m")])
    (1.225, 0.0)
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.counts = self.means = self.variances = np.zeros(0)
        self._align()

    def _align(self) -> None:
        if self.names == FEATURE_NAMES:
            return
        index = {name: i for i, name in enumerate(self.names)}
        old = [index.get(name, -1) for name in FEATURE_NAMES]
        self.counts, self.means, self.variances = (
            np.array([stat[i] if i >= 0 else 0.0 for i in old]) for stat in (self.counts, self.means, self.variances))
        self.names = FEATURE_NAMES

    def __getstate__(self) -> dict:
        return {"names": self.names, "counts": self.counts, "means": self.means, "variances": self.variances}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._align()

    @staticmethod
    def _standardise(x: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
        z = np.zeros(x.shape)
        np.divide(x - means, np.sqrt(variances), out=z, where=variances != 0)
        return z

    def _learn(self, x: np.ndarray) -> None:
        self.counts += 1
        old_means = self.means
        self.means = old_means + (x - old_means) / self.counts
        self.variances = self.variances + ((x - old_means) * (x - self.means) - self.variances) / self.counts

    def learn_one(self, features: Mapping[str, float]) -> None:
        self._learn(log_feature_matrix([features])[0])

    def learn_transform_many(self, log_features: np.ndarray) -> np.ndarray:
        """Learns each row in order and standardises it by the statistics including it."""
        if cython.compiled:
            # fresh statistics arrays, as the reference rebinds them (counts it updates in place)
            self.means, self.variances = self.means.copy(), self.variances.copy()
            standardised = np.zeros(log_features.shape)
            _learn_standardise(np.ascontiguousarray(log_features, dtype=float), self.counts, self.means,
                               self.variances, standardised)
            return standardised
        means, variances = np.empty_like(log_features), np.empty_like(log_features)
        for i, x in enumerate(log_features):
            self._learn(x)
            means[i], variances[i] = self.means, self.variances
        return self._standardise(log_features, means, variances)

    def transform_many(self, log_features: np.ndarray) -> np.ndarray:
        """Rows standardised by the statistics so far (learning nothing)."""
        return self._standardise(log_features, self.means, self.variances)

    def transform_one(self, features: Mapping[str, float]) -> dict[str, float]:
        return dict(zip(self.names, self.transform_many(log_feature_matrix([features]))[0].tolist()))


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)  # IEEE division, as numpy's
@cython.locals(x=cython.double[:, ::1], counts=cython.double[::1], means=cython.double[::1],
               variances=cython.double[::1], z=cython.double[:, ::1], i=cython.Py_ssize_t, j=cython.Py_ssize_t,
               value=cython.double, count=cython.double, old=cython.double, mean=cython.double,
               variance=cython.double)
def _learn_standardise(x, counts, means, variances, z) -> None:
    """``Standardiser.learn_transform_many`` as one C loop, only called when compiled
    (tests/unit/test_compiled.py compares the two): the same operations in the same order
    per element, so the same doubles."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            value, old = x[i, j], means[j]
            count = counts[j] + 1
            mean = old + (value - old) / count
            variance = variances[j] + ((value - old) * (value - mean) - variances[j]) / count
            counts[j], means[j], variances[j] = count, mean, variance
            if variance != 0:
                z[i, j] = (value - mean) / sqrt(variance)


@cython.cfunc
@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(j=cython.Py_ssize_t)
def _read_in_order(values: dict, names: tuple, into: cython.double[::1]) -> cython.bint:
    """Copies ``values`` into ``into`` if it holds exactly ``names``, in that order."""
    if len(values) != len(names) or into.shape[0] != len(names):
        return False
    j = 0
    for name, value in values.items():
        if name != names[j]:
            return False
        into[j] = value
        j += 1
    return True


@cython.cfunc
@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(j=cython.Py_ssize_t)
def _write_in_order(values: dict, source: cython.double[::1]) -> cython.void:
    """Sets ``values`` (read by ``_read_in_order``) to ``source``, key by key through the
    dict's own key objects (a lookup by identity)."""
    j = 0
    for name in values:  # replacing values changes neither the size nor the order
        values[name] = source[j]
        j += 1


# Gradients past this (or NaN) are left to River: their squares overflow, and which of River's
# operations then run on Python floats (``**`` raises OverflowError) or natively is River's business.
_SQUARE_LIMIT = cython.declare(cython.double, 1e150)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)  # IEEE division, as Python's floats (the divisors here are never 0)
@cython.locals(x=cython.double[::1], w=cython.double[::1], m=cython.double[::1], v=cython.double[::1],
               weights=dict, means=dict, squares=dict, names=tuple, n=cython.Py_ssize_t, j=cython.Py_ssize_t,
               dot=cython.double, raw=cython.double, z=cython.double, y=cython.int, loss_weight=cython.double,
               gradient=cython.double, clip=cython.double, lr=cython.double, beta_1=cython.double,
               beta_2=cython.double, eps=cython.double, g=cython.double, iteration=cython.double)
def _learn_logistic_adam(classifier, held: tuple, names: tuple, row: np.ndarray, is_abuse: bool,
                         sample_weight: float) -> bool:
    """River's ``LogisticRegression.learn_one(dict(zip(names, row)), is_abuse, w=sample_weight)``
    with Adam, computed in C on the dicts ``_held_state`` holds: the same operations, in the same
    order, on the same doubles (tests/unit/test_compiled.py compares the two, learning after
    learning). Only called when compiled; False (nothing changed) when River must run instead:
    the dicts are not exactly ``names`` in order, or a gradient is NaN or past ``_SQUARE_LIMIT``."""
    weights, means, squares = held[1], held[3], held[5]
    n = len(names)
    x = row
    state = np.empty((3, n))
    w, m, v = state[0], state[1], state[2]
    if x.shape[0] != n or not (_read_in_order(weights, names, w) and _read_in_order(means, names, m)
                               and _read_in_order(squares, names, v)):
        return False
    # GLM._raw_dot_one: the weights' dot product, key by key from 0, plus the intercept
    dot = 0.0
    for j in range(n):
        dot += w[j] * x[j]
    raw = dot + classifier.intercept
    # optim.losses.Log.gradient
    loss = classifier.loss
    y = 1 if is_abuse else -1
    loss_weight = loss.weight_pos if is_abuse else loss.weight_neg
    z = raw * y
    if z > 18.0:
        gradient = loss_weight * exp(-z) * -y
    elif z < -18.0:
        gradient = loss_weight * -y
    else:
        gradient = loss_weight * -y / (exp(z) + 1.0)
    gradient *= sample_weight
    clip = classifier.clip_gradient
    if clip < gradient:  # utils.math.clamp: max(min(gradient, clip), -clip)
        gradient = clip
    if -clip > gradient:
        gradient = -clip
    for j in range(n):
        g = x[j] * gradient
        if not (-_SQUARE_LIMIT < g < _SQUARE_LIMIT):  # NaN, inf, or a square that overflows
            return False
    # the intercept by its own constant rate, then Adam's step (optim.Adam._step_with_vector)
    classifier.intercept = classifier.intercept - classifier.intercept_lr.learning_rate * gradient
    optimizer = classifier.optimizer
    beta_1, beta_2, eps = optimizer.beta_1, optimizer.beta_2, optimizer.eps
    iteration = optimizer.n_iterations + 1
    lr = optimizer.lr.learning_rate * pow(1 - pow(beta_2, iteration), 0.5)
    lr /= 1 - pow(beta_1, iteration)
    for j in range(n):
        g = x[j] * gradient
        m[j] = beta_1 * m[j] + (1 - beta_1) * g
        v[j] = beta_2 * v[j] + (1 - beta_2) * pow(g, 2.0)
        w[j] = w[j] - m[j] * lr / (pow(v[j], 0.5) + eps)
    _write_in_order(weights, w)
    _write_in_order(means, m)
    _write_in_order(squares, v)
    optimizer.n_iterations += 1
    return True


def _top_contributions_of_products(products: np.ndarray, names: tuple, top: int) -> list[list[tuple[float, str]]]:
    """The reference: per row of ``products`` (inputs times weights), its ``top`` positive
    (contribution, name) pairs, largest first as a full sort of the pairs would rank them."""
    # the candidates without a full sort: at least the row's top-th largest
    if len(names) > top:
        cutoffs = np.partition(products, -top, axis=1)[:, -top]
    else:
        cutoffs = np.full(len(products), -np.inf)
    rows, columns = np.nonzero((products >= cutoffs[:, None]) & (products > 0))
    candidates: list[list[tuple[float, str]]] = [[] for _ in range(len(products))]
    for row, column, contribution in zip(rows.tolist(), columns.tolist(), products[rows, columns].tolist()):
        candidates[row].append((contribution, names[column]))
    return [sorted(contributions, reverse=True)[:top] for contributions in candidates]


_MOST_REASONS = 8  # the C path's room; more are asked for nowhere but would go to the reference


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.locals(x=cython.double[:, ::1], w=cython.double[::1], rows=cython.Py_ssize_t, n=cython.Py_ssize_t,
               r=cython.Py_ssize_t, j=cython.Py_ssize_t, k=cython.Py_ssize_t, at=cython.Py_ssize_t,
               found=cython.Py_ssize_t, limit=cython.Py_ssize_t, p=cython.double, chosen=list)
def _top_contributions(inputs: np.ndarray, weights: np.ndarray, names: tuple, top: int) -> list | None:
    """``_top_contributions_of_products(inputs * weights, names, top)`` one row at a time in C, only
    called when compiled (tests/unit/test_compiled.py compares the two): the same products, each
    row's positive ones kept in (contribution, name) order as they come, no numpy call per batch.
    None (the reference's business) if a product is NaN, which numpy's partition ranks its own way."""
    x, w = inputs, weights
    rows, n, limit = x.shape[0], x.shape[1], top
    if w.shape[0] != n or len(names) != n:
        return None
    best_p = cython.declare(cython.double[8])  # _MOST_REASONS
    best_j = cython.declare(cython.Py_ssize_t[8])
    chosen = []
    for r in range(rows):
        found = 0
        for j in range(n):
            p = x[r, j] * w[j]
            if p != p:
                return None
            if not p > 0.0:
                continue
            at = found
            # behind every kept pair that ranks above it: a larger product, or an equal one with a larger name
            while at > 0 and (p > best_p[at - 1] or (p == best_p[at - 1] and names[j] > names[best_j[at - 1]])):
                at -= 1
            if at >= limit:
                continue
            if found < limit:
                found += 1
            k = found - 1
            while k > at:
                best_p[k], best_j[k] = best_p[k - 1], best_j[k - 1]
                k -= 1
            best_p[at], best_j[at] = p, j
        chosen.append([(best_p[k], names[best_j[k]]) for k in range(found)])
    return chosen


HELD_WEIGHTS = "_held_weights"  # where ``held_weights`` keeps its dict on the model owning the classifier


class HoldsWeights:
    """A model whose classifier's weights ``held_weights`` may hold: its pickle leaves them
    out (a reference into the classifier, held again after loading)."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop(HELD_WEIGHTS, None)
        return state


def held_weights(owner: object, classifier: object) -> dict | None:
    """The weights of ``classifier`` (River's ``LogisticRegression`` with its log loss) as a
    dict that C code can read: its ``VectorDict`` is replaced once by one wrapping a dict
    ``owner`` holds (``VectorDict(d)`` keeps ``d`` itself, so River's own updates reach it),
    and again whenever River replaces it. None for any other classifier. The owner's class
    derives from ``HoldsWeights``, whose pickle drops the held dict."""
    held = owner.__dict__.get(HELD_WEIGHTS)
    if held is not None and held[0] is classifier._weights and held[2] is classifier.loss:
        return held[1]  # checked when held, and River replaces neither in place
    if not (type(classifier) is linear_model.LogisticRegression and type(classifier.loss) is optim.losses.Log):
        return None
    weights = classifier._weights.to_dict()
    classifier._weights = utils.VectorDict(weights)
    owner.__dict__[HELD_WEIGHTS] = (classifier._weights, weights, classifier.loss)
    return weights


@cython.locals(weights=dict, x=dict, total=cython.double, weight=cython.double, value=cython.double, z=cython.double)
def logistic_proba(weights: dict, intercept: float, x: dict) -> float:
    """River's ``LogisticRegression.predict_proba_one(x)[True]`` with the log loss, from
    ``held_weights``: the same operations in the same order (``VectorDict.dot`` goes through
    ``x`` in its order, a weight it lacks counting as 0; then the intercept; then
    ``utils.math.sigmoid``), in C when compiled (tests/unit/test_compiled.py compares them)."""
    total = 0.0
    for name, value in x.items():
        weight = weights.get(name, 0.0)
        total += weight * value
    z = total + intercept
    return logistic_of(z)


@cython.ccall  # a C call within this module, a Python one from detectors/content.py
@cython.cdivision(True)  # IEEE division, as Python's floats (1 + exp(-z) is never 0)
def logistic_of(z: cython.double) -> cython.double:
    """River's ``utils.math.sigmoid``: 0 and 1 beyond ±30, else 1 / (1 + e^-z)."""
    if z < -30:
        return 0.0
    if z > 30:
        return 1.0
    return 1.0 / (1.0 + exp(-z))


class OnlineRiskModel:
    """``observe`` every scored event, ``learn_one`` every label, ``predict_proba_one`` to score."""

    def __init__(self, min_labels_per_class: int = 20, learning_rate: float = 0.01, name: str = MODEL_NAME,
                 l2: float = 0.0, scaler: Standardiser | None = None):
        self.name = name
        self.min_labels_per_class = min_labels_per_class
        # Models over the same traffic may share one scaler (champion and challenger do).
        self.scaler = scaler if scaler is not None else Standardiser()
        # Adam: per-feature step sizes suit ~90 features of very different
        # scales and sparsity (measured on the simulator: alert precision/recall
        # 0.75/0.74 after 0.8 simulated days, against 0.67/0.39 with plain SGD).
        self.learning_rate = learning_rate
        self.classifier = linear_model.LogisticRegression(optimizer=optim.Adam(learning_rate), l2=l2)
        self.positives = 0
        self.negatives = 0

    @property
    def updates(self) -> int:
        return self.positives + self.negatives

    @property
    def version(self) -> str:
        """Changes with every update, so a score names the exact model state behind it."""
        return f"{self.name}/{MODEL_GENERATION}+{self.updates}"

    @property
    def ready(self) -> bool:
        return min(self.positives, self.negatives) >= self.min_labels_per_class

    def observe(self, features: Mapping[str, float]) -> None:
        self.scaler.learn_one(features)

    def inputs(self, features: Mapping[str, float]) -> dict[str, float]:
        """What the classifier sees: log-scaled, standardised features."""
        return self.scaler.transform_one(features)

    def scaled(self, features: Mapping[str, float]) -> np.ndarray:
        """``inputs`` as one row in catalogue order, what ``predict_proba_many`` and ``learn_scaled`` take."""
        return self.scaler.transform_many(log_feature_matrix([features]))[0]

    def predict_proba_one(self, features: Mapping[str, float]) -> float:
        return self.predict_proba_scaled(self.scaled(features))

    def predict_proba_scaled(self, row: np.ndarray) -> float:
        """``predict_proba_one`` of a row already through the scaler (``scaled``)."""
        return float(self.predict_proba_many(row[None, :])[0])

    def _weight_vector(self) -> np.ndarray:
        """The classifier's weights in catalogue order, rebuilt only after it learned."""
        cached = getattr(self, "_weights_in_order", None)  # checkpoints from before it lack it
        if cached is None or cached[0] != self.updates:
            names = self.scaler.names
            held = self._held_state()
            vector = np.empty(len(names))
            if held is None or not _read_in_order(held[1], names, vector):  # else the weights dict itself, in order
                vector = np.fromiter(map(self.classifier._weights.get, names, repeat(0.0)), float, len(names))
            cached = self._weights_in_order = (self.updates, vector)
        return cached[1]

    def _held_state(self) -> tuple | None:
        """The classifier's weights and Adam's two moments as dicts this model holds, wrapped
        (not copied) by River's ``VectorDict``s, so C code can read and update them in place;
        None while River's own ``learn_one`` must run (before Adam's first step, or a
        classifier configured otherwise than ``__init__`` makes it)."""
        classifier = self.classifier
        optimizer = classifier.optimizer
        if not (type(classifier) is linear_model.LogisticRegression and type(optimizer) is optim.Adam
                and optimizer.m is not None and type(classifier.loss) is optim.losses.Log
                and classifier.l1 == 0 and classifier.l2 == 0
                and type(classifier.intercept_lr) is optim.schedulers.Constant
                and type(optimizer.lr) is optim.schedulers.Constant):
            return None
        held = self.__dict__.get("_held")
        if held is None or held[0] is not classifier._weights or held[2] is not optimizer.m \
                or held[4] is not optimizer.v:
            # VectorDict(d) keeps d itself: River's own operations on these then update the dicts held
            weights, means, squares = classifier._weights.to_dict(), optimizer.m.to_dict(), optimizer.v.to_dict()
            classifier._weights = utils.VectorDict(weights)
            optimizer.m, optimizer.v = utils.VectorDict(means), utils.VectorDict(squares)
            held = self._held = (classifier._weights, weights, optimizer.m, means, optimizer.v, squares)
        return held

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_held", None)  # references into the classifier, made again after loading
        return state

    def predict_proba_many(self, inputs: np.ndarray) -> np.ndarray:
        """``predict_proba_one`` of rows already through the scaler (``Standardiser.learn_transform_many``)."""
        logits = inputs @ self._weight_vector() + self.classifier.intercept
        with np.errstate(over="ignore"):  # clipped below, like River's sigmoid
            p = 1.0 / (1.0 + np.exp(-logits))
        return np.where(logits < -30, 0.0, np.where(logits > 30, 1.0, p))

    def learn_one(self, features: Mapping[str, float], is_abuse: bool) -> None:
        self.learn_scaled(self.scaled(features), is_abuse)

    def learn_scaled(self, row: np.ndarray, is_abuse: bool) -> None:
        """``learn_one`` of a row already through the scaler (``scaled``)."""
        if is_abuse:
            self.positives += 1
            weight = self.negatives / self.positives
        else:
            self.negatives += 1
            weight = self.positives / self.negatives
        weight = min(MAX_CLASS_WEIGHT, max(1.0, weight))
        held = self._held_state() if cython.compiled else None
        if held is None or not _learn_logistic_adam(self.classifier, held, self.scaler.names,
                                                    np.ascontiguousarray(row, dtype=float), is_abuse, weight):
            self.classifier.learn_one(dict(zip(self.scaler.names, row.tolist())), is_abuse, w=weight)

    def warm_start(self, weights: Mapping[str, float], intercept: float, positives: int, negatives: int) -> None:
        """Starts from weights fitted offline (on ``inputs``) as if it had learned that many labels."""
        # A fresh optimizer: Adam's moments from earlier online steps would keep pushing
        # the new weights along the old trajectory.
        self.classifier.optimizer = optim.Adam(self.learning_rate)
        self.classifier._weights = utils.VectorDict(dict(weights))
        self.classifier.intercept = float(intercept)
        self.positives, self.negatives = positives, negatives
        self._weights_in_order = None

    def explain_one(self, features: Mapping[str, float], top: int = 3) -> list[dict]:
        """The features that pushed this score up most, in human words."""
        return self.explain_many([features], self.scaler.transform_many(log_feature_matrix([features])), top)[0]

    def explain_many(self, features: Sequence[Mapping[str, float]], inputs: np.ndarray,
                     top: int = 3) -> list[list[dict]]:
        """``explain_one`` of each row of ``inputs`` (already through the scaler)."""
        names, weights = self.scaler.names, self._weight_vector()
        chosen = None
        if cython.compiled and top <= _MOST_REASONS:
            chosen = _top_contributions(np.ascontiguousarray(inputs, dtype=float), weights, names, top)
        if chosen is None:
            chosen = _top_contributions_of_products(inputs * weights, names, top)
        explained = []
        for contributions, values in zip(chosen, features):
            reasons = []
            for contribution, name in contributions:
                value = values.get(name, 0.0)
                reasons.append({
                    "code": name,
                    "text": f"{describe(name)}: {value:g}",
                    "weight": rounded(contribution, 4),
                    "value": value,
                })
            explained.append(reasons)
        return explained
