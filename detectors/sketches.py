"""Fixed-size, mergeable sketches on event time.

``SlidingDistinct`` counts distinct values in any trailing window. It is exact
while an entity has seen at most ``EXACT_LIMIT`` distinct values (it keeps a
32-bit hash and the last time of each); beyond that it becomes a *sliding
HyperLogLog* (Chabchoub & Hébrail, 2010): 128 registers, each keeping the
timestamps of its possible future maxima, so a window is answered by taking,
per register, the largest rank seen inside the window. Relative standard error
of the HyperLogLog estimate: 1.04 / sqrt(128) ≈ 9.2 %; below 2.5 × 128 distinct
values linear counting is used, which is far tighter. Both forms merge (union),
so per-partition shards of one entity can be combined on read.

>>> s = new_distinct()
>>> for i, user in enumerate(["a", "b", "a", "c"]):
...     s = distinct_add(s, user, ts_s=i * 60)
>>> distinct_count(s, since_s=0), distinct_count(s, since_s=100)
(3, 2)

A sketch is one string, in memory and in its record's JSON (see *Packed form*
below): a record holds a few strings where it held a dict of numbers per value.

>>> s[0], len(s), s[1:14]  # exact: a value is its hash and last time in 13 characters
('x', 40, '3:8ebE000001i')
>>> is_exact(s), distinct_count({"x": {"1": 5, "2": 7}}, since_s=6)  # a record's sketch as written before round 31
(True, 1)

``simhash`` gives a 64-bit fingerprint of a text's character shingles: texts
that differ only in a few words, numbers or links have fingerprints a few bits
apart, so a Hamming-distance test counts near-duplicates.

>>> a = simhash("Get a FREE phone now!!! visit http://x.example/1 code 12")
>>> b = simhash("get a free phone now visit http://x.example/77 code 31")
>>> c = simhash("Lovely walk in the park with the dog this morning")
>>> hamming(a, b) <= NEAR_DUPLICATE_BITS < hamming(a, c)
True
"""

from __future__ import annotations

import hashlib
import math
import re
from functools import lru_cache
from typing import Any, Union

import cython
import numpy as np

if cython.compiled:  # a sketch's characters read, and a new one's written, in place (see _chars)
    from cython.cimports.cpython.unicode import PyUnicode_1BYTE_DATA, PyUnicode_New

EXACT_LIMIT = 24
REGISTER_BITS = 7
REGISTERS = 1 << REGISTER_BITS  # 128
HLL_RELATIVE_ERROR = 1.04 / math.sqrt(REGISTERS)
_ALPHA = 0.7213 / (1 + 1.079 / REGISTERS)
# 2 ** -rank for every rank a 25-bit rest can have; a C array when compiled, so the estimate's
# sum over registers adds C doubles (indexing a Python tuple made it float objects: round 17)
_INVERSE_POWERS = cython.declare(cython.double[33], [2.0 ** -rank for rank in range(33)])

# -- packed form ----------------------------------------------------------------
# A sketch is one string of printable ASCII: its form, then fixed-width entries of 6-bit digits,
# most significant first (digit d is the character 48 + d, 49 + d from 44 on: no backslash, so
# JSON never escapes one):
#   "x", then 13 per value: its hash32 (6 digits) and the last time it was seen (7 digits, s)
#   "h", then 9 per pair of a register's front: register * 32 + rank (2 digits) and the pair's
#        time (7 digits, s), by register, each front in time order
# One string where the dict form held a dict, a string and a number per value: a record is
# decoded, encoded and freed as a few objects, and scanned as characters (round 31). Records
# written before round 31 hold {"x": {"<decimal hash32>": ts}} or {"h": {"<register>": [[rank,
# ts], ...]}}; every function here reads those as well, and returns the packed form.
Distinct = str
Sketch = Union[str, dict[str, Any]]  # what a record may hold: packed, or as written before round 31
EXACT = "x"
HLL = "h"
_KEY_DIGITS_EXACT = cython.declare(cython.Py_ssize_t, 6)
_KEY_DIGITS_HLL = cython.declare(cython.Py_ssize_t, 2)
_TIME_DIGITS = cython.declare(cython.Py_ssize_t, 7)
_WIDTH_EXACT = cython.declare(cython.Py_ssize_t, 13)
_WIDTH_HLL = cython.declare(cython.Py_ssize_t, 9)
# Times are kept below this (in s): beyond any event time the contracts allow (year 9999)
TIME_LIMIT_S = 1 << (6 * 7)


def hash32(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=4).digest(), "big")


