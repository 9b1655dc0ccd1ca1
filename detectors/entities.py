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

from dataclasses import dataclass
from typing import Any, Iterable

from detectors.catalog import (
    ALL_TYPES, CHANNELS, ENTITIES, WINDOW_MS, WINDOWS, Count, Distinct, Entity, Event, IsNew, Mean, NearDuplicates,
    RateOfChange, Ratio, SinceFirstSeen, SinceLastSeen, Sum, HOUR,
)
from detectors.sketches import (
    NEAR_DUPLICATE_BITS, distinct_add_hash, distinct_contains_hash, distinct_count, distinct_expire, distinct_merge,
    hamming, hash32, new_distinct,
)

Record = dict[str, Any]
TEXT_MEMORY_MS = HOUR
RECENT_TEXTS = 24


def new_record() -> Record:
    return {"f": None, "l": None, "r": {}, "d": {}, "t": []}


def _prune_ring(ring: list[list], newest: int, length: int) -> list[list]:
    oldest = newest - length + 1
    if not ring or ring[0][0] >= oldest:  # rings are kept in bucket order
        return ring
    return [b for b in ring if b[0] >= oldest]


_NO_AMOUNTS = {name: 0.0 for name in CHANNELS}
_CHANNELS_OF_TYPE = {kind: tuple((name, channel) for name, channel in CHANNELS.items() if kind in channel.types)
                     for kind in ALL_TYPES}


def channel_amounts(event: Event) -> dict[str, float]:
    """What ``event`` adds to each channel: computed once per event for all its entities."""
    amounts = dict(_NO_AMOUNTS)
    for name, channel in _CHANNELS_OF_TYPE.get(event["type"], ()):  # the others add 0 for this type
        amounts[name] = channel.amount(event)
    return amounts


