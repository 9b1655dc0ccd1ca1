"""Joining late labels to what an event looked like when it was scored.

The join keeps one small record per scored event id (``pending``): the
features, each detector's score and the text inputs at scoring time, and the
entities involved. Whichever of score and label arrives second yields a
*training example*, so a label that overtakes its score is not lost. A later
label that disagrees with the learned one (an appeal overturning a moderator)
yields a correction example carrying the previous label.

>>> score = {"event_id": "e1", "ts": 5, "features": {"x": 1.0}, "detectors": {"model": 0.4},
...          "entities": {"user": "u1"}}
>>> pending, example = on_label(None, {"event_id": "e1", "label": "abuse", "ts": 9, "source": "moderator"})
>>> example is None
True
>>> pending, example = on_score(pending, score)
>>> example["label"], example["previous_label"], example["features"]
('abuse', None, {'x': 1.0})
>>> pending, example = on_label(pending, {"event_id": "e1", "label": "abuse", "ts": 10, "source": "moderator"})
>>> example is None   # a duplicate label carries no new information
True
>>> pending, example = on_label(pending, {"event_id": "e1", "label": "benign", "ts": 99, "source": "appeal"})
>>> example["label"], example["previous_label"], example["label_ts"]
('benign', 'abuse', 99)
"""

from __future__ import annotations

from typing import Any

from detectors.content import shares_of

Example = dict[str, Any]


def on_score(pending: dict[str, Any] | None, risk_score: dict[str, Any]) -> tuple[dict[str, Any], Example | None]:
    pending = dict(pending or {})
    pending.update(
        id=risk_score["event_id"], f=risk_score["features"], d=risk_score["detectors"], ts=risk_score["ts"],
        e=risk_score.get("entities", {}), x=_text_shares((risk_score.get("inputs") or {}).get("text")),
    )
    return _example_if_due(pending)


def _text_shares(counts: dict[str, float] | None) -> dict[str, float] | None:
    """A score's text n-gram counts as the content model learns them (a score written before
    round 21 carries the shares already: they come back as they were, within a rounding)."""
    return shares_of(counts) if counts else counts


def on_label(pending: dict[str, Any] | None, label: dict[str, Any]) -> tuple[dict[str, Any], Example | None]:
    pending = dict(pending or {})
    pending.update(id=label["event_id"], y=label["label"], yts=label["ts"], src=label["source"])
    return _example_if_due(pending)


def _example_if_due(pending: dict[str, Any]) -> tuple[dict[str, Any], Example | None]:
    label = pending.get("y")
    if pending.get("f") is None or label is None or pending.get("learned") == label:
        return pending, None
    previous = pending.get("learned")
    pending["learned"] = label
    return pending, {
        "schema_version": 1,
        "event_id": pending["id"],
        "label": label,
        "previous_label": previous,
        "label_ts": pending["yts"],
        "source": pending["src"],
        "event_ts": pending["ts"],
        "features": pending["f"],
        "detectors": pending["d"],
        "text": pending.get("x"),
        "entities": pending.get("e", {}),
    }