# The one cache of value hashes (the same users, IPs and devices recur event after event).
# A dict, not an lru_cache: the sketches ask it ~3 times per event, and an lru_cache call
# builds an argument tuple and a key and relinks its list on every hit.
_HASHED = cython.declare(dict, {})  # value -> hash32(value); a C dict lookup when compiled
_HASHED_MAX = 65_536


def hashed(value: str) -> int:
    """``hash32(value)``, from the cache of recent values."""
    found = _HASHED.get(value)
    if found is None:
        if len(_HASHED) >= _HASHED_MAX:  # emptied when full: values recur, so it refills with them
            _HASHED.clear()
        found = _HASHED[value] = hash32(value)
    return found


def new_distinct() -> Distinct:
    return EXACT


def is_exact(sketch: Sketch) -> bool:
    """Whether ``sketch`` still holds each value (else it is a HyperLogLog)."""
    return (sketch[0] if type(sketch) is str else next(iter(sketch))) == EXACT


def is_empty(sketch: Distinct) -> bool:
    return len(sketch) == 1


@cython.cfunc
@cython.inline
@cython.locals(data=cython.p_uchar, k=cython.Py_ssize_t, c=cython.uint, value=cython.ulonglong)
def _read(data, at: cython.Py_ssize_t, digits: cython.Py_ssize_t) -> cython.ulonglong:
    """The number written in ``digits`` digits from ``at`` of a sketch's ``_chars``."""
    value = 0
    for k in range(at, at + digits):
        c = data[k]
        value = (value << 6) | (c - 48 - (c > 92))
    return value


@cython.cfunc
@cython.inline
@cython.locals(out=cython.p_uchar, k=cython.Py_ssize_t, d=cython.uint, value=cython.ulonglong)
def _write(out, at: cython.Py_ssize_t, number: cython.ulonglong, digits: cython.Py_ssize_t) -> cython.void:
    value = number
    for k in range(at + digits - 1, at - 1, -1):
        d = value & 63
        out[k] = 48 + d + (d >= 44)
        value >>= 6


# Compiled, a sketch's characters are read where the string keeps them, and a new sketch is a
# string filled in before anything else sees it: no bytes copy per read, no bytearray per
# sketch made (round 31). From source, the same code reads bytes and fills a bytearray.
@cython.cfunc
@cython.inline
def _chars(s: str) -> cython.p_uchar:
    """The characters of a ``_packed`` sketch (one byte each: it is ASCII)."""
    if cython.compiled:
        return PyUnicode_1BYTE_DATA(s)
    return s.encode("ascii")


@cython.cfunc
def _blank(n: cython.Py_ssize_t) -> object:
    """A sketch of ``n`` characters to fill in through ``_writable``, then ``_finished``."""
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
def _finished(blank: object) -> str:
    if cython.compiled:
        return blank
    return blank.decode("ascii")


def _checked_time(ts_s: int) -> int:
    if not 0 <= ts_s < TIME_LIMIT_S:
        raise ValueError(f"a sketch keeps times from 0 to {TIME_LIMIT_S - 1} s, got {ts_s}")
    return ts_s


@cython.locals(width=cython.Py_ssize_t, key_digits=cython.Py_ssize_t, at=cython.Py_ssize_t, out=cython.p_uchar)
def _packed_of(form: str, entries: list) -> Distinct:
    """The sketch of ``form`` holding ``entries``, (key, time) pairs in their order."""
    key_digits = _KEY_DIGITS_EXACT if form == EXACT else _KEY_DIGITS_HLL
    width = key_digits + _TIME_DIGITS
    blank = _blank(1 + width * len(entries))
    out = _writable(blank)
    out[0] = ord(form)
    at = 1
    for key, ts in entries:
        _write(out, at, key, key_digits)
        _write(out, at + key_digits, _checked_time(ts), _TIME_DIGITS)
        at += width
    return _finished(blank)


@cython.locals(width=cython.Py_ssize_t, key_digits=cython.Py_ssize_t, at=cython.Py_ssize_t, data=cython.p_uchar)
def _entries(s: Distinct) -> list:
    """The (key, time) pairs of a ``_packed`` sketch, in order."""
    key_digits = _KEY_DIGITS_EXACT if s[0] == EXACT else _KEY_DIGITS_HLL
    width = key_digits + _TIME_DIGITS
    data = _chars(s)
    return [(_read(data, at, key_digits), _read(data, at + key_digits, _TIME_DIGITS)) for at in range(1, len(s), width)]


