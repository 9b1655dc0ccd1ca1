"""Joining late labels to the features an event had when it was scored.

The join keeps one small record per scored event id (``pending``). Whichever
of score and label arrives second triggers learning, so a label that overtakes
its score is not lost. A later label that disagrees with the learned one (an
appeal overturning a moderator) is learned as a correction.

>>> pending, learn = on_label(None, "abuse")
>>> learn is None
True
>>> pending, learn = on_score(pending, {"x": 1.0}, ts=5)
>>> learn
({'x': 1.0}, True)
>>> pending, learn = on_label(pending, "abuse")   # duplicate label: no new information
>>> learn is None
True
>>> pending, learn = on_label(pending, "benign")  # appeal overturns it
>>> learn
({'x': 1.0}, False)
"""

from __future__ import annotations

from typing import Any

Learn = tuple[dict[str, float], bool] | None


def on_score(pending: dict[str, Any] | None, features: dict[str, float], ts: int) -> tuple[dict[str, Any], Learn]:
    pending = dict(pending or {})
    pending["f"] = features
    pending["ts"] = ts
    return _learn_if_due(pending)


def on_label(pending: dict[str, Any] | None, label: str) -> tuple[dict[str, Any], Learn]:
    pending = dict(pending or {})
    pending["y"] = label
    return _learn_if_due(pending)


def _learn_if_due(pending: dict[str, Any]) -> tuple[dict[str, Any], Learn]:
    features, label = pending.get("f"), pending.get("y")
    if features is None or label is None or pending.get("learned") == label:
        return pending, None
    pending["learned"] = label
    return pending, (features, label == "abuse")
