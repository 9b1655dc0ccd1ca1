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
from typing import Any

import cython
import numpy as np

EXACT_LIMIT = 24
REGISTER_BITS = 7
REGISTERS = 1 << REGISTER_BITS  # 128
HLL_RELATIVE_ERROR = 1.04 / math.sqrt(REGISTERS)
_ALPHA = 0.7213 / (1 + 1.079 / REGISTERS)
# 2 ** -rank for every rank a 25-bit rest can have; a C array when compiled, so the estimate's
# sum over registers adds C doubles (indexing a Python tuple made it float objects: round 17)
_INVERSE_POWERS = cython.declare(cython.double[33], [2.0 ** -rank for rank in range(33)])
_REGISTER_INDEX = {str(register): register for register in range(REGISTERS)}

# {"x": {hash: ts}} exact, or {"h": {register: [[rank, ts], ...]}}; {"u": [parts]} only as
# distinct_union gives it to distinct_count, never stored
Distinct = dict[str, Any]


def hash32(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=4).digest(), "big")


# The one cache of value hashes (the same users, IPs and devices recur event after event).
# A dict, not an lru_cache: the sketches ask it ~3 times per event, and an lru_cache call
# builds an argument tuple and a key and relinks its list on every hit.
_HASHED = cython.declare(dict, {})  # value -> hashed(value); a C dict lookup when compiled
_HASHED_MAX = 65_536


def hashed(value: str) -> tuple[int, str]:
    """``hash32(value)`` and its decimal string, an exact sketch's key for it."""
    found = _HASHED.get(value)
    if found is None:
        if len(_HASHED) >= _HASHED_MAX:  # emptied when full: values recur, so it refills with them
            _HASHED.clear()
        h = hash32(value)
        found = _HASHED[value] = (h, str(h))
    return found


def new_distinct() -> Distinct:
    return {"x": {}}


def _rank(h: int) -> tuple[int, int]:
    register = h & (REGISTERS - 1)
    rest = h >> REGISTER_BITS  # 25 bits
    rank = 25 - rest.bit_length() + 1
    return register, rank


def _front_add(front: list[list[int]], rank: int, ts: int) -> list[list[int]]:
    """Keeps only pairs no other pair beats on both rank and recency."""
    if any(r >= rank and t >= ts for r, t in front):
        return front
    front = [[r, t] for r, t in front if not (r <= rank and t <= ts)]
    front.append([rank, ts])
    front.sort(key=lambda p: p[1])
    return front


def _to_hll(exact: dict[str, int]) -> dict[str, list[list[int]]]:
    registers: dict[str, list[list[int]]] = {}
    for key, ts in exact.items():
        register, rank = _rank(int(key))
        registers[str(register)] = _front_add(registers.get(str(register), []), rank, ts)
    return registers


def distinct_add(sketch: Distinct, value: str, ts_s: int) -> Distinct:
    h, key = hashed(value)
    return distinct_insert(sketch, h, ts_s, key)[0]


@cython.locals(exact=dict)
def distinct_insert(sketch: Distinct, h: int, ts_s: int, key: str | None = None) -> tuple[Distinct, bool | None]:
    """Adds a ``hash32``; returns the sketch and whether it held the hash before
    (None once the sketch is a HyperLogLog: unknown). ``key`` is ``str(h)`` if the caller has it."""
    if "x" in sketch:
        exact = sketch["x"]
        if key is None:
            key = str(h)
        seen = exact.get(key)
        if seen is not None:
            if ts_s > seen:
                exact[key] = ts_s
            return sketch, True
        if len(exact) < EXACT_LIMIT:
            exact[key] = ts_s
            return sketch, False
        sketch = {"h": _to_hll(exact)}
        known: bool | None = False
    else:
        known = None
    register, rank = _rank(h)
    registers = sketch["h"]
    registers[str(register)] = _front_add(registers.get(str(register), []), rank, ts_s)
    return sketch, known


def distinct_count(sketch: Distinct, since_s: int) -> int:
    """Distinct values seen at or after ``since_s``: of one sketch, or of a ``distinct_union``."""
    return distinct_counts(sketch, (since_s,))[0]


MAX_WINDOWS_PER_SKETCH = 4
# C ints when compiled: the per-value arithmetic below makes no Python int
_C_REGISTERS = cython.declare(cython.Py_ssize_t, REGISTERS)
_C_REGISTER_BITS = cython.declare(cython.int, REGISTER_BITS)


def distinct_counts(sketch: Distinct, since_s: tuple) -> list[int]:
    """``distinct_count`` at each of ``since_s`` (at most ``MAX_WINDOWS_PER_SKETCH``), in one
    pass over the sketch: an entity's windows on one sketch are counted together."""
    return _counts(sketch, since_s, 0, False)


def distinct_counts_back(sketch: Distinct, now_s: int, seconds: tuple) -> list[int]:
    """``distinct_counts`` since ``now_s - s`` for each of ``seconds``: the windows of an entity
    end at its watermark, and no tuple of their start times is made per event.

    >>> s = distinct_add(distinct_add(new_distinct(), "a", ts_s=10), "b", ts_s=50)
    >>> distinct_counts_back(s, 60, (30, 60)) == distinct_counts(s, (30, 0)) == [1, 2]
    True
    """
    return _counts(sketch, seconds, now_s, True)


