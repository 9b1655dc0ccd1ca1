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

>>> rows = {}
>>> join = ScoreJoin(lambda partition, key: rows.get((partition, key)))
>>> score = b'{"event_id": "e1", "ts": 5, "features": {"x": 1.0}, "detectors": {"model": 0.4}}'
>>> join.add(0, b"e1", score)
>>> join.rows[0][b"e1"][:1] == UNLABELLED_SCORE, join.examples
(True, [])
>>> rows[0, b"e1"] = orjson.dumps({"id": "e1", "y": "abuse", "yts": 9, "src": "moderator"})  # a label came first
>>> join = ScoreJoin(lambda partition, key: rows.get((partition, key)))
>>> join.add(0, b"e1", score)
>>> [(key, example["label"], example["features"]) for key, example in join.examples]
[(b'e1', 'abuse', {'x': 1.0})]
"""

from __future__ import annotations

from typing import Any, Callable

import orjson

from detectors.labels import Example, on_score

# A label-join value starting with this byte is a risk score as produced, no label seen
# yet; any other value is the join's pending record (JSON, see detectors/labels.py).
UNLABELLED_SCORE = b"s"


def pending_of(raw: bytes | None) -> dict[str, Any] | None:
    """The join's pending record of a stored row (None for no row)."""
    if not raw:
        return None
    if raw[:1] == UNLABELLED_SCORE:
        return on_score(None, orjson.loads(raw[1:]))[0]
    return orjson.loads(raw)


class ScoreJoin:
    """The rows (per partition, per key, in first-write order) and the training examples
    that a sequence of risk scores yields, given ``stored(partition, key)``, the row each
    key had before it."""

    def __init__(self, stored: Callable[[int, bytes], bytes | None]) -> None:
        self._stored = stored
        self.rows: dict[int, dict[bytes, bytes]] = {}
        self.examples: list[tuple[bytes, Example]] = []

    def add(self, partition: int, key: bytes, score: bytes) -> None:
        """Joins one risk score (its bytes as produced) kept under ``key``. Raises on a score
        that is not a risk score's JSON only if its key already had a row; nothing is kept then."""
        rows = self.rows.setdefault(partition, {})
        before = rows.get(key)
        if before is None:
            before = self._stored(partition, key)
        if before is None:
            rows[key] = UNLABELLED_SCORE + score
            return
        pending, example = on_score(pending_of(before), orjson.loads(score))
        rows[key] = orjson.dumps(pending)
        if example is not None:
            self.examples.append((key, example))
