"""Entity state: one compact record per entity (per shard), updated by events, merged on read.

A record holds, for its entity, the first and last event time, rings of time
buckets per bucket width (only the channels the catalogue needs at that
width), sliding distinct sketches and recent text fingerprints::

    {"f": first_ms, "l": last_ms, "r": {"300000": [[bucket, ch1, ch2, ...], ...]},
     "d": {"users": "<sketch>"}, "t": [[simhash, ts_s], ...], "o": [partition, offset]}

A sketch is one string (``sketches``' packed form; a record written before round 31 may
hold one as a dict, read as well and rewritten packed when the record next changes).

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

from typing import Any, Iterable

import cython
from cython.cimports.libc.math import copysign

from detectors.catalog import (
    ALL_TYPES, CHANNELS, ENTITIES, FEATURE_NAMES, WINDOW_MS, WINDOWS, Count, Distinct, Entity, Event, IsNew, Mean,
    NearDuplicates, RateOfChange, Ratio, SinceFirstSeen, SinceLastSeen, Sum, HOUR,
)
from detectors.sketches import (
    MAX_WINDOWS_PER_SKETCH, NEAR_DUPLICATE_BITS, distinct_counts_back, distinct_expire, distinct_insert, distinct_merge,
    hashed, is_empty, new_distinct,
)

Record = dict[str, Any]
TEXT_MEMORY_MS = HOUR
RECENT_TEXTS = 24


def new_record() -> Record:
    return {"f": None, "l": None, "r": {}, "d": {}, "t": []}


@cython.ccall  # called from C within this module, from Python elsewhere
@cython.locals(oldest=cython.longlong)
def _prune_ring(ring: list, newest: cython.longlong, length: cython.longlong) -> list:
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
    plan: _Plan = _PLANS[entity.name]
    _apply_to_rings(record["r"], plan.rings, ts, watermark, amounts)
    novelty = _apply_to_sketches(record["d"], plan.sketches, event, ts, watermark)
    if entity.track_texts:
        _apply_to_texts(record, fingerprint, ts, watermark)
    return record, novelty


@cython.ccall
@cython.locals(width=cython.longlong, length=cython.longlong, newest=cython.longlong, idx=cython.longlong,
               i=cython.Py_ssize_t, n=cython.Py_ssize_t, channels=tuple, kept=list, ring=list, bucket=list)
def _apply_to_rings(rings: dict, plan_rings: tuple, ts: cython.longlong, watermark: cython.longlong,
                    amounts: dict) -> None:
    for key, width, length, channels in plan_rings:
        newest = watermark // width
        kept = rings.get(key)
        ring = _prune_ring(kept, newest, length) if kept else []
        idx = ts // width
        bucket = None
        if idx > newest - length:
            n = len(channels)
            for i in range(n):  # no list of the amounts: most are 0 and add nothing
                amount = amounts[channels[i]]
                if amount:
                    if bucket is None:
                        bucket = _bucket_of(ring, idx, n)
                    bucket[1 + i] = _add(bucket[1 + i], amount)
        if ring:
            if ring is not kept:
                rings[key] = ring
        elif kept is not None:
            del rings[key]


@cython.cfunc
@cython.locals(idx=cython.longlong, n_channels=cython.Py_ssize_t, bucket=list)
def _bucket_of(ring: list, idx, n_channels) -> list:
    """The bucket ``idx`` of ``ring`` (of ``n_channels`` values), added in bucket order if the
    ring has none."""
    if ring and ring[-1][0] == idx:  # most events fall in the newest bucket
        return ring[-1]
    for bucket in ring:
        if bucket[0] == idx:
            return bucket
    bucket = [idx] + [0] * n_channels
    ring.append(bucket)
    if len(ring) > 1 and ring[-2][0] > idx:  # a late event's bucket
        ring.sort(key=_bucket_order)
    return bucket


@cython.ccall
@cython.locals(ts_s=cython.longlong)
def _apply_to_sketches(sketches: dict, plan_sketches: tuple, event: dict, ts: cython.longlong,
                       watermark: cython.longlong) -> dict:
    novelty: dict[str, bool | None] = {}
    ts_s = ts // 1000
    for name, memory_ms, field in plan_sketches:
        stored = current = sketches.get(name)
        value = field(event)
        if current:
            current = distinct_expire(current, (watermark - memory_ms) // 1000)
        elif value:
            current = new_distinct()
        else:  # no sketch and nothing to count: none is made and dropped
            continue
        if value:
            current, known = distinct_insert(current, hashed(value), ts_s)
            novelty[name] = None if known is None else not known
        if not is_empty(current):
            if current is not stored:
                sketches[name] = current
        else:
            sketches.pop(name, None)
    return novelty


@cython.ccall
@cython.locals(ts_s=cython.longlong, since_s=cython.longlong)
def _apply_to_texts(record: dict, fingerprint: object, ts: cython.longlong, watermark: cython.longlong) -> None:
    """Keeps the RECENT_TEXTS newest texts by event time, within TEXT_MEMORY_MS of the watermark."""
    texts = record["t"]
    if fingerprint is not None:
        ts_s = ts // 1000
        texts = sorted(texts + [[fingerprint, ts_s]], key=_text_order)[-RECENT_TEXTS:]
    since_s = (watermark - TEXT_MEMORY_MS) // 1000
    record["t"] = [t for t in texts if t[1] >= since_s]


def _bucket_order(bucket: list) -> int:
    return bucket[0]


def _text_order(text: list[int]) -> tuple[int, int]:
    return text[1], text[0]


@cython.ccall
@cython.locals(a=cython.double, b=cython.double, total=cython.double)
def _add(current: int | float, amount: int | float) -> int | float:  # not `float`: Cython makes that a C double
    """A bucket's new value: an int while whole (as JSON keeps it), else rounded to cents."""
    try:
        a, b = _as_double(current), _as_double(amount)
    except OverflowError:  # an int beyond every double: added exactly below
        a = b = _EXACT_INTEGERS
    total = a + b
    # Within 2 ** 53 a double holds every whole number, so adding as doubles gives what adding
    # the Python numbers does (ints exactly, a float with an int as a double); beyond, Python adds.
    if -_EXACT_INTEGERS < a < _EXACT_INTEGERS and -_EXACT_INTEGERS < b < _EXACT_INTEGERS \
            and -_EXACT_INTEGERS < total < _EXACT_INTEGERS:
        return int(total) if total == cython.cast(cython.longlong, total) else round(total, 2)
    exact = current + amount
    return int(exact) if float(exact).is_integer() else round(exact, 2)


