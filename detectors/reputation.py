"""Label-derived reputation: confirmed-abusive events per entity over 1, 7 and 28 days.

A label counts from the moment it was decided (its ``ts``), never earlier: an
event at time t sees only labels with ``ts <= t``, so no label leaks into the
past, and a label never reaches its own event (which was scored before the
label existed). An appeal that overturns an abuse label removes that count
from the moment the appeal is decided.

The record per entity keeps labels of the last two hours exactly (``r``:
``[label_ts_ms, +1 | -1]``) and older ones in hourly buckets (``h``:
``[hour, count]``) for 28 days, so it stays bounded however hot the entity.
An event older than a bucket's end cannot see that bucket (never a leak; at
worst an undercount for events that arrive hours late).

>>> r = None
>>> r = add_label(r, label_ts=5 * DAY, delta=+1)
>>> r = add_label(r, label_ts=9 * DAY, delta=+1)
>>> reputation_features("ip", r, at_ts=9 * DAY + HOUR)
{'ip_abuse_labels_1d': 1.0, 'ip_abuse_labels_7d': 2.0, 'ip_abuse_labels_28d': 2.0}
>>> reputation_features("ip", r, at_ts=6 * DAY - HOUR)   # the later label is not visible yet
{'ip_abuse_labels_1d': 1.0, 'ip_abuse_labels_7d': 1.0, 'ip_abuse_labels_28d': 1.0}
"""

from __future__ import annotations

from functools import lru_cache

import orjson

DAY = 86_400_000
WINDOWS = {"1d": DAY, "7d": 7 * DAY, "28d": 28 * DAY}
MEMORY_MS = 28 * DAY

HOUR = 3_600_000
EXACT_MS = 2 * HOUR

Reputation = dict[str, list[list[int]]]


def feature_name(entity: str, window: str) -> str:
    return f"{entity}_abuse_labels_{window}"


@lru_cache(maxsize=None)  # one per entity type, asked for every event
def feature_names(entity: str) -> tuple[str, ...]:
    return tuple(feature_name(entity, w) for w in WINDOWS)


def add_label(record: Reputation | None, label_ts: int, delta: int) -> Reputation:
    """+1 when an event involving the entity is labelled abuse, -1 when that label is overturned."""
    raw = sorted([*(record or {}).get("r", []), [label_ts, delta]])
    hours = {h: c for h, c in (record or {}).get("h", [])}
    newest = max([raw[-1][0]] + [h * HOUR for h in hours])
    keep = []
    for ts, d in raw:
        if ts <= newest - EXACT_MS:
            hours[ts // HOUR] = hours.get(ts // HOUR, 0) + d
        else:
            keep.append([ts, d])
    oldest_hour = (newest - MEMORY_MS) // HOUR
    return {"r": keep, "h": sorted([h, c] for h, c in hours.items() if h > oldest_hour and c)}


def add_label_stored(stored: bytes | None, label_ts: int, delta: int) -> bytes:
    """``add_label`` on a record as the stores keep it (JSON bytes in and out)."""
    return orjson.dumps(add_label(orjson.loads(stored) if stored else None, label_ts, delta))


def reputation_features(entity: str, record: Reputation | None, at_ts: int) -> dict[str, float]:
    if not record:  # most entities never had a label
        return dict.fromkeys(feature_names(entity), 0.0)
    out = {}
    for name, width in zip(feature_names(entity), WINDOWS.values()):
        count = sum(d for ts, d in record.get("r", ()) if at_ts - width < ts <= at_ts)
        # an hourly bucket counts only once it has ended by at_ts (never a leak)
        count += sum(c for h, c in record.get("h", ()) if (h + 1) * HOUR <= at_ts and h * HOUR > at_ts - width)
        out[name] = float(max(0, count))
    return out


def label_deltas(previous: str | None, label: str) -> int:
    """How an entity's abuse count changes when an event's label goes from ``previous`` to ``label``."""
    was, now = previous == "abuse", label == "abuse"
    return int(now) - int(was)

