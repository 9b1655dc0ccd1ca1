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
read, would otherwise copy every risk score to the broker a second time (1.7 KB an event,
431 bytes of it on disk; docs/performance.md, round 38). A row recovered from the changelog is then a
reference, and a label that comes for it reads its score back (``ScoresReadBack``); the risk-scores
topic must keep its scores as long as the join waits for their labels (``topics create``
sets its retention to the label TTL).

>>> rows = {}
>>> join = ScoreJoin(lambda partition: lambda key: rows.get((partition, key)))
>>> score = b'{"event_id": "e1", "ts": 5, "features": {"x": 1.0}, "detectors": {"model": 0.4}}'
>>> join.add(0, b"e1", score, offset=41)
>>> join.rows[0][b"e1"][:1] == UNLABELLED_SCORE, join.logged[0][b"e1"], join.examples
(True, b'r41', [])
>>> rows[0, b"e1"] = orjson.dumps({"id": "e1", "y": "abuse", "yts": 9, "src": "moderator"})  # a label came first
>>> join = ScoreJoin(lambda partition: lambda key: rows.get((partition, key)))
>>> join.add(0, b"e1", score, offset=41)
>>> [(key, example["label"], example["features"]) for key, example in join.examples]
[(b'e1', 'abuse', {'x': 1.0})]
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

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
_REFERENCE = SCORE_REFERENCE + b"%d"  # a row's changelog value: the reference and its score's offset


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
    read back first (``ScoresReadBack``, ``read_back_row``)."""
    if not raw:
        return None
    if raw[:1] == SCORE_REFERENCE:
        raise ValueError(f"a reference to a risk score ({raw!r}) must be resolved before it is joined")
    if raw[:1] == UNLABELLED_SCORE:
        return on_score(None, orjson.loads(raw[1:]))[0]
    return orjson.loads(raw)


def read_back_row(key: bytes, found: tuple[bytes | None, bytes] | None) -> bytes | None:
    """The row a reference stands for, given what was read at its offset: ``found`` is (key,
    value) of that risk-scores record, None if the topic no longer has it. A score gone, or
    not this key's, leaves no row: the label then waits for a score as one that came first does.

    >>> scores = {7: (b"e1", b'{"event_id": "e1"}')}
    >>> read_back_row(b"e1", scores.get(7)), read_back_row(b"e1", scores.get(8)), read_back_row(b"e2", scores.get(7))
    (b's{"event_id": "e1"}', None, None)
    """
    if found is None or found[0] != key:
        return None
    return UNLABELLED_SCORE + found[1]


class ScoreJoin:
    """The rows (per partition, per key, in first-write order), their changelog values where
    they differ (``logged``: a new row's is a reference to its score) and the training
    examples that a sequence of risk scores yields, given ``reader_of(partition)``, which
    reads the row a key of that partition had before (asked once per partition: a read of
    scores joins a few hundred, and each look-up is then one call)."""

    def __init__(self, reader_of: Callable[[int], Callable[[bytes], bytes | None]]) -> None:
        self._reader_of = reader_of
        self._readers: dict[int, Callable[[bytes], bytes | None]] = {}
        self.rows: dict[int, dict[bytes, bytes]] = {}
        self.logged: dict[int, dict[bytes, bytes]] = {}
        self.examples: list[tuple[bytes, Example]] = []

    def add(self, partition: int, key: bytes, score: bytes, offset: int) -> None:
        """Joins one risk score (its bytes as produced, at ``offset`` of the risk-scores
        partition ``partition``) kept under ``key``. Raises on a score that is not a risk
        score's JSON only if its key already had a row; nothing is kept then."""
        rows = self.rows.get(partition)
        if rows is None:  # the partition's first score of this read (its reader first: it may raise)
            self._readers[partition] = self._reader_of(partition)
            rows = self.rows[partition] = {}
            self.logged[partition] = {}
        before = rows.get(key)
        if before is None:
            before = self._readers[partition](key)
        if before is None or before[:1] == SCORE_REFERENCE:  # a reference: this very event's score
            rows[key] = UNLABELLED_SCORE + score
            self.logged[partition][key] = _REFERENCE % offset
            return
        pending, example = on_score(pending_of(before), orjson.loads(score))
        rows[key] = orjson.dumps(pending)
        self.logged[partition].pop(key, None)
        if example is not None:
            self.examples.append((key, example))


READ_BACK_RETRY_S = 1.0

ScoreAt = Callable[[int, int], "tuple[bytes | None, bytes] | None"]  # (partition, offset) -> (key, value)


class ReadBack(NamedTuple):
    """A label whose row was a reference when it came, with the score read back for it."""
    partition: int  # of the labels topic, the row's and the score's
    offset: int  # the label's
    key: bytes
    label: dict[str, Any]
    reference: int | None  # the score's offset; None: queued behind an earlier label of its key
    found: tuple[bytes | None, bytes] | None  # (key, value) read at ``reference``; None: gone, or none asked


class ScoresReadBack:
    """Reads back, on a thread of its own, the risk scores that labels' recovered rows refer to.

    Only labels that come for rows recovered from the changelog (a worker that took a
    partition over, or restarted after a crash) need a read: about 0.5 ms each on a local
    broker (docs/performance.md, round 38), off the scoring thread. The worker queues such a
    label (``request``), and any later label of the same key behind it (``waiting``), and
    joins them in order once read (``completed``). A label's position is committed only
    once it has been joined (``held_from``): a crash reads it again. Counts the scores read
    and those gone, for the worker's ``/replica/`` page.

    ``start=False`` reads nothing on its own: ``read_queued`` reads on the caller's thread.

    >>> topic = {(0, 7): (b"e1", b'{"event_id": "e1"}')}
    >>> back = ScoresReadBack(lambda partition, offset: topic.get((partition, offset)), start=False)
    >>> back.request(0, 30, b"e1", {"label": "abuse"}, 7)
    >>> back.waiting(0, b"e1"), back.held_from()
    (True, {0: 30})
    >>> back.request(0, 31, b"e1", {"label": "benign"}, None)  # behind the first
    >>> back.request(1, 5, b"e9", {"label": "abuse"}, 8)  # gone from the topic
    >>> back.read_queued()
    >>> [(r.partition, r.offset, r.reference, r.found) for r in back.completed()]
    [(0, 30, 7, (b'e1', b'{"event_id": "e1"}')), (0, 31, None, None), (1, 5, 8, None)]
    >>> back.waiting(0, b"e1"), back.held_from(), back.view()
    (False, {}, {'recovered_scores_read': 1, 'recovered_scores_gone': 1, 'recovered_scores_waiting': 0})
    """

    def __init__(self, score_at: ScoreAt, start: bool = True, on_close: Callable[[], None] | None = None) -> None:
        self._score_at = score_at
        self._on_close = on_close
        self._requests: queue.SimpleQueue[ReadBack | None] = queue.SimpleQueue()
        self._done: collections.deque[ReadBack] = collections.deque()
        self._waiting: collections.Counter[tuple[int, bytes]] = collections.Counter()  # labels queued per key
        self._in_flight: dict[int, dict[int, None]] = {}  # per labels partition, their offsets, oldest first
        self.read = 0
        self.gone = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="scores-read-back", daemon=True)
            self._thread.start()

    @classmethod
    def of_topic(cls, settings: Settings) -> "ScoresReadBack":
        """Reads ``settings.scores_topic``, with a reader made at the first request."""
        readers: list[PartitionReader] = []

        def score_at(partition: int, offset: int) -> tuple[bytes | None, bytes] | None:
            if not readers:
                readers.append(PartitionReader(settings, settings.scores_topic, group_id=settings.app_id,
                                               single_records=True))
            records = readers[0].read_range(partition, offset, offset + 1)
            if records and records[0][0] == offset and records[0][2] is not None:
                return records[0][1], records[0][2]
            log.warning("risk score %s[%d]@%d, which a recovered label-join row refers to, is no longer in "
                        "the topic: its label waits for a score as if none had come (keep the topic's "
                        "retention.ms at least label_ttl_s)", settings.scores_topic, partition, offset)
            return None

        def close_reader() -> None:
            for reader in readers:
                reader.close()

        return cls(score_at, on_close=close_reader)

    def waiting(self, partition: int, key: bytes) -> bool:
        """Whether a label of ``key`` is queued: a later label of the key must queue behind it."""
        return self._waiting[partition, key] > 0

    def request(self, partition: int, offset: int, key: bytes, label: dict[str, Any], reference: int | None) -> None:
        """Queues the label at ``offset`` of labels partition ``partition``, to read the score at
        ``reference`` for it (None: nothing to read, it waits for the labels of its key before it)."""
        self._waiting[partition, key] += 1
        self._in_flight.setdefault(partition, {})[offset] = None
        self._requests.put(ReadBack(partition, offset, key, label, reference, None))

    def completed(self) -> list[ReadBack]:
        """The labels whose reads are done, in the order they were queued."""
        done = []
        while self._done:
            read = self._done.popleft()
            key = (read.partition, read.key)
            self._waiting[key] -= 1
            if self._waiting[key] <= 0:
                del self._waiting[key]
            in_flight = self._in_flight.get(read.partition)
            if in_flight is not None:
                in_flight.pop(read.offset, None)
                if not in_flight:
                    del self._in_flight[read.partition]
            done.append(read)
        return done

    def held_from(self) -> dict[int, int]:
        """Per labels partition, the offset of its oldest label not joined yet: where its commits stop."""
        return {partition: next(iter(offsets)) for partition, offsets in self._in_flight.items()}

    def read_queued(self) -> None:
        """Reads what is queued, on this thread (an instance made with ``start=False``)."""
        while not self._requests.empty():
            request = self._requests.get()
            if request is not None:
                self._read(request)

    def view(self) -> dict[str, int]:
        return {"recovered_scores_read": self.read, "recovered_scores_gone": self.gone,
                "recovered_scores_waiting": sum(self._waiting.values())}

    def close(self) -> None:
        self._closing = True
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join(timeout=10)
        if self._on_close is not None:
            self._on_close()

    def _run(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            while not self._closing:
                try:
                    self._read(request)
                    break
                except Exception:  # e.g. the broker unreachable for the reader's timeout: its commit waits too
                    log.exception("reading back risk score %s of partition %d for the label at %d failed; "
                                  "retrying in %.0fs", request.reference, request.partition, request.offset,
                                  READ_BACK_RETRY_S)
                    time.sleep(READ_BACK_RETRY_S)

    def _read(self, request: ReadBack) -> None:
        found = None
        if request.reference is not None:
            found = self._score_at(request.partition, request.reference)
            if found is None:
                self.gone += 1
            else:
                self.read += 1
        self._done.append(request._replace(found=found))