@cython.locals(n=cython.Py_ssize_t, s=str, form=cython.uint)
def _packed(sketch: Sketch) -> Distinct:
    """``sketch`` in the packed form: itself, or converted from the form written before round 31.
    A string that is not a whole sketch (a corrupt record) raises ValueError."""
    if type(sketch) is str:
        s = sketch  # typed: its checks below are C calls, not method lookups on an object
        n = len(s)
        if n and s.isascii():
            form = _chars(s)[0]
            if (form == 120 and (n - 1) % _WIDTH_EXACT == 0) or (form == 104 and (n - 1) % _WIDTH_HLL == 0):
                return s  # EXACT ("x") or HLL ("h")
        raise ValueError(f"not a sketch: {s[:40]!r}")
    if "x" in sketch:
        return _packed_of(EXACT, [(int(key), ts) for key, ts in sketch["x"].items()])
    return _packed_of(HLL, sorted(((int(register) << 5 | rank, ts) for register, front in sketch["h"].items()
                                   for rank, ts in front), key=_by_register_then_time))


def _by_register_then_time(entry: tuple) -> tuple:
    return entry[0] >> 5, entry[1]


def _rank(h: int) -> tuple[int, int]:
    register = h & (REGISTERS - 1)
    rest = h >> REGISTER_BITS  # 25 bits
    rank = 25 - rest.bit_length() + 1
    return register, rank


def _front_add(front: list, rank: int, ts: int) -> list:
    """Keeps only (rank, time) pairs no other pair beats on both rank and recency."""
    if any(r >= rank and t >= ts for r, t in front):
        return front
    front = [(r, t) for r, t in front if not (r <= rank and t <= ts)]
    front.append((rank, ts))
    front.sort(key=_time_of)
    return front


def _time_of(pair: tuple) -> int:
    return pair[1]


def _hll_of(fronts: dict) -> Distinct:
    """The packed HyperLogLog of ``fronts``, register -> its (rank, time) pairs."""
    return _packed_of(HLL, [(register << 5 | rank, ts) for register in sorted(fronts) for rank, ts in fronts[register]])


def _fronts(s: Distinct) -> dict:
    """Register -> its front, of a packed sketch of either form (an exact one's values placed as
    a HyperLogLog places them)."""
    fronts: dict[int, list] = {}
    if s[0] == EXACT:
        for h, ts in _entries(s):
            register, rank = _rank(h)
            fronts[register] = _front_add(fronts.get(register, []), rank, ts)
    else:
        for key, ts in _entries(s):
            fronts.setdefault(key >> 5, []).append((key & 31, ts))
    return fronts


def distinct_add(sketch: Sketch, value: str, ts_s: int) -> Distinct:
    return distinct_insert(sketch, hashed(value), ts_s)[0]


@cython.locals(s=str, n=cython.Py_ssize_t, at=cython.Py_ssize_t, k=cython.Py_ssize_t, wanted=cython.ulonglong,
               ts=cython.longlong, data=cython.p_uchar, out=cython.p_uchar)
def distinct_insert(sketch: Sketch, h: int, ts_s: int) -> tuple[Distinct, bool | None]:
    """Adds a ``hash32``; returns the sketch and whether it held the hash before
    (None once the sketch is a HyperLogLog: unknown)."""
    s = _packed(sketch)
    wanted, ts = h, _checked_time(ts_s)
    data, n = _chars(s), len(s)
    if data[0] == 120:  # EXACT
        at = 1
        while at < n:  # not a range: see _counts
            if _read(data, at, _KEY_DIGITS_EXACT) == wanted:
                if ts > cython.cast(cython.longlong, _read(data, at + _KEY_DIGITS_EXACT, _TIME_DIGITS)):
                    blank = _blank(n)
                    out = _writable(blank)
                    for k in range(n):
                        out[k] = data[k]
                    _write(out, at + _KEY_DIGITS_EXACT, ts, _TIME_DIGITS)
                    s = _finished(blank)
                return s, True
            at += _WIDTH_EXACT
        if n < 1 + EXACT_LIMIT * _WIDTH_EXACT:
            blank = _blank(n + _WIDTH_EXACT)
            out = _writable(blank)
            for k in range(n):
                out[k] = data[k]
            _write(out, n, wanted, _KEY_DIGITS_EXACT)
            _write(out, n + _KEY_DIGITS_EXACT, ts, _TIME_DIGITS)
            return _finished(blank), False
        fronts = _fronts(s)
        known: bool | None = False
    else:
        fronts = None
        known = None
    return _hll_insert(s, fronts, h, ts), known


