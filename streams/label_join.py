"""The label join's rows: what the label-join table holds per event id, and the writes one
read of risk scores makes to it.

Each scored event's risk score is kept under its event id until its label comes (or the
table's TTL drops it); ``detectors/labels.py`` decides what a joined score and label
yield. Most scores never get a label, so a score whose row is new is kept as produced
(``UNLABELLED_SCORE`` and its bytes) and parsed only if a label comes.

``ScoreJoin`` collects the rows and training examples of one read of the scores topic
(up to a few hundred scores at full load), so the worker writes each partition's rows in
RocksDB write batches (``KafkaWriter.put_many``) and each key once, instead of one store
write per score (a 4 KB put cost 12-15 µs alone and ~8 in a batch, see
docs/performance.md, round 17).
A score looks its row up in the batch first, then in the store: a score read twice in
one read (a redelivery) joins with itself as it would have one write after the other.

A new row's changelog record is not the score but where it is: ``SCORE_REFERENCE`` and the
score's offset in the risk-scores topic, the same partition as the row (``ScoreJoin.logged``).
The store keeps the score itself; the changelog, which only recovery and standby replicas
read, would otherwise copy every risk score a second time (1.7 KB an event, the worker's CPU
per event +5-10%, docs/performance.md, round 38). A row recovered from the changelog is then a
reference, and a label that comes for it reads its score back (``resolve``); the risk-scores
topic must keep its scores as long as the join waits for their labels (``topics create``
sets its retention to the label TTL).

>>> rows = {}
>>> join = ScoreJoin(lambda partition, key: rows.get((partition, key)))
>>> score = b'{"event_id": "e1", "ts": 5, "features": {"x": 1.0}, "detectors": {"model": 0.4}}'
>>> join.add(0, b"e1", score, offset=41)
>>> join.rows[0][b"e1"][:1] == UNLABELLED_SCORE, join.logged[0][b"e1"], join.examples
(True, b'r41', [])
>>> rows[0, b"e1"] = orjson.dumps({"id": "e1", "y": "abuse", "yts": 9, "src": "moderator"})  # a label came first
>>> join = ScoreJoin(lambda partition, key: rows.get((partition, key)))
>>> join.add(0, b"e1", score, offset=41)
>>> [(key, example["label"], example["features"]) for key, example in join.examples]
[(b'e1', 'abuse', {'x': 1.0})]
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import orjson

from detectors.labels import Example, on_score
from streams.config import Settings
from streams.kafka.io import PartitionReader

log = logging.getLogger("abuse_detector.label_join")

# A label-join value starting with this byte is a risk score as produced, no label seen
# yet; one starting with SCORE_REFERENCE is where that score is in the risk-scores topic (a
# row as its changelog keeps it); any other value is the join's pending record (JSON, see
# detectors/labels.py).
UNLABELLED_SCORE = b"s"
SCORE_REFERENCE = b"r"


def reference_offset(raw: bytes | None) -> int | None:
    """The risk-scores offset a row recovered from the changelog refers to (None: not a reference).

    >>> reference_offset(b"r1234"), reference_offset(b"s{}"), reference_offset(None)
    (1234, None, None)
    """
    if raw and raw[:1] == SCORE_REFERENCE:
        return int(raw[1:])
    return None


def pending_of(raw: bytes | None) -> dict[str, Any] | None:
    """The join's pending record of a stored row (None for no row). A reference must be
    resolved first (``resolve``)."""
    if not raw:
        return None
    if raw[:1] == SCORE_REFERENCE:
        raise ValueError(f"a reference to a risk score ({raw!r}) must be resolved before it is joined")
    if raw[:1] == UNLABELLED_SCORE:
        return on_score(None, orjson.loads(raw[1:]))[0]
    return orjson.loads(raw)


def resolve(raw: bytes | None, key: bytes, score_at: Callable[[int], tuple[bytes | None, bytes] | None]) -> bytes | None:
    """A stored row with a reference replaced by the score it refers to, read with
    ``score_at(offset)`` ((key, value) of that risk-scores record, None if the topic no longer
    has it). A score gone, or not this key's, leaves no row: the label then waits for a score as
    one that came first does. Any other row is returned as it is.

    >>> scores = {7: (b"e1", b'{"event_id": "e1"}')}
    >>> resolve(b"r7", b"e1", scores.get), resolve(b"r8", b"e1", scores.get), resolve(b"r7", b"e2", scores.get)
    (b's{"event_id": "e1"}', None, None)
    """
    offset = reference_offset(raw)
    if offset is None:
        return raw
    found = score_at(offset)
    if found is None or found[0] != key:
        return None
    return UNLABELLED_SCORE + found[1]


class ScoreJoin:
    """The rows (per partition, per key, in first-write order), their changelog values where
    they differ (``logged``: a new row's is a reference to its score) and the training
    examples that a sequence of risk scores yields, given ``stored(partition, key)``, the
    row each key had before it."""

    def __init__(self, stored: Callable[[int, bytes], bytes | None]) -> None:
        self._stored = stored
        self.rows: dict[int, dict[bytes, bytes]] = {}
        self.logged: dict[int, dict[bytes, bytes]] = {}
        self.examples: list[tuple[bytes, Example]] = []

    def add(self, partition: int, key: bytes, score: bytes, offset: int) -> None:
        """Joins one risk score (its bytes as produced, at ``offset`` of the risk-scores
        partition ``partition``) kept under ``key``. Raises on a score that is not a risk
        score's JSON only if its key already had a row; nothing is kept then."""
        rows = self.rows.setdefault(partition, {})
        before = rows.get(key)
        if before is None:
            before = self._stored(partition, key)
        if before is None or before[:1] == SCORE_REFERENCE:  # a reference: this very event's score
            rows[key] = UNLABELLED_SCORE + score
            self.logged.setdefault(partition, {})[key] = SCORE_REFERENCE + b"%d" % offset
            return
        pending, example = on_score(pending_of(before), orjson.loads(score))
        rows[key] = orjson.dumps(pending)
        self.logged.get(partition, {}).pop(key, None)
        if example is not None:
            self.examples.append((key, example))


class ScoresReadBack:
    """Reads back the risk scores that recovered rows refer to (``resolve``), one at a time:
    only labels that come for rows recovered from the changelog (a worker that took a
    partition over, or restarted after a crash) pay a read, about 0.5 ms each on a local broker
    (docs/performance.md, round 38). Counts what it read and what was gone, for the worker's
    ``/replica/`` page."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._reader: PartitionReader | None = None  # made at the first reference: most workers never need one
        self.read = 0
        self.gone = 0

    def at(self, partition: int) -> Callable[[int], tuple[bytes | None, bytes] | None]:
        """``score_at(offset)`` of one risk-scores partition, for ``resolve``."""
        def score_at(offset: int) -> tuple[bytes | None, bytes] | None:
            if self._reader is None:
                self._reader = PartitionReader(self._settings, self._settings.scores_topic,
                                               group_id=self._settings.app_id, single_records=True)
            records = self._reader.read_range(partition, offset, offset + 1)
            if records and records[0][0] == offset and records[0][2] is not None:
                self.read += 1
                return records[0][1], records[0][2]
            self.gone += 1
            log.warning("risk score %s[%d]@%d, which a recovered label-join row refers to, is no longer "
                        "in the topic: its label waits for a score as if none had come (keep the topic's "
                        "retention.ms at least label_ttl_s)", self._settings.scores_topic, partition, offset)
            return None
        return score_at

    def view(self) -> dict[str, int]:
        return {"recovered_scores_read": self.read, "recovered_scores_gone": self.gone}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