_EXACT_INTEGERS = cython.declare(cython.double, 2.0 ** 53)  # a C double: compared with C doubles above


@cython.cfunc
@cython.inline
def _as_double(value: object) -> cython.double:
    """A bucket's number as a C double, as ``float(value)`` gives it. An int (a count, as JSON
    keeps it) is converted directly: a double local given an int goes through int's
    ``__float__``, which makes and frees a float object (4% of extraction, round 12)."""
    if type(value) is int:
        return float(value)
    return value  # a float; anything else raises TypeError, as before


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
        ring = _prune_ring(sorted(buckets.values(), key=_bucket_order), watermark // width, entity.ring_lengths[width])
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
        merged["t"] = _merged_texts(present)
    return merged


def _merged_texts(records: list[Record]) -> list[list[int]]:
    """The RECENT_TEXTS newest texts of several shards, in event-time order."""
    return sorted((t for r in records for t in r["t"]), key=_text_order)[-RECENT_TEXTS:]


def is_idle(entity: Entity, record: Record, watermark_ms: int) -> bool:
    return record["l"] is not None and record["l"] < watermark_ms - entity.idle_expiry_ms


# Feature kinds, compiled once per entity into (code, name, arguments) steps: per event
# the catalogue is then a loop over tuples, not attribute lookups and name formatting.
# C ints when compiled, so comparing a step's code with them makes no Python int.
_WINDOW_SUM = cython.declare(cython.int, 0)
_MEAN = cython.declare(cython.int, 1)
_RATIO = cython.declare(cython.int, 2)
_RATE_OF_CHANGE = cython.declare(cython.int, 3)
_DISTINCT = cython.declare(cython.int, 4)
_IS_NEW = cython.declare(cython.int, 5)
_NEAR_DUPLICATES = cython.declare(cython.int, 6)
_AGE = cython.declare(cython.int, 7)
_SINCE_LAST = cython.declare(cython.int, 8)
# A window's sums are kept at slot * _MAX_CHANNELS + channel of one array of C doubles.
_MAX_WINDOWS = 8
_MAX_CHANNELS = 16


@cython.cclass
class _Plan:
    """An entity's catalogue as the per-event code reads it (C struct fields when compiled)."""
    zeros = cython.declare(dict, visibility="readonly")  # feature name -> 0.0
    rings = cython.declare(tuple, visibility="readonly")  # (ring key, bucket width, buckets kept, channels)
    sketches = cython.declare(tuple, visibility="readonly")  # (name, memory in ms, the field it counts)
    windows = cython.declare(tuple, visibility="readonly")  # per window slot: (width, buckets, ring key, channels)
    steps = cython.declare(tuple, visibility="readonly")  # (code, feature name, arguments...)
    distinct_windows = cython.declare(dict, visibility="readonly")  # sketch -> its windows' seconds, counted together

    def __init__(self, zeros: dict[str, float], rings: tuple, sketches: tuple, windows: tuple, steps: tuple,
                 distinct_windows: dict[str, tuple[int, ...]]) -> None:
        self.zeros, self.rings, self.sketches, self.windows, self.steps = zeros, rings, sketches, windows, steps
        self.distinct_windows = distinct_windows


# Feature names as the catalogue's own string objects (a feature's ``name`` makes a new string
# each time): the features dict of an event is keyed by these, so each lookup matches by identity.
_CATALOGUE_NAMES = {name: name for name in FEATURE_NAMES}


def _compile(entity: Entity) -> _Plan:
    windows = {f.window for f in entity.features if isinstance(f, (Count, Sum, Mean, Ratio))}
    if any(isinstance(f, RateOfChange) for f in entity.features):
        windows.add("1h")
    names = sorted(windows)  # type: ignore[type-var]
    if len(names) > _MAX_WINDOWS or max(map(len, entity.ring_layout.values())) > _MAX_CHANNELS:
        raise ValueError(f"entity {entity.name}: at most {_MAX_WINDOWS} windows of {_MAX_CHANNELS} channels")
    # where each window's sum of each channel is kept
    at = {w: {ch: slot * _MAX_CHANNELS + i for i, ch in enumerate(entity.ring_layout[WINDOWS[w][0]])}
          for slot, w in enumerate(names)}  # type: ignore[index]
    steps: list[tuple[Any, ...]] = []
    distinct_windows: dict[str, list[int]] = {}  # sketch -> the seconds of each window counting it
    for f in entity.features:
        name = _CATALOGUE_NAMES[f.name]
        if isinstance(f, (Count, Sum)):
            steps.append((_WINDOW_SUM, name, at[f.window][f.channel]))  # type: ignore[index]
        elif isinstance(f, Mean):
            steps.append((_MEAN, name, at[f.window][f.channel], at[f.window][f.per]))  # type: ignore[index]
        elif isinstance(f, Ratio):
            w = at[f.window]  # type: ignore[index]
            steps.append((_RATIO, name, w[f.numerator], w[f.denominator]))
        elif isinstance(f, RateOfChange):
            steps.append((_RATE_OF_CHANGE, name, at["1h"][f.channel],
                          1 + entity.ring_layout[HOUR].index(f.channel)))
        elif isinstance(f, Distinct):
            windows_of_sketch = distinct_windows.setdefault(f.sketch, [])
            windows_of_sketch.append(WINDOW_MS[f.window] // 1000)  # type: ignore[index]
            steps.append((_DISTINCT, name, f.sketch, len(windows_of_sketch) - 1))
        elif isinstance(f, IsNew):
            steps.append((_IS_NEW, name, f.sketch))
        elif isinstance(f, NearDuplicates):
            steps.append((_NEAR_DUPLICATES, name, WINDOW_MS[f.window] // 1000))  # type: ignore[index]
        elif isinstance(f, SinceFirstSeen):
            steps.append((_AGE, name))
        elif isinstance(f, SinceLastSeen):
            steps.append((_SINCE_LAST, name))
        else:  # pragma: no cover - the catalogue only declares the kinds above
            raise TypeError(f"unknown feature kind {type(f).__name__}")
    if any(len(seconds) > MAX_WINDOWS_PER_SKETCH for seconds in distinct_windows.values()):
        raise ValueError(f"entity {entity.name}: at most {MAX_WINDOWS_PER_SKETCH} windows per sketch")
    return _Plan(
        zeros={_CATALOGUE_NAMES[f.name]: 0.0 for f in entity.features},
        rings=tuple((str(width), width, entity.ring_lengths[width], channels)
                    for width, channels in entity.ring_layout.items()),
        sketches=tuple((sketch.name, sketch.memory_ms, sketch.field) for sketch in entity.sketches),
        windows=tuple((*WINDOWS[w], str(WINDOWS[w][0]), len(entity.ring_layout[WINDOWS[w][0]]))
                      for w in names),  # type: ignore[index]
        steps=tuple(steps),
        distinct_windows={sketch: tuple(seconds) for sketch, seconds in distinct_windows.items()},
    )


_PLANS = {name: _compile(entity) for name, entity in ENTITIES.items()}


def entity_features(
    entity: Entity, view: Record | None, event: Event, previous_last: int | None,
    novelty: dict[str, bool | None] | None = None, fingerprint: int | None = None,
    out: dict[str, float] | None = None,
) -> dict[str, float]:
    """Feature values of ``entity`` for ``event``; ``view`` already includes the event.

    With no key on the event (e.g. no IP) or no state, every feature is 0. The values
    are set in ``out`` if given (``extract`` fills one dict per event), else in a new dict.
    """
    return shard_features(entity, [view] if view else [], event, previous_last, novelty, fingerprint, out)


@cython.locals(code=cython.int, slot=cython.Py_ssize_t, channel=cython.Py_ssize_t, channels=cython.Py_ssize_t,
               base=cython.Py_ssize_t, i=cython.Py_ssize_t, watermark=cython.longlong, width=cython.longlong,
               oldest=cython.longlong, newest=cython.longlong, elapsed=cython.longlong, idx=cython.longlong,
               first=cython.longlong, kept=cython.longlong, amount=cython.double,
               value=cython.double, day=cython.double, denominator=cython.double, step=tuple, window=tuple,
               bucket=list, record=dict, rings=dict, out=dict, plan=_Plan, counted=dict, counts=list, novelty=dict,
               zeroed=cython.bint)
def shard_features(
    entity: Entity, shards: list[Record], event: Event, previous_last: int | None,
    novelty: dict[str, bool | None] | None = None, fingerprint: int | None = None,
    out: dict[str, float] | None = None, zeroed: bool = False,
) -> dict[str, float]:
    """``entity_features`` of ``merge_records(entity, shards)``, read from the shards as they
    are: no merged record is built and thrown away per event (docs/performance.md, round 14).
    ``zeroed`` says ``out`` holds 0.0 for each of the entity's features already (``extract``'s
    dict does): only the others are set then, as most of an event's features are 0 (round 17).

    Window sums add every shard's buckets in the window (the merged buckets' sums, but for
    the rounding to cents that merging does per bucket: equal within a double's precision);
    a window reads no bucket older than its ring keeps (the catalogue sizes the rings), so
    the merged view's pruning drops none it reads. Distinct counts go through
    ``distinct_union``; texts are merged as ``merge_records`` does.
    """
    plan = _PLANS[entity.name]
    if out is None:
        out = {}
    present = [r for r in shards if r]
    if not present:
        if not zeroed:
            out.update(plan.zeros)
        return out
    record = present[0]
    watermark, first = record["l"], record["f"]
    for record in present[1:]:
        if record["l"] > watermark:
            watermark = record["l"]
        if record["f"] < first:
            first = record["f"]
    # Each window's sums, bucket by bucket in bucket order as doubles (what the models get)
    sums = cython.declare(cython.double[128])  # _MAX_WINDOWS * _MAX_CHANNELS (C needs the number)
    for slot in range(len(plan.windows)):
        window = plan.windows[slot]
        width, kept, channels, base = window[0], window[1], window[3], slot * _MAX_CHANNELS
        for channel in range(channels):
            sums[base + channel] = 0.0
        oldest = watermark // width - kept  # C integers: no int objects per window
        for record in present:
            rings = record["r"]  # a C dict lookup below, not a call of the method ``get``
            for bucket in rings.get(window[2]) or ():
                idx = bucket[0]
                if idx > oldest:
                    for channel in range(channels):
                        amount = _as_double(bucket[1 + channel])
                        sums[base + channel] += amount
    novelty = novelty or {}
    counted = {}  # sketch name -> the counts of its windows
    for step in plan.steps:
        code = step[0]
        if code == _WINDOW_SUM:
            value = sums[step[2]]
        elif code == _MEAN or code == _RATIO:
            denominator = sums[step[3]]
            value = sums[step[2]] / denominator if denominator else 0.0
        elif code == _DISTINCT:
            counts = counted.get(step[2])
            if counts is None:  # the sketch's first window: all its windows are counted at once
                counts = counted[step[2]] = _sketch_counts(present, step[2], watermark // 1000,
                                                           plan.distinct_windows[step[2]])
            value = counts[step[3]]
        elif code == _RATE_OF_CHANGE:
            newest, i = watermark // HOUR, step[3]
            day = 0.0
            for record in present:
                rings = record["r"]
                for bucket in rings.get(_HOUR_KEY) or ():
                    idx = bucket[0]
                    if newest - 24 <= idx < newest:
                        amount = _as_double(bucket[i])
                        day += amount
            value = (sums[step[2]] + 1) / (day / 24 + 1)
        elif code == _IS_NEW:
            value = 1.0 if novelty.get(step[2]) else 0.0
        elif code == _NEAR_DUPLICATES:
            texts = present[0]["t"] if len(present) == 1 else _merged_texts(present)
            value = _near_duplicates(texts, event, fingerprint, watermark // 1000 - step[2])
        elif code == _AGE:
            elapsed = watermark - first
            value = elapsed / _HOUR_MS
        elif previous_last is None:  # _SINCE_LAST
            value = 86_400.0
        else:
            elapsed = event["ts"] - previous_last
            value = min(86_400.0, max(0, elapsed) / 1000.0)
        if value - value != 0:  # inf or nan: 0 (x - x is 0 only for finite x)
            value = 0.0
        if value != 0.0 or not zeroed or copysign(1.0, value) < 0:  # -0.0 is set: it prints as -0.0
            out[step[1]] = float(value)  # a float: a count is an int when run from source
    return out


_NO_COUNTS = [0] * MAX_WINDOWS_PER_SKETCH
_HOUR_MS = float(HOUR)
_HOUR_KEY = str(HOUR)


@cython.cfunc
@cython.locals(present=list, record=dict, sketches=dict, now_s=cython.longlong)
def _sketch_counts(present, name: str, now_s, seconds: tuple) -> list:
    """The counts of sketch ``name`` over the shards in ``present``, in the windows of
    ``seconds`` back from ``now_s`` (a shard alone is its own union: no list of parts)."""
    if len(present) == 1:
        sketches = present[0]["d"]
        sketch = sketches.get(name)
        return _NO_COUNTS if sketch is None else distinct_counts_back(sketch, now_s, seconds)
    parts = []
    for record in present:
        sketches = record["d"]
        if name in sketches:
            parts.append(sketches[name])
    return distinct_counts_back(parts, now_s, seconds) if parts else _NO_COUNTS  # counted as their union


@cython.locals(count=cython.int, own_ts=cython.longlong, since=cython.longlong, t=cython.longlong,
               h=cython.ulonglong, own=cython.ulonglong, found_own=cython.bint, text=list)
def _near_duplicates(texts: list[list[int]], event: Event, fingerprint: int | None, since_s: int) -> float:
    """Texts since ``since_s`` within NEAR_DUPLICATE_BITS of ``fingerprint``, but the event's own."""
    if fingerprint is None:
        return 0.0
    own, own_ts, since = fingerprint, event["ts"] // 1000, since_s
    count, found_own = 0, False
    for text in texts:
        h, t = text[0], text[1]
        if not found_own and h == own and t == own_ts:
            found_own = True  # the event itself is in the view (once)
        elif t >= since and _bits_set(h ^ own) <= NEAR_DUPLICATE_BITS:
            count += 1
    return float(count)


@cython.cfunc
@cython.inline
@cython.locals(x=cython.ulonglong)
def _bits_set(x) -> cython.int:
    """``hamming``'s popcount on a C integer (no Python int per text): bits per 2, 4, 8, then
    the bytes added into the lowest (no byte exceeds 64, so no carry reaches it)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F