@cython.locals(low=cython.Py_ssize_t, high=cython.Py_ssize_t, middle=cython.Py_ssize_t, start=cython.Py_ssize_t,
               end=cython.Py_ssize_t, n=cython.Py_ssize_t, register=cython.ulonglong, data=cython.p_uchar)
def _hll_insert(s: Distinct, fronts: dict | None, h: int, ts: int) -> Distinct:
    """Adds a hash to a HyperLogLog: ``s``, or ``fronts`` if given (an exact sketch ``s`` that just
    outgrew EXACT_LIMIT, as ``_fronts`` of it). Only the hash's register is decoded otherwise."""
    register, rank = _rank(h)
    if fronts is not None:
        fronts[register] = _front_add(fronts.get(register, []), rank, ts)
        return _hll_of(fronts)
    n, data = (len(s) - 1) // _WIDTH_HLL, _chars(s)
    low, high = 0, n  # the register's entries are [start, end): found by bisection on the register
    while low < high:
        middle = (low + high) // 2
        if _read(data, 1 + middle * _WIDTH_HLL, _KEY_DIGITS_HLL) >> 5 < register:
            low = middle + 1
        else:
            high = middle
    start = end = low
    while end < n and _read(data, 1 + end * _WIDTH_HLL, _KEY_DIGITS_HLL) >> 5 == register:
        end += 1
    front = [(_read(data, at, _KEY_DIGITS_HLL) & 31, _read(data, at + _KEY_DIGITS_HLL, _TIME_DIGITS))
             for at in range(1 + start * _WIDTH_HLL, 1 + end * _WIDTH_HLL, _WIDTH_HLL)]
    changed = _front_add(front, rank, ts)
    if changed is front:
        return s
    middle_part = _packed_of(HLL, [(register << 5 | r, t) for r, t in changed])[1:]
    return s[:1 + start * _WIDTH_HLL] + middle_part + s[1 + end * _WIDTH_HLL:]


def distinct_count(sketch: Sketch | list, since_s: int) -> int:
    """Distinct values seen at or after ``since_s``: of one sketch, or of a ``distinct_union``."""
    return distinct_counts(sketch, (since_s,))[0]


MAX_WINDOWS_PER_SKETCH = 4
# C ints when compiled: the per-value arithmetic below makes no Python int
_C_REGISTERS = cython.declare(cython.Py_ssize_t, REGISTERS)
_C_REGISTER_BITS = cython.declare(cython.int, REGISTER_BITS)
_C_EXACT_LIMIT = cython.declare(cython.Py_ssize_t, EXACT_LIMIT)


def distinct_counts(sketch: Sketch | list, since_s: tuple) -> list[int]:
    """``distinct_count`` at each of ``since_s`` (at most ``MAX_WINDOWS_PER_SKETCH``), in one
    pass over the sketch: an entity's windows on one sketch are counted together. A list of
    sketches is counted as their ``distinct_union``, without making it."""
    return _counts(sketch, since_s, 0, False)


def distinct_counts_back(sketch: Sketch | list, now_s: int, seconds: tuple) -> list[int]:
    """``distinct_counts`` since ``now_s - s`` for each of ``seconds``: the windows of an entity
    end at its watermark, and no tuple of their start times is made per event.

    >>> s = distinct_add(distinct_add(new_distinct(), "a", ts_s=10), "b", ts_s=50)
    >>> distinct_counts_back(s, 60, (30, 60)) == distinct_counts(s, (30, 0)) == [1, 2]
    True
    """
    return _counts(sketch, seconds, now_s, True)


@cython.cfunc
@cython.locals(n=cython.Py_ssize_t, w=cython.Py_ssize_t, register=cython.Py_ssize_t, at=cython.Py_ssize_t,
               j=cython.Py_ssize_t, m=cython.Py_ssize_t, end=cython.Py_ssize_t, rank=cython.int,
               ts=cython.longlong, h=cython.ulonglong, key=cython.ulonglong, rest=cython.ulonglong,
               empty=cython.int, total=cython.double, counts=list, parts=list, s=str, now_s=cython.longlong,
               back=cython.bint, data=cython.p_uchar)
