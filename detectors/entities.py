"""Entity state: one compact record per entity (per shard), updated by events, merged on read.

A record holds, for its entity, the first and last event time, rings of time
buckets per bucket width (only the channels the catalogue needs at that
width), sliding distinct sketches and recent text fingerprints::

    {"f": first_ms, "l": last_ms, "r": {"300000": [[bucket, ch1, ch2, ...], ...]},
     "d": {"users": <sketch>}, "t": [[simhash, ts_s], ...], "o": [partition, offset]}

``o`` is the last input record applied (see ``features.extract``).

Event-time rule: each record's *watermark* is the largest event time it has
seen (``l``); rings keep the buckets that end within their length of it.
Windows are answered at the watermark of the (merged) view, so the event being
scored is included and events from the future of the view cannot exist. A
late event still inside a ring counts in its own bucket; an event older than
a ring only updates the rings, sketches and lifetime fields it still fits.
An entity idle for ``Entity.idle_expiry_ms`` of event time is deleted.

>>> from detectors.catalog import IP
>>> login = {"type": "login", "ts": 60_000, "user_id": "u1", "ip": "1.2.3.4", "success": False}
>>> shard_a, _ = apply_event(IP, None, login)
>>> shard_b, _ = apply_event(IP, None, dict(login, user_id="u2", ts=61_000))
>>> view = merge_records(IP, [shard_a, shard_b])
>>> f = entity_features(IP, view, dict(login, user_id="u2", ts=61_000), previous_last=60_000)
>>> f["ip_login_failures_10m"], f["ip_distinct_users_10m"]
(2.0, 2.0)
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from detectors.catalog import (
    CHANNELS, WINDOW_MS, WINDOWS, Count, Distinct, Entity, Event, IsNew, Mean, NearDuplicates, RateOfChange, Ratio,
    SinceFirstSeen, SinceLastSeen, Sum, HOUR,
)
from detectors.sketches import (
    NEAR_DUPLICATE_BITS, distinct_add, distinct_contains, distinct_count, distinct_expire, distinct_merge, hamming,
    new_distinct,
)

Record = dict[str, Any]
TEXT_MEMORY_MS = HOUR
RECENT_TEXTS = 24


def new_record() -> Record:
    return {"f": None, "l": None, "r": {}, "d": {}, "t": []}


def _prune_ring(ring: list[list], newest: int, length: int) -> list[list]:
    oldest = newest - length + 1
    return [b for b in ring if b[0] >= oldest]


def apply_event(
    entity: Entity, record: Record | None, event: Event, fingerprint: int | None = None,
) -> tuple[Record, dict[str, bool | None]]:
    """Folds ``event`` into one record of ``entity``; returns the record and, per
    sketch, whether the event's value was new to it (None if unknowable).
    ``fingerprint`` is the event text's simhash, for entities that track texts."""
    record = new_record() if record is None else record
    ts = int(event["ts"])
    watermark = ts if record["l"] is None else max(record["l"], ts)
    record["f"] = ts if record["f"] is None else min(record["f"], ts)
    record["l"] = watermark

    rings = record["r"]
    for width, channels in entity.ring_layout.items():
        key = str(width)
        length = entity.ring_lengths[width]
        ring = _prune_ring(rings.get(key, []), watermark // width, length)
        amounts = [CHANNELS[ch].amount(event) for ch in channels]
        idx = ts // width
        if any(amounts) and idx > watermark // width - length:
            for bucket in ring:
                if bucket[0] == idx:
                    break
            else:
                bucket = [idx] + [0] * len(channels)
                ring.append(bucket)
                ring.sort(key=lambda b: b[0])
            for i, amount in enumerate(amounts):
                if amount:
                    bucket[1 + i] = _add(bucket[1 + i], amount)
        if ring:
            rings[key] = ring
        else:
            rings.pop(key, None)

    novelty: dict[str, bool | None] = {}
    sketches = record["d"]
    ts_s = ts // 1000
    for sketch in entity.sketches:
        current = distinct_expire(sketches.get(sketch.name, new_distinct()), (watermark - sketch.memory_ms) // 1000)
        value = sketch.field(event)
        if value:
            known = distinct_contains(current, value)
            novelty[sketch.name] = None if known is None else not known
            current = distinct_add(current, value, ts_s)
        if current.get("x") or current.get("h"):
            sketches[sketch.name] = current
        else:
            sketches.pop(sketch.name, None)

    if entity.track_texts:
        # The RECENT_TEXTS newest texts by event time, within TEXT_MEMORY_MS of the watermark.
        texts = record["t"]
        if fingerprint is not None:
            texts = sorted(texts + [[fingerprint, ts_s]], key=_text_order)[-RECENT_TEXTS:]
        since_s = (watermark - TEXT_MEMORY_MS) // 1000
        record["t"] = [t for t in texts if t[1] >= since_s]
    return record, novelty


def _text_order(text: list[int]) -> tuple[int, int]:
    return text[1], text[0]


def _add(current: float, amount: float) -> float:
    total = current + amount
    return int(total) if float(total).is_integer() else round(total, 2)


def merge_records(entity: Entity, records: Iterable[Record | None]) -> Record | None:
    """The union of several shards of one entity (sums, sketch unions, min/max times)."""
    present = [r for r in records if r]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    watermark = max(r["l"] for r in present)
    merged: Record = {"f": min(r["f"] for r in present), "l": watermark, "r": {}, "d": {}, "t": []}
    for width in entity.ring_layout:
        key = str(width)
        buckets: dict[int, list] = {}
        for r in present:
            for bucket in r["r"].get(key, ()):
                into = buckets.get(bucket[0])
                if into is None:
                    buckets[bucket[0]] = list(bucket)
                else:
                    for i in range(1, len(bucket)):
                        into[i] = _add(into[i], bucket[i])
        ring = _prune_ring(sorted(buckets.values(), key=lambda b: b[0]), watermark // width, entity.ring_lengths[width])
        if ring:
            merged["r"][key] = ring
    for sketch in entity.sketches:
        parts = [r["d"][sketch.name] for r in present if sketch.name in r["d"]]
        if parts:
            combined = parts[0]
            for part in parts[1:]:
                combined = distinct_merge(combined, part)
            merged["d"][sketch.name] = combined
    if entity.track_texts:
        merged["t"] = sorted((t for r in present for t in r["t"]), key=_text_order)[-RECENT_TEXTS:]
    return merged


def is_idle(entity: Entity, record: Record, watermark_ms: int) -> bool:
    return record["l"] is not None and record["l"] < watermark_ms - entity.idle_expiry_ms


def _window_sums(record: Record, entity: Entity, window: str) -> dict[str, float]:
    width, n = WINDOWS[window]
    channels = entity.ring_layout[width]
    newest = record["l"] // width
    sums = [0.0] * len(channels)
    for bucket in record["r"].get(str(width), ()):
        if bucket[0] > newest - n:
            for i in range(len(channels)):
                sums[i] += bucket[1 + i]
    return dict(zip(channels, sums))


def entity_features(
    entity: Entity, view: Record | None, event: Event, previous_last: int | None,
    novelty: dict[str, bool | None] | None = None, fingerprint: int | None = None,
) -> dict[str, float]:
    """Feature values of ``entity`` for ``event``; ``view`` already includes the event.

    With no key on the event (e.g. no IP) or no state, every feature is 0.
    """
    if view is None:
        return {f.name: 0.0 for f in entity.features}
    out: dict[str, float] = {}
    cache: dict[str, dict[str, float]] = {}

    def sums(window: str) -> dict[str, float]:
        if window not in cache:
            cache[window] = _window_sums(view, entity, window)
        return cache[window]

    watermark = view["l"]
    for f in entity.features:
        if isinstance(f, (Count, Sum)):
            value = sums(f.window)[f.channel]  # type: ignore[index]
        elif isinstance(f, Mean):
            s = sums(f.window)  # type: ignore[arg-type]
            value = s[f.channel] / s[f.per] if s[f.per] else 0.0
        elif isinstance(f, Ratio):
            s = sums(f.window)  # type: ignore[arg-type]
            value = s[f.numerator] / s[f.denominator] if s[f.denominator] else 0.0
        elif isinstance(f, RateOfChange):
            this_hour = sums("1h")[f.channel]
            newest = watermark // HOUR
            day = sum(b[1 + entity.ring_layout[HOUR].index(f.channel)]
                      for b in view["r"].get(str(HOUR), ()) if newest - 24 <= b[0] < newest)
            value = (this_hour + 1) / (day / 24 + 1)
        elif isinstance(f, Distinct):
            sketch = view["d"].get(f.sketch)
            value = float(distinct_count(sketch, (watermark - WINDOW_MS[f.window]) // 1000)) if sketch else 0.0  # type: ignore[index]
        elif isinstance(f, IsNew):
            value = 1.0 if (novelty or {}).get(f.sketch) else 0.0
        elif isinstance(f, NearDuplicates):
            value = 0.0
            if fingerprint is not None:
                since = (watermark - WINDOW_MS[f.window]) // 1000  # type: ignore[index]
                earlier = list(view["t"])
                own = [fingerprint, event["ts"] // 1000]
                if own in earlier:
                    earlier.remove(own)  # the event itself is in the view
                value = float(sum(1 for h, t in earlier if t >= since and hamming(h, fingerprint) <= NEAR_DUPLICATE_BITS))
        elif isinstance(f, SinceFirstSeen):
            value = (watermark - view["f"]) / HOUR
        elif isinstance(f, SinceLastSeen):
            value = 86_400.0 if previous_last is None else min(86_400.0, max(0, event["ts"] - previous_last) / 1000)
        else:  # pragma: no cover - the catalogue only declares the kinds above
            raise TypeError(f"unknown feature kind {type(f).__name__}")
        out[f.name] = float(value) if not isinstance(value, float) or math.isfinite(value) else 0.0
    return out
