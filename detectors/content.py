"""Online text classifier for posts, comments and messages.

Character 4-grams of the normalised text are hashed into 2^18 buckets (no
vocabulary to grow) and fed to a River logistic regression trained from labels
of content events. It learns with AdaGrad, whose step works on the text's own
n-grams only: River's Adam step computes its moments over every weight ever
seen, measured 4.7 ms per label at 13,000 weights and 107 ms at 126,000 (a
platform's real vocabulary fills most of the 262,144 buckets), against
0.19-0.28 ms for AdaGrad. On the simulator both rank texts alike (content PR AUC
0.994 for both; 0.661 against 0.649 on a harder seed).

>>> m = ContentModel(min_labels_per_class=1)
>>> spam, ham = "get a FREE phone now visit http://x.example", "lovely walk in the park today"
>>> for _ in range(30):
...     m.learn_one(text_inputs(spam), True); m.learn_one(text_inputs(ham), False)
>>> m.predict_proba_one(text_inputs("FREE phone now!!! http://y.example")) > 0.5 > m.predict_proba_one(text_inputs("walk in the park"))
True
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Mapping

import cython
import orjson
from river import linear_model, optim

if cython.compiled:  # a text's counts written as JSON bytes in place (see _scored_counts_compiled)
    from cython.cimports.cpython.bytes import PyBytes_FromStringAndSize

from detectors.model import HoldsWeights, held_weights, logistic_of, logistic_proba
from detectors.sketches import normalize_text

BUCKETS = 1 << 18
NGRAM = 4


def ngram_counts(text: str) -> dict[str, int]:
    """Hashed character n-gram counts of ``text``: what a risk score keeps of it (``inputs.text``),
    as whole numbers a third the size of their shares in JSON (docs/performance.md, round 21)."""
    normalized = f" {normalize_text(text)} ".encode()  # ASCII: bytes and characters are one
    return _counts_compiled(normalized) if cython.compiled else _counts_of_ngrams(normalized)


def text_inputs(text: str) -> dict[str, float]:
    """The content model's input: each n-gram bucket's share of the text's n-grams."""
    return shares_of(ngram_counts(text))


@cython.locals(total=cython.double, count=cython.double, shares=dict)
def shares_of(counts: Mapping[str, float]) -> dict[str, float]:
    """Each count's share of their sum: the content model's input from a text's ``ngram_counts``
    (their sum is the number of n-grams, so these are the doubles dividing by it gives). Given
    shares instead (a score stored before round 21), it returns them as they were, to within
    the rounding of their sum.

    >>> shares_of({"7": 2, "9": 1}) == {"7": 2 / 3, "9": 1 / 3}
    True
    """
    total = 0.0
    for count in counts.values():
        total += count
    shares = {}
    for bucket, number in counts.items():
        count = number
        shares[bucket] = count / total
    return shares


def _counts_of_ngrams(normalized: bytes) -> dict[str, int]:
    """The reference: each n-gram's CRC-32 names its bucket; the n-grams each bucket counts."""
    crc32, mask = zlib.crc32, BUCKETS - 1
    counts = Counter([crc32(normalized[i:i + NGRAM]) & mask for i in range(max(1, len(normalized) - NGRAM + 1))])
    return {str(bucket): n for bucket, n in counts.items()}