def _counts(sketch: object, times: tuple, now_s, back) -> list:
    """The counts since each of ``times``, or, if ``back``, since ``now_s`` minus each."""
    n = len(times)
    if n > MAX_WINDOWS_PER_SKETCH:
        raise ValueError(f"at most {MAX_WINDOWS_PER_SKETCH} windows per sketch, got {n}")
    since = cython.declare(cython.longlong[4])  # MAX_WINDOWS_PER_SKETCH
    for w in range(n):
        since[w] = times[w]
        if back:  # in C: no int object per window
            since[w] = now_s - since[w]
    exact_counts = cython.declare(cython.int[4])
    for w in range(n):
        exact_counts[w] = 0
    if type(sketch) is list:
        parts = [_packed(part) for part in sketch]
        hashes = cython.declare(cython.ulonglong[24])  # EXACT_LIMIT
        stamps = cython.declare(cython.longlong[24])
        m = _exact_union(parts, hashes, stamps)
        if m >= 0:
            for j in range(m):
                for w in range(n):
                    if stamps[j] >= since[w]:
                        exact_counts[w] += 1
            return [exact_counts[w] for w in range(n)]
    else:
        s = _packed(sketch)
        data = _chars(s)
        if data[0] == 120:  # EXACT
            end = len(s)
            # The entries' loops here and below are not ranges: Cython loops over a range whose
            # step is not a literal with an int object per step (round 35).
            at = 1 + _KEY_DIGITS_EXACT
            while at < end:
                ts = _read(data, at, _TIME_DIGITS)
                for w in range(n):
                    if ts >= since[w]:
                        exact_counts[w] += 1
                at += _WIDTH_EXACT
            return [exact_counts[w] for w in range(n)]
        parts = [s]
    # Per window, each register's best rank among the values seen in it
    ranks = cython.declare(cython.int[512])  # MAX_WINDOWS_PER_SKETCH * REGISTERS
    for at in range(n * _C_REGISTERS):
        ranks[at] = 0
    for s in parts:
        end, data = len(s), _chars(s)
        if data[0] == 104:  # HLL
            at = 1
            while at < end:
                key = _read(data, at, _KEY_DIGITS_HLL)
                register, rank = key >> 5, key & 31
                ts = _read(data, at + _KEY_DIGITS_HLL, _TIME_DIGITS)
                for w in range(n):
                    if ts >= since[w] and rank > ranks[w * _C_REGISTERS + register]:
                        ranks[w * _C_REGISTERS + register] = rank
                at += _WIDTH_HLL
        else:  # an exact part of a union: each value where a HyperLogLog would place it
            at = 1
            while at < end:
                h = _read(data, at, _KEY_DIGITS_EXACT)
                register = h & (_C_REGISTERS - 1)
                rest = h >> _C_REGISTER_BITS
                rank = 26  # 25 - rest.bit_length() + 1, as _rank
                while rest:
                    rest >>= 1
                    rank -= 1
                ts = _read(data, at + _KEY_DIGITS_EXACT, _TIME_DIGITS)
                for w in range(n):
                    if ts >= since[w] and rank > ranks[w * _C_REGISTERS + register]:
                        ranks[w * _C_REGISTERS + register] = rank
                at += _WIDTH_EXACT
    counts = []
    for w in range(n):
        total, empty = 0.0, 0
        for register in range(_C_REGISTERS):  # added in register order: the same double every build
            rank = ranks[w * _C_REGISTERS + register]
            total += _INVERSE_POWERS[rank]
            if rank == 0:
                empty += 1
        raw = _ALPHA * REGISTERS * REGISTERS / total
        if raw <= 2.5 * REGISTERS and empty:
            counts.append(round(REGISTERS * math.log(REGISTERS / empty)))
        else:
            counts.append(round(raw))
    return counts


@cython.cfunc
@cython.locals(hashes=cython.p_ulonglong, stamps=cython.p_longlong, m=cython.Py_ssize_t, j=cython.Py_ssize_t,
               at=cython.Py_ssize_t, end=cython.Py_ssize_t, found=cython.Py_ssize_t, h=cython.ulonglong,
               ts=cython.longlong, s=str, data=cython.p_uchar)
def _exact_union(parts: list, hashes, stamps) -> cython.Py_ssize_t:
    """The union of packed ``parts`` into ``hashes`` and ``stamps`` (each value's latest time),
    and how many values it holds; -1 if a part is a HyperLogLog or the union exceeds EXACT_LIMIT."""
    m = 0
    for s in parts:
        data = _chars(s)
        if data[0] != 120:  # EXACT
            return -1
        at, end = 1, len(s)
        while at < end:  # not a range: see _counts
            h = _read(data, at, _KEY_DIGITS_EXACT)
            ts = _read(data, at + _KEY_DIGITS_EXACT, _TIME_DIGITS)
            found = -1
            for j in range(m):
                if hashes[j] == h:
                    found = j
                    break
            if found >= 0:
                if ts > stamps[found]:
                    stamps[found] = ts
            elif m == _C_EXACT_LIMIT:
                return -1
            else:
                hashes[m], stamps[m] = h, ts
                m += 1
            at += _WIDTH_EXACT
    return m


