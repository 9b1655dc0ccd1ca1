"""Batch bootstrap: fit the risk model and the fusion stacker with scikit-learn on
a labelled history, through the live feature code, and hand the worker a warm start.

1. The history runs through the live ``Detector`` in event-time order (the same
   prequential pass as ``evaluate``): features are what the worker would have
   computed, each label is revealed at its own timestamp, the anomaly model,
   the feature scaler and the content model learn as they would live.
2. A logistic regression (scikit-learn, balanced class weights) is fitted on the
   older labelled events and tested on the newest ``holdout`` share (a time
   split: the future is never in training). It sees exactly what the online
   model sees (``OnlineRiskModel.inputs``), so its weights load into it as is.
3. The fusion stacker is fitted on the held-out events, where the risk model's
   scores are out-of-sample, and its metrics come from cross-validation there.
4. The risk model is refitted on all labelled events and both are installed
   into a ``ModelSet``, which then keeps learning online from live labels.

>>> import numpy as np
>>> rows = [LabelledRow(ts=i, inputs=[float(i % 2), 0.0], detectors={"model": 0.5, "anomaly": 0.1,
...         "rules": 0.0, "content": 0.5}, has_text=False, is_abuse=bool(i % 2)) for i in range(200)]
>>> fitted = fit_rows(rows, names=("x", "y"), holdout=0.25)
>>> fitted.report["held_out"]["sklearn_model"]["roc_auc"]
1.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from detectors.catalog import FEATURE_NAMES
from detectors.evaluation import evaluate
from detectors.fusion import DETECTORS, fusion_inputs
from detectors.lifecycle import ModelSet
from detectors.pipeline import Detector

FUSION_INPUTS = tuple(fusion_inputs({}, False))
MIN_PER_CLASS = 10


class BootstrapError(ValueError):
    pass


@dataclass(frozen=True)
class LabelledRow:
    ts: int
    inputs: list[float]  # in FEATURE_NAMES order: raw features while collecting, then the risk model's inputs
    detectors: dict[str, float]  # each detector's score at scoring time
    has_text: bool
    is_abuse: bool


@dataclass(frozen=True)
class Fitted:
    weights: dict[str, float]
    intercept: float
    stacker_weights: dict[str, float]
    stacker_intercept: float
    positives: int
    negatives: int
    report: dict[str, Any]


def _classifier() -> LogisticRegression:
    # Balanced weights undo label imbalance, like the online model's class weights.
    return LogisticRegression(class_weight="balanced", C=0.5, max_iter=2000)


def _metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    if not 0 < y.sum() < y.size:
        return {}
    return {"roc_auc": round(float(roc_auc_score(y, s)), 4), "pr_auc": round(float(average_precision_score(y, s)), 4)}


def _stack_matrix(rows: Sequence[LabelledRow], model_scores: np.ndarray) -> np.ndarray:
    return np.asarray([
        [fusion_inputs({**r.detectors, "model": float(p)}, r.has_text)[k] for k in FUSION_INPUTS]
        for r, p in zip(rows, model_scores)
    ])


def fit_rows(rows: Sequence[LabelledRow], names: Sequence[str] = FEATURE_NAMES, holdout: float = 0.2) -> Fitted:
    """Time-split fit, held-out report, then the deployable fit on everything."""
    rows = sorted(rows, key=lambda r: r.ts)
    y = np.asarray([r.is_abuse for r in rows])
    positives, negatives = int(y.sum()), int((~y).sum())
    if min(positives, negatives) < MIN_PER_CLASS * 2:
        raise BootstrapError(f"the history has {positives} abusive and {negatives} benign labelled events; "
                             f"a bootstrap needs at least {MIN_PER_CLASS * 2} of each: give it a longer history")
    X = np.asarray([r.inputs for r in rows])
    cut = int(len(rows) * (1 - holdout))
    train, test = slice(0, cut), slice(cut, None)
    if min(y[train].sum(), (~y[train]).sum(), y[test].sum(), (~y[test]).sum()) < MIN_PER_CLASS:
        raise BootstrapError("too few labels of one class on one side of the time split; "
                             "give a longer history or change --holdout")
    model = _classifier().fit(X[train], y[train])
    held_out_scores = model.predict_proba(X[test])[:, 1]
    held_out_rows = rows[cut:]

    stack_X = _stack_matrix(held_out_rows, held_out_scores)
    folds = StratifiedKFold(n_splits=min(5, int(y[test].sum()), int((~y[test]).sum())), shuffle=True, random_state=0)
    stacked_cv = cross_val_predict(_classifier(), stack_X, y[test], cv=folds, method="predict_proba")[:, 1]
    stacker = _classifier().fit(stack_X, y[test])

    held_out = {
        "events": len(held_out_rows),
        "abusive": int(y[test].sum()),
        "sklearn_model": _metrics(y[test], held_out_scores),
        "stacked_fusion": _metrics(y[test], stacked_cv),
        # what the live detectors gave these events, learning online from the history's labels
        **{f"online_{name}": _metrics(y[test], np.asarray([r.detectors[name] for r in held_out_rows]))
           for name in DETECTORS},
    }
    final = _classifier().fit(X, y)
    return Fitted(
        weights={n: float(w) for n, w in zip(names, final.coef_[0])},
        intercept=float(final.intercept_[0]),
        stacker_weights={n: float(w) for n, w in zip(FUSION_INPUTS, stacker.coef_[0])},
        stacker_intercept=float(stacker.intercept_[0]),
        positives=positives,
        negatives=negatives,
        report={"labelled_events": len(rows), "abusive": positives, "benign": negatives,
                "train_events": cut, "holdout_share": holdout, "held_out": held_out},
    )


def bootstrap(
    events: Iterable[bytes], labels: Mapping[str, dict[str, Any]], holdout: float = 0.2,
    min_labels_per_class: int = 20,
) -> tuple[ModelSet, dict[str, Any]]:
    """A warm-start ``ModelSet`` and its report from a labelled JSONL history."""
    detector = Detector(ModelSet.new(min_labels_per_class))
    rows: list[LabelledRow] = []

    def collect(score: dict[str, Any], is_abuse: bool | None, alerted: bool) -> None:
        if is_abuse is not None:
            rows.append(LabelledRow(score["ts"], [score["features"].get(n, 0.0) for n in FEATURE_NAMES],
                                    dict(score["detectors"]), "inputs" in score, is_abuse))

    passed = evaluate(events, dict(labels), label_delay_ms=None, detector=detector, on_score_record=collect)
    # The deployed weights meet the scaler as it stands after the history, so fit on that view.
    champion = detector.models.champion
    rows = [dataclasses.replace(r, inputs=[v for v in champion.inputs(dict(zip(FEATURE_NAMES, r.inputs))).values()])
            for r in rows]
    fitted = fit_rows(rows, holdout=holdout)
    models = detector.models
    for model in (models.champion, models.challenger):
        model.warm_start(fitted.weights, fitted.intercept, fitted.positives, fitted.negatives)
    models.fusion.warm_start(fitted.stacker_weights, fitted.stacker_intercept, fitted.positives, fitted.negatives)
    models.offset = -1  # the live training topic starts after the history
    report = {"history_events": passed.events, "rejected": passed.rejected, **fitted.report,
              "champion": models.champion.version, "fusion": models.fusion.version}
    models.bootstrap = report
    return models, report