def apply_event(
    entity: Entity, record: Record | None, event: Event, fingerprint: int | None = None,
    amounts: dict[str, float] | None = None,
) -> tuple[Record, dict[str, bool | None]]:
    """Folds ``event`` into one record of ``entity``; returns the record and, per
    sketch, whether the event's value was new to it (None if unknowable).
    ``fingerprint`` is the event text's simhash, for entities that track texts;
    ``amounts`` the event's ``channel_amounts`` if the caller has them already."""
    record = new_record() if record is None else record
    amounts = channel_amounts(event) if amounts is None else amounts
    ts = int(event["ts"])
    watermark = ts if record["l"] is None else max(record["l"], ts)
    record["f"] = ts if record["f"] is None else min(record["f"], ts)
    record["l"] = watermark

    rings = record["r"]
    for key, width, length, channels in _PLANS[entity.name].rings:
        ring = _prune_ring(rings.get(key) or [], watermark // width, length)
        idx = ts // width
        added = [amounts[ch] for ch in channels] if idx > watermark // width - length else ()
        if any(added):
            if ring and ring[-1][0] == idx:  # most events fall in the newest bucket
                bucket = ring[-1]
            else:
                for bucket in ring:
                    if bucket[0] == idx:
                        break
                else:
                    bucket = [idx] + [0] * len(channels)
                    ring.append(bucket)
                    if len(ring) > 1 and ring[-2][0] > idx:  # a late event's bucket
                        ring.sort(key=lambda b: b[0])
            for i, amount in enumerate(added):
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
        current = distinct_expire(sketches.get(sketch.name) or new_distinct(), (watermark - sketch.memory_ms) // 1000)
        value = sketch.field(event)
        if value:
            h = hash32(value)
            known = distinct_contains_hash(current, h)
            novelty[sketch.name] = None if known is None else not known
            current = distinct_add_hash(current, h, ts_s)
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


# Feature kinds, compiled once per entity into (code, name, arguments) steps: per event
# the catalogue is then a loop over tuples, not attribute lookups and name formatting.
_WINDOW_SUM, _MEAN, _RATIO, _RATE_OF_CHANGE, _DISTINCT, _IS_NEW, _NEAR_DUPLICATES, _AGE, _SINCE_LAST = range(9)


@dataclass(frozen=True)
class _Plan:
    zeros: dict[str, float]
    rings: tuple[tuple[str, int, int, tuple[str, ...]], ...]  # ring key, bucket width, buckets kept, channels
    windows: tuple[tuple[str, int, int, str, int], ...]  # window name, bucket width, buckets, ring key, channels
    steps: tuple[tuple[Any, ...], ...]


def _compile(entity: Entity) -> _Plan:
    windows = {f.window for f in entity.features if isinstance(f, (Count, Sum, Mean, Ratio))}
    if any(isinstance(f, RateOfChange) for f in entity.features):
        windows.add("1h")
    index = {w: {ch: i for i, ch in enumerate(entity.ring_layout[WINDOWS[w][0]])} for w in windows}  # type: ignore[index]
    steps: list[tuple[Any, ...]] = []
    for f in entity.features:
        if isinstance(f, (Count, Sum)):
            steps.append((_WINDOW_SUM, f.name, f.window, index[f.window][f.channel]))  # type: ignore[index]
        elif isinstance(f, Mean):
            steps.append((_MEAN, f.name, f.window, index[f.window][f.channel], index[f.window][f.per]))  # type: ignore[index]
        elif isinstance(f, Ratio):
            w = index[f.window]  # type: ignore[index]
            steps.append((_RATIO, f.name, f.window, w[f.numerator], w[f.denominator]))
        elif isinstance(f, RateOfChange):
            steps.append((_RATE_OF_CHANGE, f.name, "1h", index["1h"][f.channel],
                          1 + entity.ring_layout[HOUR].index(f.channel)))
        elif isinstance(f, Distinct):
            steps.append((_DISTINCT, f.name, f.sketch, WINDOW_MS[f.window] // 1000))  # type: ignore[index]
        elif isinstance(f, IsNew):
            steps.append((_IS_NEW, f.name, f.sketch))
        elif isinstance(f, NearDuplicates):
            steps.append((_NEAR_DUPLICATES, f.name, WINDOW_MS[f.window] // 1000))  # type: ignore[index]
        elif isinstance(f, SinceFirstSeen):
            steps.append((_AGE, f.name))
        elif isinstance(f, SinceLastSeen):
            steps.append((_SINCE_LAST, f.name))
        else:  # pragma: no cover - the catalogue only declares the kinds above
            raise TypeError(f"unknown feature kind {type(f).__name__}")
    return _Plan(
        zeros={f.name: 0.0 for f in entity.features},
        rings=tuple((str(width), width, entity.ring_lengths[width], channels)
                    for width, channels in entity.ring_layout.items()),
        windows=tuple((w, *WINDOWS[w], str(WINDOWS[w][0]), len(entity.ring_layout[WINDOWS[w][0]]))
                      for w in sorted(windows)),  # type: ignore[index]
        steps=tuple(steps),
    )


_PLANS = {name: _compile(entity) for name, entity in ENTITIES.items()}


def _window_sums(record: Record, width: int, n: int, ring_key: str, channels: int) -> list[float]:
    ring = record["r"].get(ring_key) or ()
    oldest = record["l"] // width - n
    # A ring is pruned to its record's watermark, so it is usually the window as it stands.
    window = ring if not ring or ring[0][0] > oldest else [bucket for bucket in ring if bucket[0] > oldest]
    if not window:
        return [0.0] * channels
    if len(window) == 1:
        return [float(v) for v in window[0][1:]]
    # summed in bucket order, as floats: the same values as adding bucket by bucket
    return [float(sum(column)) for column in list(zip(*window))[1:]]


def entity_features(
    entity: Entity, view: Record | None, event: Event, previous_last: int | None,
    novelty: dict[str, bool | None] | None = None, fingerprint: int | None = None,
) -> dict[str, float]:
    """Feature values of ``entity`` for ``event``; ``view`` already includes the event.

    With no key on the event (e.g. no IP) or no state, every feature is 0.
    """
    plan = _PLANS[entity.name]
    if view is None:
        return dict(plan.zeros)
    watermark = view["l"]
    sums = {w: _window_sums(view, width, n, key, channels) for w, width, n, key, channels in plan.windows}
    novelty = novelty or {}
    sketches = view["d"]
    out: dict[str, float] = {}
    for step in plan.steps:
        code = step[0]
        if code == _WINDOW_SUM:
            value = sums[step[2]][step[3]]
        elif code == _MEAN or code == _RATIO:
            s = sums[step[2]]
            value = s[step[3]] / s[step[4]] if s[step[4]] else 0.0
        elif code == _DISTINCT:
            sketch = sketches.get(step[2])
            value = float(distinct_count(sketch, watermark // 1000 - step[3])) if sketch else 0.0
        elif code == _RATE_OF_CHANGE:
            this_hour = sums[step[2]][step[3]]
            newest, i = watermark // HOUR, step[4]
            day = sum(b[i] for b in view["r"].get(_HOUR_KEY, ()) if newest - 24 <= b[0] < newest)
            value = (this_hour + 1) / (day / 24 + 1)
        elif code == _IS_NEW:
            value = 1.0 if novelty.get(step[2]) else 0.0
        elif code == _NEAR_DUPLICATES:
            value = _near_duplicates(view["t"], event, fingerprint, watermark // 1000 - step[2])
        elif code == _AGE:
            value = (watermark - view["f"]) / HOUR
        else:  # _SINCE_LAST
            value = 86_400.0 if previous_last is None else min(86_400.0, max(0, event["ts"] - previous_last) / 1000)
        # float, and 0 for inf/nan (x - x is 0 only for finite x)
        out[step[1]] = float(value) if value - value == 0 else 0.0
    return out


_HOUR_KEY = str(HOUR)


def _near_duplicates(texts: list[list[int]], event: Event, fingerprint: int | None, since_s: int) -> float:
    if fingerprint is None:
        return 0.0
    earlier = list(texts)
    own = [fingerprint, event["ts"] // 1000]
    if own in earlier:
        earlier.remove(own)  # the event itself is in the view
    return float(sum(1 for h, t in earlier if t >= since_s and hamming(h, fingerprint) <= NEAR_DUPLICATE_BITS))