def _crc32_table() -> list[int]:
    """The byte-at-a-time table of zlib's CRC-32 (reflected polynomial 0xEDB88320)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32_TABLE = cython.declare(cython.uint[256], _crc32_table())
# A bucket's name, made once: most of a text's n-grams recur across texts. At most 2 MB of
# list plus ~60 bytes a bucket ever seen; only the compiled path names buckets from it.
_BUCKET_NAMES: list[str | None] = [None] * BUCKETS if cython.compiled else []


@cython.cfunc
@cython.locals(data=cython.p_uchar, length=cython.Py_ssize_t, grams=cython.Py_ssize_t, start=cython.Py_ssize_t,
               end=cython.Py_ssize_t, k=cython.Py_ssize_t, crc=cython.uint, bucket=cython.uint, size=cython.Py_ssize_t,
               slot=cython.Py_ssize_t, distinct=cython.Py_ssize_t, scratch_words=cython.p_uint,
               slots=cython.p_uint, buckets=cython.p_uint, counts=cython.p_uint,
               ngram=cython.Py_ssize_t, mask=cython.uint, all_ones=cython.uint)
def _count_buckets(normalized: bytes) -> tuple:
    """The C loop of ``_counts_compiled``: CRC-32s from a table, buckets counted in a small
    open-addressing table in the order they first appear (as ``Counter`` keeps them), no Python
    object per n-gram. Returns (scratch, distinct): ``_buckets`` and ``_counts`` of the scratch
    are the distinct buckets and their counts."""
    data, length, ngram, mask, all_ones = normalized, len(normalized), NGRAM, BUCKETS - 1, 0xFFFFFFFF
    grams = max(1, length - ngram + 1)
    size = 16
    while size < 2 * grams:
        size *= 2
    scratch = bytearray(4 * (2 + size + 2 * grams))  # zeroed: slot 0 means empty
    scratch_words = cython.cast(cython.p_uint, cython.cast(cython.p_uchar, scratch))
    scratch_words[0], scratch_words[1] = 2 + size, 2 + size + grams  # where the buckets and counts are
    slots, buckets, counts = scratch_words + 2, scratch_words + scratch_words[0], scratch_words + scratch_words[1]
    distinct = 0
    for start in range(grams):
        end = min(start + ngram, length)
        crc = all_ones
        for k in range(start, end):
            crc = _CRC32_TABLE[(crc ^ data[k]) & 0xFF] ^ (crc >> 8)
        bucket = (crc ^ all_ones) & mask
        slot = bucket & (size - 1)  # a CRC's low bits are as good as any
        while slots[slot] and buckets[slots[slot] - 1] != bucket:
            slot = (slot + 1) & (size - 1)
        if slots[slot]:
            counts[slots[slot] - 1] += 1
        else:
            buckets[distinct] = bucket
            counts[distinct] = 1
            distinct += 1
            slots[slot] = distinct
    return scratch, distinct


@cython.cfunc
@cython.inline
def _buckets(scratch: bytearray) -> cython.p_uint:
    words = cython.cast(cython.p_uint, cython.cast(cython.p_uchar, scratch))
    return words + words[0]


@cython.cfunc
@cython.inline
def _counts(scratch: bytearray) -> cython.p_uint:
    words = cython.cast(cython.p_uint, cython.cast(cython.p_uchar, scratch))
    return words + words[1]


@cython.cfunc
@cython.inline
def _bucket_name(bucket: cython.uint) -> str:
    names = _BUCKET_NAMES
    name = names[bucket]
    if name is None:
        name = names[bucket] = str(bucket)
    return name


@cython.locals(distinct=cython.Py_ssize_t, at=cython.Py_ssize_t, buckets=cython.p_uint, counts=cython.p_uint)
def _counts_compiled(normalized: bytes) -> dict[str, int]:
    """``_counts_of_ngrams`` from ``_count_buckets``, only called when compiled
    (tests/unit/test_compiled.py compares the two)."""
    scratch, distinct = _count_buckets(normalized)
    buckets, counts = _buckets(scratch), _counts(scratch)
    found = {}
    for at in range(distinct):
        found[_bucket_name(buckets[at])] = counts[at]
    return found


@cython.cdivision(True)  # IEEE division, as Python's floats (the total is never 0: a text has an n-gram)
@cython.locals(weights=dict, distinct=cython.Py_ssize_t, at=cython.Py_ssize_t, buckets=cython.p_uint,
               counts=cython.p_uint, total=cython.double, count=cython.double, weight=cython.double,
               z=cython.double, written=cython.Py_ssize_t, out=cython.p_uchar)
def _scored_counts_compiled(weights: dict, intercept: float, normalized: bytes) -> tuple:
    """``ContentModel.score_text`` with JSON, only called when compiled (tests/unit/test_compiled.py
    compares it with the reference): the probability as ``_logistic_proba_of_counts`` gives it, and
    the JSON orjson makes of ``_counts_compiled``'s dict, both read from ``_count_buckets``' arrays:
    no dict of ~80 counts made, walked, encoded and freed per text (docs/performance.md, round 41)."""
    scratch, distinct = _count_buckets(normalized)
    buckets, counts = _buckets(scratch), _counts(scratch)
    total = 0.0
    for at in range(distinct):
        total += counts[at]
    z = 0.0
    for at in range(distinct):
        count = counts[at]
        weight = weights.get(_bucket_name(buckets[at]), 0.0)
        z += weight * (count / total)
    text = bytearray(2 + distinct * 20)  # '"' + 6 digits + '":' + 10 digits + ',' at most per bucket
    out = text
    out[0] = 123  # {
    written = 1
    for at in range(distinct):
        if at:
            out[written] = 44  # ,
            written += 1
        out[written] = 34  # "
        written = _write_digits(out, written + 1, buckets[at])
        out[written] = 34
        out[written + 1] = 58  # :
        written = _write_digits(out, written + 2, counts[at])
    out[written] = 125  # }
    return logistic_of(z + intercept), PyBytes_FromStringAndSize(cython.cast(cython.p_char, out), written + 1)


@cython.cfunc
@cython.inline
@cython.locals(digits=cython.int, rest=cython.uint, k=cython.int)
def _write_digits(out: cython.p_uchar, at: cython.Py_ssize_t, number: cython.uint) -> cython.Py_ssize_t:
    """Writes ``number`` in decimal at ``at``; returns where it ends."""
    digits, rest = 1, number // 10
    while rest:
        digits += 1
        rest //= 10
    for k in range(digits - 1, -1, -1):
        out[at + k] = 48 + number % 10
        number //= 10
    return at + digits


LEARNING_RATE = 0.1


class ContentModel(HoldsWeights):
    version = "text-logreg/2"

    def __init__(self, min_labels_per_class: int = 20, learning_rate: float = LEARNING_RATE):
        self.classifier = linear_model.LogisticRegression(optimizer=optim.AdaGrad(learning_rate), l2=0.0)
        self.min_labels_per_class = min_labels_per_class
        self.positives = self.negatives = 0

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if not isinstance(self.classifier.optimizer, optim.AdaGrad):  # a checkpoint of text-logreg/1 (Adam)
            self.classifier.optimizer = optim.AdaGrad(LEARNING_RATE)

    @property
    def ready(self) -> bool:
        return min(self.positives, self.negatives) >= self.min_labels_per_class

    def predict_proba_one(self, inputs: Mapping[str, float]) -> float:
        weights = held_weights(self, self.classifier) if cython.compiled and type(inputs) is dict else None
        if weights is None:
            return float(self.classifier.predict_proba_one(dict(inputs)).get(True, 0.0))
        return logistic_proba(weights, self.classifier.intercept, inputs)

    def predict_proba_counts(self, counts: Mapping[str, float]) -> float:
        """``predict_proba_one(shares_of(counts))``, the same double, without the shares' dict:
        each share is divided out where it is weighed (a dict of ~75 floats per text cost more
        than the prediction itself, docs/performance.md round 22).

        >>> m = ContentModel()
        >>> m.learn_one(text_inputs("free phone"), True)
        >>> counts = ngram_counts("free phone now")
        >>> m.predict_proba_counts(counts) == m.predict_proba_one(shares_of(counts))
        True
        """
        weights = held_weights(self, self.classifier) if cython.compiled and type(counts) is dict else None
        if weights is None:
            return self.predict_proba_one(shares_of(counts))
        return _logistic_proba_of_counts(weights, self.classifier.intercept, counts)

    def score_text(self, text: str, as_json: bool = False) -> tuple[float, dict[str, int] | bytes]:
        """``predict_proba_counts(ngram_counts(text))`` and the counts: the dict, or with ``as_json``
        the JSON orjson makes of it, which a risk score carries. Compiled, that JSON and the
        probability are read from the counting's own arrays, with no dict of the text's ~80
        counts made, walked, encoded and freed (docs/performance.md, round 41).

        >>> m = ContentModel()
        >>> m.learn_one(text_inputs("free phone"), True)
        >>> proba, counts = m.score_text("free phone now")
        >>> (proba, counts) == (m.predict_proba_counts(ngram_counts("free phone now")), ngram_counts("free phone now"))
        True
        >>> m.score_text("free phone now", as_json=True) == (proba, orjson.dumps(counts))
        True
        """
        if as_json and cython.compiled:
            weights = held_weights(self, self.classifier)
            if weights is not None:
                normalized = f" {normalize_text(text)} ".encode()  # as ngram_counts normalizes it
                return _scored_counts_compiled(weights, self.classifier.intercept, normalized)
        counts = ngram_counts(text)
        return self.predict_proba_counts(counts), orjson.dumps(counts) if as_json else counts

    def learn_one(self, inputs: Mapping[str, float], is_abuse: bool) -> None:
        if is_abuse:
            self.positives += 1
        else:
            self.negatives += 1
        self.classifier.learn_one(dict(inputs), is_abuse)


@cython.cdivision(True)  # IEEE division, as Python's floats (the total is never 0: see the caller)
@cython.locals(weights=dict, counts=dict, total=cython.double, count=cython.double, weight=cython.double,
               z=cython.double)
def _logistic_proba_of_counts(weights: dict, intercept: float, counts: dict) -> float:
    """``logistic_proba(weights, intercept, shares_of(counts))``: the same operations on the same
    doubles in the same order, each share ``count / total`` made where it is used (in C when
    compiled; tests/unit/test_compiled.py compares them)."""
    total = 0.0
    for count in counts.values():
        total += count
    z = 0.0
    for name, number in counts.items():
        count = number
        weight = weights.get(name, 0.0)
        z += weight * (count / total)
    return logistic_of(z + intercept)