@cython.locals(m=cython.Py_ssize_t, j=cython.Py_ssize_t)
def distinct_union(parts: list) -> Distinct | list:
    """What folding ``distinct_merge`` over ``parts`` counts to, made without building fronts.

    Exact while every part is and their union holds at most ``EXACT_LIMIT`` values (as the
    fold keeps it); otherwise the list of the parts, which ``distinct_count`` counts as the
    HyperLogLog of every part's values: a register's best rank in a window is the best of
    all its pairs in the window, whichever of them the merged fronts would have kept.

    >>> a, b = distinct_add(new_distinct(), "x", ts_s=1), distinct_add(new_distinct(), "y", ts_s=5)
    >>> distinct_count(distinct_union([a, b]), since_s=0), distinct_count(distinct_union([a, b]), since_s=2)
    (2, 1)
    """
    packed = [_packed(part) for part in parts]
    if len(packed) == 1:
        return packed[0]
    hashes = cython.declare(cython.ulonglong[24])  # EXACT_LIMIT
    stamps = cython.declare(cython.longlong[24])
    m = _exact_union(packed, hashes, stamps)
    if m < 0:
        return packed
    return _packed_of(EXACT, [(hashes[j], stamps[j]) for j in range(m)])


@cython.locals(s=str, width=cython.Py_ssize_t, key_digits=cython.Py_ssize_t, n=cython.Py_ssize_t,
               at=cython.Py_ssize_t, k=cython.Py_ssize_t, written=cython.Py_ssize_t, kept=cython.Py_ssize_t,
               before=cython.longlong, data=cython.p_uchar, out=cython.p_uchar)
def distinct_expire(sketch: Sketch, before_s: int) -> Distinct:
    """``sketch`` without the values (or pairs) last seen before ``before_s`` (itself if none are)."""
    s = _packed(sketch)
    before, data, n = before_s, _chars(s), len(s)
    key_digits = _KEY_DIGITS_EXACT if data[0] == 120 else _KEY_DIGITS_HLL
    width = key_digits + _TIME_DIGITS
    kept = 0
    at = 1
    while at < n:  # not a range: see _counts
        if cython.cast(cython.longlong, _read(data, at + key_digits, _TIME_DIGITS)) >= before:
            kept += 1
        at += width
    if kept == (n - 1) // width:
        return s
    blank = _blank(1 + kept * width)
    out = _writable(blank)
    out[0] = data[0]
    written = 1
    at = 1
    while at < n:
        if cython.cast(cython.longlong, _read(data, at + key_digits, _TIME_DIGITS)) >= before:
            for k in range(width):
                out[written + k] = data[at + k]
            written += width
        at += width
    return _finished(blank)


def distinct_merge(a: Sketch, b: Sketch) -> Distinct:
    a, b = _packed(a), _packed(b)
    if a[0] == EXACT and b[0] == EXACT:
        merged = dict(_entries(a))
        for h, ts in _entries(b):
            merged[h] = max(ts, merged.get(h, ts))
        if len(merged) <= EXACT_LIMIT:
            return _packed_of(EXACT, list(merged.items()))
    fronts = _fronts(a)
    for register, front in _fronts(b).items():
        current = fronts.get(register, [])
        for rank, ts in front:
            current = _front_add(current, rank, ts)
        fronts[register] = current
    return _hll_of(fronts)


# -- text ------------------------------------------------------------------
NEAR_DUPLICATE_BITS = 14  # measured: spam variants <= 12 bits apart, unrelated texts >= 18
_SHINGLE = 5
_NORMALIZE = re.compile(r"[^a-z]+")
_URL_PATH = re.compile(r"(https?://[^/\s]+)/\S*")
# A whole token with a digit; the lookbehind starts matches at token starts only (``\S*\d\S*``
# retried from every position of a token without digits: twice as slow, same matches).
_HAS_DIGIT = re.compile(r"(?<!\S)[^\s\d]*\d\S*")


@lru_cache(maxsize=4096)  # a text is normalised for its fingerprint, then again for the content model later in the batch
def normalize_text(text: str) -> str:
    """Lower-cased letters only; links reduced to their host; tokens with digits (codes, ids) dropped."""
    if cython.compiled and text.isascii():
        return _normalize_ascii(text)
    return _normalize_with_patterns(text)