@cython.cfunc
@cython.locals(n=cython.Py_ssize_t, w=cython.Py_ssize_t, register=cython.Py_ssize_t, at=cython.Py_ssize_t,
               rank=cython.int, ts=cython.longlong, h=cython.ulonglong, rest=cython.ulonglong, empty=cython.int,
               total=cython.double, counts=list, part=dict, now_s=cython.longlong, back=cython.bint)
def _counts(sketch: dict, times: tuple, now_s, back) -> list:
    """The counts since each of ``times``, or, if ``back``, since ``now_s`` minus each."""
    n = len(times)
    if n > MAX_WINDOWS_PER_SKETCH:
        raise ValueError(f"at most {MAX_WINDOWS_PER_SKETCH} windows per sketch, got {n}")
    since = cython.declare(cython.longlong[4])  # MAX_WINDOWS_PER_SKETCH
    for w in range(n):
        since[w] = times[w]
        if back:  # in C: no int object per window
            since[w] = now_s - since[w]
    if "x" in sketch:
        exact_counts = cython.declare(cython.int[4])
        for w in range(n):
            exact_counts[w] = 0
        for ts in sketch["x"].values():  # loops, not sum() over generators: compiled, no objects per value
            for w in range(n):
                if ts >= since[w]:
                    exact_counts[w] += 1
        return [exact_counts[w] for w in range(n)]
    # Per window, each register's best rank among the values seen in it
    ranks = cython.declare(cython.int[512])  # MAX_WINDOWS_PER_SKETCH * REGISTERS
    for at in range(n * _C_REGISTERS):
        ranks[at] = 0
    for part in ([sketch] if "h" in sketch else sketch["u"]):
        if "h" in part:
            for key, front in part["h"].items():
                register = _REGISTER_INDEX[key]
                for pair in front:  # (rank, ts) pairs no other beats on both
                    rank, ts = pair[0], pair[1]
                    for w in range(n):
                        if ts >= since[w] and rank > ranks[w * _C_REGISTERS + register]:
                            ranks[w * _C_REGISTERS + register] = rank
        else:  # an exact part of a union: each value where _to_hll would place it
            for key, ts in part["x"].items():
                h = int(key)
                register = h & (_C_REGISTERS - 1)
                rest = h >> _C_REGISTER_BITS
                rank = 26  # 25 - rest.bit_length() + 1, as _rank
                while rest:
                    rest >>= 1
                    rank -= 1
                for w in range(n):
                    if ts >= since[w] and rank > ranks[w * _C_REGISTERS + register]:
                        ranks[w * _C_REGISTERS + register] = rank
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


def distinct_union(parts: list[Distinct]) -> Distinct:
    """What folding ``distinct_merge`` over ``parts`` counts to, made without building fronts.

    Exact while every part is and their union holds at most ``EXACT_LIMIT`` values (as the
    fold keeps it); otherwise ``{"u": parts}``, which ``distinct_count`` counts as the
    HyperLogLog of every part's values: a register's best rank in a window is the best of
    all its pairs in the window, whichever of them the merged fronts would have kept.

    >>> a, b = distinct_add(new_distinct(), "x", ts_s=1), distinct_add(new_distinct(), "y", ts_s=5)
    >>> distinct_count(distinct_union([a, b]), since_s=0), distinct_count(distinct_union([a, b]), since_s=2)
    (2, 1)
    """
    if len(parts) == 1:
        return parts[0]
    merged: dict[str, int] = {}
    for part in parts:
        if "x" not in part:
            return {"u": parts}
        for key, ts in part["x"].items():
            seen = merged.get(key)
            if seen is None or ts > seen:
                merged[key] = ts
    if len(merged) > EXACT_LIMIT:
        return {"u": parts}
    return {"x": merged}


@cython.locals(exact=dict)
def distinct_expire(sketch: Distinct, before_s: int) -> Distinct:
    """``sketch`` without the values last seen before ``before_s`` (itself if none are)."""
    if "x" in sketch:
        exact = sketch["x"]
        for ts in exact.values():  # a loop, not min(): compiled, no iterator object per call
            if ts < before_s:
                return {"x": {k: t for k, t in exact.items() if t >= before_s}}
        return sketch
    if not _any_before(sketch["h"], before_s):
        return sketch
    registers = {}
    for register, front in sketch["h"].items():
        kept = [p for p in front if p[1] >= before_s]
        if kept:
            registers[register] = kept
    return {"h": registers}


def _any_before(registers: dict[str, list[list[int]]], before_s: int) -> bool:
    for front in registers.values():
        for pair in front:
            if pair[1] < before_s:
                return True
    return False


def distinct_merge(a: Distinct, b: Distinct) -> Distinct:
    if "x" in a and "x" in b:
        merged = dict(a["x"])
        for key, ts in b["x"].items():
            merged[key] = max(ts, merged.get(key, ts))
        if len(merged) <= EXACT_LIMIT:
            return {"x": merged}
        return {"h": _to_hll(merged)}
    ha = a["h"] if "h" in a else _to_hll(a["x"])
    hb = b["h"] if "h" in b else _to_hll(b["x"])
    registers = {k: list(v) for k, v in ha.items()}
    for register, front in hb.items():
        current = registers.get(register, [])
        for rank, ts in front:
            current = _front_add(current, rank, ts)
        registers[register] = current
    return {"h": registers}


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
