"""Entity state: one compact record per entity (per shard), updated by events, merged on read.

A record holds, for its entity, the first and last event time, rings of time
buckets per bucket width (only the channels the catalogue needs at that
width), sliding distinct sketches and recent text fingerprints::

    {"f": first_ms, "l": last_ms, "r": {"300000": "<ring>"},
     "d": {"users": "<sketch>"}, "t": [[simhash, ts_s], ...], "o": [partition, offset]}

A ring is one string of its buckets (see *packed rings* below; a record written before round
32, or a ring holding a value that does not pack, keeps ``[[bucket, ch1, ch2, ...], ...]``, read
as well). A sketch is one string (``sketches``' packed form; a record written before round 31
may hold one as a dict, read as well and rewritten packed when the record next changes).

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

if cython.compiled:  # a packed ring's characters read, and a new one's written, in place (see _chars)
    from cython.cimports.cpython.unicode import PyUnicode_1BYTE_DATA, PyUnicode_New
    from cython.cimports.libc.string import memcpy

from detectors.catalog import (
    ALL_TYPES, CHANNELS, ENTITIES, FEATURE_NAMES, WINDOW_MS, WINDOWS, Count, Distinct, Entity, Event, IsNew, Mean,
    NearDuplicates, RateOfChange, Ratio, SinceFirstSeen, SinceLastSeen, Sum, HOUR,
)
from detectors.sketches import (
    MAX_WINDOWS_PER_SKETCH, NEAR_DUPLICATE_BITS, distinct_count, distinct_counts_back, distinct_expire, distinct_insert,
    distinct_merge, hashed, is_empty, is_exact, new_distinct,
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


# -- packed rings -----------------------------------------------------------------
# A ring is one string of printable ASCII (round 32): its value width and channel count (a digit
# each), then its buckets in bucket order, each the bucket's index (6 digits) and one value per
# channel (the value width in digits: 2 * n for a whole n, 2 * c + 1 for c cents). Digits are
# 6-bit, most significant first, as in ``sketches``' packed form (48 + d, 49 + d from 44 on: no
# backslash, so JSON never escapes one). A record is then decoded, encoded and freed as a few
# strings where it held a list per bucket, and windows are summed from the characters.
# Every value ``_add`` makes below 2 ** 47 (whole or cents) packs; a ring holding any other
# (records written before round 32, or a sum too large) is kept as lists ``[[index, value, ...],
# ...]``, the reference form: both are read everywhere, and a list ring is packed when it fits.
_HEADER = cython.declare(cython.Py_ssize_t, 2)
_INDEX_DIGITS = cython.declare(cython.Py_ssize_t, 6)
_MAX_VALUE_DIGITS = cython.declare(cython.Py_ssize_t, 8)
_INDEX_LIMIT = cython.declare(cython.longlong, 1 << 36)  # 6 digits: every bucket index of a year-9999 time
_CODE_LIMIT = cython.declare(cython.longlong, 1 << 48)  # 8 digits
_VALUE_LIMIT = 1 << 47  # whole numbers, and cents, below it pack
_VALUE_LIMIT_D = cython.declare(cython.double, 2.0 ** 47)
_UNFIT = object()  # what a packed ring's update returns when its new value does not pack


@cython.cfunc
@cython.inline
@cython.locals(k=cython.Py_ssize_t, c=cython.uint, value=cython.ulonglong)
def _read(data: cython.p_uchar, at: cython.Py_ssize_t, digits: cython.Py_ssize_t) -> cython.longlong:
    value = 0
    for k in range(at, at + digits):
        c = data[k]
        value = (value << 6) | (c - 48 - (c > 92))
    return value


@cython.cfunc
@cython.inline
@cython.locals(k=cython.Py_ssize_t, d=cython.uint, value=cython.ulonglong)
def _write(out: cython.p_uchar, at: cython.Py_ssize_t, number: cython.longlong,
           digits: cython.Py_ssize_t) -> cython.int:
    value = number
    for k in range(at + digits - 1, at - 1, -1):
        d = value & 63
        out[k] = 48 + d + (d >= 44)
        value >>= 6
    return 0


# Compiled, a ring's characters are read where the string keeps them and a new ring is a string
# filled in before anything else sees it; from source, the same code reads bytes and fills a bytearray.
# These helpers and the two above are ``sketches``' own, repeated: a compiled module calls another's
# C functions only through a .pxd, which would stop either running from its source alone (see
# detectors/__init__.py), and through Python they would cost a call per digit.
@cython.cfunc
@cython.inline
def _chars(s: str) -> cython.p_uchar:
    if cython.compiled:
        return PyUnicode_1BYTE_DATA(s)
    return s.encode("ascii")


@cython.cfunc
@cython.inline
def _blank(n: cython.Py_ssize_t) -> object:
    if cython.compiled:
        return PyUnicode_New(n, 127)
    return bytearray(n)


@cython.cfunc
@cython.inline
def _writable(blank: object) -> cython.p_uchar:
    if cython.compiled:
        return PyUnicode_1BYTE_DATA(blank)
    return blank


@cython.cfunc
@cython.inline
def _finished(blank: object) -> str:
    if cython.compiled:
        return blank
    return blank.decode("ascii")


@cython.cfunc
@cython.inline
def _copy(out: cython.p_uchar, at: cython.Py_ssize_t, data: cython.p_uchar, start: cython.Py_ssize_t,
          n: cython.Py_ssize_t) -> cython.int:
    if cython.compiled:
        memcpy(out + at, data + start, n)
    else:
        out[at:at + n] = data[start:start + n]
    return 0


@cython.cfunc
@cython.locals(digits=cython.Py_ssize_t, channels=cython.Py_ssize_t, n=cython.Py_ssize_t, width=cython.Py_ssize_t)
def _ring_width(ring: str, expected_channels: cython.Py_ssize_t) -> cython.Py_ssize_t:
    """The characters per bucket of packed ``ring``; ValueError if it is not a ring of
    ``expected_channels`` (a corrupt record, or one of another catalogue)."""
    n = len(ring)
    if n >= _HEADER and ring.isascii():
        digits, channels = ord(ring[0]) - 48, ord(ring[1]) - 48
        width = _INDEX_DIGITS + digits * channels
        if 1 <= digits <= _MAX_VALUE_DIGITS and 1 <= channels == expected_channels and (n - _HEADER) % width == 0:
            return width
    raise ValueError(f"not a ring of {expected_channels} channels: {ring[:40]!r}")


@cython.cfunc
@cython.inline
@cython.locals(digits=cython.Py_ssize_t)
def _digits_for(code: cython.longlong) -> cython.Py_ssize_t:
    digits = 1
    while code >> (6 * digits):
        digits += 1
    return digits


@cython.cfunc
@cython.locals(cents=cython.longlong)
def _code_of(value: object) -> cython.longlong:
    """The packed code of a list ring's value, or -1 if it has none (negative, too large, a
    whole float or more than cents: kept as it is, in a list ring)."""
    if type(value) is int:
        return value * 2 if 0 <= value < _VALUE_LIMIT else -1
    if type(value) is float and 0 < value < _VALUE_LIMIT and not value.is_integer():
        cents = round(value * 100)
        # compiled, a C division: what Python's int division gives below 2 ** 53
        if cents < _VALUE_LIMIT_D and cents / 100 == value:
            return cents * 2 + 1
    return -1


@cython.cfunc
@cython.inline
def _value_of(code: cython.longlong) -> object:
    """The value a packed code stands for, as the list form holds it (an int, or cents as a float)."""
    if code & 1:
        return (code >> 1) / 100
    return code >> 1


@cython.ccall
@cython.locals(n=cython.Py_ssize_t, digits=cython.Py_ssize_t, width=cython.Py_ssize_t, at=cython.Py_ssize_t,
               i=cython.Py_ssize_t, code=cython.longlong, out=cython.p_uchar, bucket=list)
def _pack_ring(buckets: list, n) -> object:
    """``buckets`` (a ring of ``n`` channels as lists) packed, or None if a value does not pack."""
    digits = 1
    for bucket in buckets:
        if len(bucket) != n + 1 or type(bucket[0]) is not int or not 0 <= bucket[0] < _INDEX_LIMIT:
            return None
        for i in range(1, n + 1):
            code = _code_of(bucket[i])
            if code < 0:
                return None
            digits = max(digits, _digits_for(code))
    width = _INDEX_DIGITS + digits * n
    blank = _blank(_HEADER + width * len(buckets))
    out = _writable(blank)
    out[0] = 48 + digits
    out[1] = 48 + n
    at = _HEADER
    for bucket in buckets:
        _write(out, at, bucket[0], _INDEX_DIGITS)
        at += _INDEX_DIGITS
        for i in range(1, n + 1):
            _write(out, at, _code_of(bucket[i]), digits)
            at += digits
    return _finished(blank)


@cython.locals(n=cython.Py_ssize_t, digits=cython.Py_ssize_t, width=cython.Py_ssize_t, at=cython.Py_ssize_t,
               end=cython.Py_ssize_t, data=cython.p_uchar)
def ring_buckets(ring: str | list) -> list:
    """The buckets of ``ring`` as lists ``[index, value, ...]``, in bucket order (a list ring is
    itself).

    >>> ring_buckets(_pack_ring([[7, 1, 0], [9, 2, 19.99]], 2))
    [[7, 1, 0], [9, 2, 19.99]]
    """
    if type(ring) is not str:
        return ring
    n = ord(ring[1]) - 48 if len(ring) >= _HEADER else 0
    width = _ring_width(ring, n)
    digits = (width - _INDEX_DIGITS) // n
    data = _chars(ring)
    buckets = []
    for at in range(_HEADER, len(ring), width):
        end = at + width
        buckets.append([_read(data, at, _INDEX_DIGITS)]
                       + [_value_of(_read(data, k, digits)) for k in range(at + _INDEX_DIGITS, end, digits)])
    return buckets


@cython.cfunc
@cython.locals(width=cython.Py_ssize_t, digits=cython.Py_ssize_t, at=cython.Py_ssize_t, end=cython.Py_ssize_t,
               idx=cython.longlong, c=cython.Py_ssize_t, code=cython.longlong, data=cython.p_uchar)
def _sum_packed(ring: str, n: cython.Py_ssize_t, lo: cython.longlong, hi: cython.longlong,
                first: cython.Py_ssize_t, channels: cython.Py_ssize_t, out: cython.p_double,
                base: cython.Py_ssize_t) -> cython.int:
    """Adds to ``out[base + c]`` channel ``first + c``'s value (as a double) of each bucket of
    packed ``ring`` with lo < index < hi, for c below ``channels``, in bucket order."""
    width = _ring_width(ring, n)
    digits = (width - _INDEX_DIGITS) // n
    data = _chars(ring)
    at, end = _HEADER, len(ring)
    while at < end:  # not a range: Cython loops over a range whose step is a variable with int objects
        idx = _read(data, at, _INDEX_DIGITS)
        if idx >= hi:
            break
        if idx > lo:
            for c in range(channels):
                code = _read(data, at + _INDEX_DIGITS + (first + c) * digits, digits)
                if code & 1:
                    out[base + c] += (code >> 1) / 100.0
                else:
                    out[base + c] += code >> 1
        at += width
    return 0


@cython.cfunc
@cython.locals(width=cython.Py_ssize_t, digits=cython.Py_ssize_t, count=cython.Py_ssize_t,
               first=cython.Py_ssize_t, at=cython.Py_ssize_t, found=cython.bint, i=cython.Py_ssize_t,
               b=cython.longlong, old=cython.longlong, code=cython.longlong, need=cython.Py_ssize_t,
               amount=cython.double, kept=cython.Py_ssize_t, start=cython.Py_ssize_t, to=cython.Py_ssize_t,
               k=cython.Py_ssize_t, data=cython.p_uchar, out=cython.p_uchar)
def _apply_packed(ring: str, n: cython.Py_ssize_t, oldest: cython.longlong, idx: cython.longlong,
                  amounts: cython.p_double, touched: cython.bint) -> object:
    """Packed ``ring`` without its buckets before ``oldest`` and, if ``touched``, with ``amounts``
    added to bucket ``idx``'s values as ``_add`` adds them; None if no bucket is left, ``_UNFIT``
    if a new value does not pack."""
    codes = cython.declare(cython.longlong[16])  # _MAX_CHANNELS
    width = _ring_width(ring, n)
    digits = (width - _INDEX_DIGITS) // n
    data = _chars(ring)
    count = (len(ring) - _HEADER) // width
    first = 0
    while first < count and _read(data, _HEADER + first * width, _INDEX_DIGITS) < oldest:
        first += 1
    if not touched:
        if first == 0:
            return ring
        if first == count:
            return None
        blank = _blank(_HEADER + (count - first) * width)
        out = _writable(blank)
        _copy(out, 0, data, 0, _HEADER)
        _copy(out, _HEADER, data, _HEADER + first * width, (count - first) * width)
        return _finished(blank)
    if not 0 <= idx < _INDEX_LIMIT:
        return _UNFIT
    at, found = count, False  # the bucket's place among the kept, searched from the newest
    while at > first:
        b = _read(data, _HEADER + (at - 1) * width, _INDEX_DIGITS)
        if b <= idx:
            if b == idx:
                found, at = True, at - 1
            break
        at -= 1
    need = digits
    for i in range(n):
        old = _read(data, _HEADER + at * width + _INDEX_DIGITS + i * digits, digits) if found else 0
        amount = amounts[i]
        if amount == 0:
            code = old
        elif old & 1 == 0 and 0 < amount < _VALUE_LIMIT_D and amount == cython.cast(cython.longlong, amount):
            code = old + 2 * cython.cast(cython.longlong, amount)  # a count: whole numbers add exactly
        else:
            code = _code_of(_add(_value_of(old), amount))
        if not 0 <= code < _CODE_LIMIT:
            return _UNFIT
        codes[i] = code
        need = max(need, _digits_for(code))
    kept = count - first + (0 if found else 1)
    if need == digits:  # the other buckets are copied as they are
        blank = _blank(_HEADER + kept * width)
        out = _writable(blank)
        _copy(out, 0, data, 0, _HEADER)
        to = _HEADER + (at - first) * width
        _copy(out, _HEADER, data, _HEADER + first * width, (at - first) * width)
        _write(out, to, idx, _INDEX_DIGITS)
        for i in range(n):
            _write(out, to + _INDEX_DIGITS + i * digits, codes[i], digits)
        start = at + (1 if found else 0)
        _copy(out, to + width, data, _HEADER + start * width, (count - start) * width)
        return _finished(blank)
    # A value outgrew the width: every kept bucket is written again, wider
    blank = _blank(_HEADER + kept * (_INDEX_DIGITS + need * n))
    out = _writable(blank)
    out[0] = 48 + need
    out[1] = 48 + n
    to = _HEADER
    for k in range(first, count + (0 if found else 1)):
        if k == at:
            _write(out, to, idx, _INDEX_DIGITS)
            for i in range(n):
                _write(out, to + _INDEX_DIGITS + i * need, codes[i], need)
        else:
            b = k if found or k < at else k - 1  # the old bucket written here
            _copy(out, to, data, _HEADER + b * width, _INDEX_DIGITS)
            for i in range(n):
                _write(out, to + _INDEX_DIGITS + i * need,
                       _read(data, _HEADER + b * width + _INDEX_DIGITS + i * digits, digits), need)
        to += _INDEX_DIGITS + need * n
    return _finished(blank)


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
               i=cython.Py_ssize_t, n=cython.Py_ssize_t, touched=cython.bint, channels=tuple, ring=list,
               bucket=list)
def _apply_to_rings(rings: dict, plan_rings: tuple, ts: cython.longlong, watermark: cython.longlong,
                    amounts: dict) -> None:
    adds = cython.declare(cython.double[16])  # _MAX_CHANNELS: what the event adds to each channel
    for key, width, length, channels in plan_rings:
        newest = watermark // width
        kept = rings.get(key)
        idx = ts // width
        n = len(channels)
        touched = False
        if idx > newest - length:
            for i in range(n):
                adds[i] = amounts[channels[i]]
                if adds[i] != 0:
                    touched = True
        if kept is None and not touched:
            continue
        if type(kept) is str:
            packed = _apply_packed(kept, n, newest - length + 1, idx, adds, touched)
            if packed is None:
                del rings[key]
                continue
            if packed is not _UNFIT:
                if packed is not kept:
                    rings[key] = packed
                continue
            kept = ring_buckets(kept)  # a value that does not pack: this ring goes on as lists
        ring = _prune_ring(kept, newest, length) if kept else []
        if touched:
            bucket = _bucket_of(ring, idx, n)
            for i in range(n):  # most amounts are 0 and add nothing
                if adds[i] != 0:
                    bucket[1 + i] = _add(bucket[1 + i], adds[i])
        if ring:
            packed = _pack_ring(ring, n)
            rings[key] = ring if packed is None else packed
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
    """The union of several shards of one entity (sums, sketch unions, min/max times). A view,
    read and never stored: its merged rings are lists, the reference form (see *packed rings*)."""
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
            for bucket in ring_buckets(r["r"].get(key, [])):
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


def readable(entity: Entity, record: Record) -> dict[str, Any]:
    """``record`` as an operator reads it (the worker's entity view): its times, each ring's
    buckets with its channels' names, each sketch's form and the distinct values it holds
    (an estimate once a HyperLogLog), the recent texts (fingerprint, time in s) and, for one
    shard, the last input record it applied (partition, offset).

    >>> from detectors.catalog import IP
    >>> record, _ = apply_event(IP, None, {"type": "login", "ts": 60_000, "user_id": "u1", "ip": "1.2.3.4",
    ...                                    "success": False})
    >>> view = readable(IP, record)
    >>> view["rings"]["60000"], view["sketches"]["users"]
    ({'channels': ['login_failures', 'logins'], 'buckets': [[1, 1, 1]]}, {'form': 'exact', 'distinct': 1})
    """
    return {
        "first_ms": record["f"],
        "last_ms": record["l"],
        "rings": {key: {"channels": list(entity.ring_layout[int(key)]), "buckets": ring_buckets(ring)}
                  for key, ring in record["r"].items()},
        "sketches": {name: {"form": "exact" if is_exact(sketch) else "hyperloglog",
                            "distinct": distinct_count(sketch, 0)} for name, sketch in record["d"].items()},
        "texts": record["t"],
        "last_applied": record.get("o"),
    }


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
                          1 + entity.ring_layout[HOUR].index(f.channel), len(entity.ring_layout[HOUR])))
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
               value=cython.double, denominator=cython.double, step=tuple, window=tuple,
               bucket=list, record=dict, rings=dict, out=dict, plan=_Plan, counted=dict, counts=list, novelty=dict,
               zeroed=cython.bint)
def shard_features(
    entity: Entity, shards: list[Record], event: Event, previous_last: int | None,
    novelty: dict[str, bool | None] | None = None, fingerprint: int | None = None,
    out: dict[str, float] | None = None, zeroed: bool = False,
) -> dict[str, float]:
    """``entity_features`` of ``merge_records(entity, shards)``, read from the shards as they
    are: no merged record is built and thrown away per event (docs/performance.md, round 14).
    ``zeroed`` says ``out`` needs no 0.0 set: it holds one for each of the entity's features
    already, or reads an absent feature as 0 (``extract``'s dict): only the others are set then,
    as most of an event's features are 0 (rounds 17 and 39).

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
    day = cython.declare(cython.double[1])  # an array, as _sum_packed adds into one
    for slot in range(len(plan.windows)):
        window = plan.windows[slot]
        width, kept, channels, base = window[0], window[1], window[3], slot * _MAX_CHANNELS
        for channel in range(channels):
            sums[base + channel] = 0.0
        oldest = watermark // width - kept  # C integers: no int objects per window
        for record in present:
            rings = record["r"]  # a C dict lookup below, not a call of the method ``get``
            ring = rings.get(window[2])
            if type(ring) is str:
                _sum_packed(ring, channels, oldest, _NO_INDEX_LIMIT, 0, channels, sums, base)
                continue
            for bucket in ring or ():
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
            day[0] = 0.0
            for record in present:
                rings = record["r"]
                ring = rings.get(_HOUR_KEY)
                if type(ring) is str:
                    _sum_packed(ring, step[4], newest - 25, newest, i - 1, 1, day, 0)
                    continue
                for bucket in ring or ():
                    idx = bucket[0]
                    if newest - 24 <= idx < newest:
                        amount = _as_double(bucket[i])
                        day[0] += amount
            value = (sums[step[2]] + 1) / (day[0] / 24 + 1)
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
_NO_INDEX_LIMIT = cython.declare(cython.longlong, 1 << 62)
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