def _normalize_with_patterns(text: str) -> str:
    """The reference, for any text: the three patterns above."""
    text = _HAS_DIGIT.sub(" ", _URL_PATH.sub(r"\1", text.lower()))
    return _NORMALIZE.sub(" ", text).strip()


@cython.locals(data=cython.p_uchar, out=cython.p_uchar, n=cython.Py_ssize_t, i=cython.Py_ssize_t,
               start=cython.Py_ssize_t, end=cython.Py_ssize_t, j=cython.Py_ssize_t, written=cython.Py_ssize_t,
               character=cython.uchar, in_word=cython.bint, has_digit=cython.bint)
def _normalize_ascii(text: str) -> str:
    """``_normalize_with_patterns`` for ASCII text in one pass, only called when compiled
    (tests/unit/test_compiled.py compares the two): per whitespace-separated token, a link is
    cut after its host, a token with a digit is dropped, and the runs of a-z are the words."""
    lowered = text.lower().encode("ascii")
    result = bytearray(len(lowered))  # never longer: each word's space stands for a separator
    data, out, n = lowered, result, len(lowered)
    i = written = 0
    while i < n:
        while i < n and _is_ascii_space(data[i]):
            i += 1
        start = i
        while i < n and not _is_ascii_space(data[i]):
            i += 1
        end = _after_link_host(data, start, i)
        has_digit = False
        for j in range(start, end):
            if 48 <= data[j] <= 57:  # "0" to "9"
                has_digit = True
                break
        if has_digit:
            continue
        in_word = False
        for j in range(start, end):
            character = data[j]
            if 97 <= character <= 122:  # "a" to "z"
                if not in_word and written:
                    out[written] = 32
                    written += 1
                out[written] = character
                written += 1
                in_word = True
            else:
                in_word = False
    return result[:written].decode("ascii")


@cython.cfunc
@cython.inline
@cython.locals(character=cython.uchar)
def _is_ascii_space(character) -> cython.bint:
    """What Python's \\s matches below 128: tab to carriage return, the separators 28-31, space."""
    return character == 32 or 9 <= character <= 13 or 28 <= character <= 31


@cython.cfunc
@cython.locals(data=cython.p_uchar, start=cython.Py_ssize_t, end=cython.Py_ssize_t, at=cython.Py_ssize_t,
               host=cython.Py_ssize_t, cut=cython.Py_ssize_t)
def _after_link_host(data, start, end) -> cython.Py_ssize_t:
    """Where a token ends once ``_URL_PATH`` has cut its first link after the host: at the
    first "http://" or "https://" followed by a host (no "/") and then a "/"."""
    for at in range(start, end):
        if end - at < 4 or data[at] != 104 or data[at + 1] != 116 or data[at + 2] != 116 or data[at + 3] != 112:
            continue  # not "http"
        host = at + 4
        if host < end and data[host] == 115:  # "s"
            host += 1
        if end - host < 3 or data[host] != 58 or data[host + 1] != 47 or data[host + 2] != 47:
            continue  # not "://"
        host += 3
        cut = host
        while cut < end and data[cut] != 47:
            cut += 1
        if host < cut < end:
            return cut
    return end


# Shingles recur across texts (words, spam templates): each one's digest is computed once.
_SHINGLE_DIGESTS: dict[str, bytes] = {}
_SHINGLE_DIGESTS_MAX = 100_000  # ~10 MB


def simhash(text: str) -> int:
    """64-bit SimHash of the character 5-shingles of the text (letters only, lower-cased)."""
    normalized = normalize_text(text).ljust(_SHINGLE)
    return _simhash_compiled(normalized) if cython.compiled else _simhash_of_shingles(normalized)


def _simhash_of_shingles(normalized: str) -> int:
    """The reference: each distinct shingle's blake2b digest votes for its bits (numpy)."""
    shingles = {normalized[i:i + _SHINGLE] for i in range(len(normalized) - _SHINGLE + 1)}
    known = _SHINGLE_DIGESTS
    if len(known) > _SHINGLE_DIGESTS_MAX:
        known.clear()
    for shingle in shingles:
        if shingle not in known:
            known[shingle] = hashlib.blake2b(shingle.encode(), digest_size=8).digest()
    digests = b"".join(map(known.__getitem__, shingles))
    bits = np.unpackbits(np.frombuffer(digests, dtype=np.uint8)).reshape(len(shingles), 64)
    majority = bits.sum(axis=0) * 2 > len(shingles)
    return int.from_bytes(np.packbits(majority).tobytes(), "big")


# The compiled path names a shingle of letters and spaces by a 25-bit code (5 bits per
# character), so it neither slices the text nor hashes strings to find a shingle's digest,
# and keeps recent digests in a direct-mapped C table (768 KB) instead of a dict.
_DIGEST_SLOTS_BITS = 16  # the two tables below hold 1 << 16 slots
_DIGEST_TAGS = cython.declare(cython.uint[65536])  # a slot's shingle code + 1; 0 for empty
_DIGEST_VALUES = cython.declare(cython.ulonglong[65536])  # its digest, big-endian, as a number


@cython.locals(length=cython.Py_ssize_t, start=cython.Py_ssize_t, k=cython.Py_ssize_t, bit=cython.int,
               rows=cython.int, character=cython.uchar, code=cython.uint, data=cython.p_uchar,
               majority=cython.ulonglong, digest=cython.ulonglong, slot=cython.uint, golden=cython.uint,
               size=cython.Py_ssize_t, seen_slot=cython.Py_ssize_t, seen=cython.p_uint, shingle=cython.Py_ssize_t,
               shift=cython.int, every_fourth_of_16=cython.ulonglong)
def _simhash_compiled(normalized: str) -> int:
    """``_simhash_of_shingles`` as C loops, only called when compiled (tests/unit/test_compiled.py
    compares the two): each distinct shingle's blake2b digest votes once. The distinct shingles
    are found with a small open-addressing table of codes, the digests come from the C table
    (computed on a miss, so the fingerprints are blake2b's whatever the table holds), and the
    votes are added 16 bits at a time into 16-bit lanes of 64-bit words."""
    if not normalized.isascii():  # not what normalize_text makes: the reference path handles anything
        return _simhash_of_shingles(normalized)
    encoded = normalized.encode("ascii")
    data, length, shingle, shift = encoded, len(encoded), _SHINGLE, 32 - _DIGEST_SLOTS_BITS
    counts = cython.declare(cython.int[64])
    lanes = cython.declare(cython.ulonglong[16])  # word k, 16-bit lane j: votes for bit 16 * j + k (from the right)
    for bit in range(64):
        counts[bit] = 0
    for k in range(16):
        lanes[k] = 0
    size = 16
    while size < 2 * length:
        size *= 2
    scratch = bytearray(4 * size)  # zeroed: a slot holds a shingle's code + 1
    seen = cython.cast(cython.p_uint, cython.cast(cython.p_uchar, scratch))
    golden = 2654435761  # Knuth's multiplicative hash: the table index is the product's top bits
    every_fourth_of_16 = 0x0001000100010001
    rows = 0
    for start in range(length - shingle + 1):
        code = 0
        for k in range(shingle):
            character = data[start + k]
            if character == 32:  # " "
                code = code << 5
            elif 97 <= character <= 122:  # "a" to "z"
                code = (code << 5) | (character - 96)
            else:
                return _simhash_of_shingles(normalized)
        seen_slot = code & (size - 1)
        while seen[seen_slot] and seen[seen_slot] != code + 1:
            seen_slot = (seen_slot + 1) & (size - 1)
        if seen[seen_slot]:
            continue
        seen[seen_slot] = code + 1
        slot = (code * golden) >> shift
        if _DIGEST_TAGS[slot] == code + 1:
            digest = _DIGEST_VALUES[slot]
        else:
            digest = int.from_bytes(hashlib.blake2b(encoded[start:start + shingle], digest_size=8).digest(), "big")
            _DIGEST_TAGS[slot], _DIGEST_VALUES[slot] = code + 1, digest
        for k in range(16):
            lanes[k] += (digest >> k) & every_fourth_of_16
        rows += 1
        if rows % 0xFFFF == 0:  # before a lane overflows
            _add_lanes(lanes, counts)
    _add_lanes(lanes, counts)
    majority = 0
    for bit in range(64):
        if counts[bit] * 2 > rows:
            majority |= cython.cast(cython.ulonglong, 1) << (63 - bit)
    return majority


@cython.cfunc
@cython.locals(lanes=cython.p_ulonglong, counts=cython.p_int, k=cython.int, lane=cython.int)
def _add_lanes(lanes, counts) -> cython.void:
    """Moves the lanes' votes into ``counts`` (indexed from the leftmost bit) and empties them."""
    for k in range(16):
        for lane in range(4):
            counts[63 - (16 * lane + k)] += (lanes[k] >> (16 * lane)) & 0xFFFF
        lanes[k] = 0


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
