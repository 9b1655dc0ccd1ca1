"""Partitions of a topic read with librdkafka instead of through Faust.

Faust's consumer runs aiokafka on the worker's own threads: it fetches only while the
GIL lets it, and hands records over through a per-message path of several µs. The
worker reads every topic it processes this way instead, each following the partitions
Faust assigned (so partition ownership, table recovery and rebalances stay Faust's):

* **events**, the scoring input, and **labels**, the label join's (``AssignedSource``):
  librdkafka fetches on its own threads, without the GIL, while a batch is scored, so
  the next batch is waiting when this one ends (through Faust a loaded worker waited
  ~30% of its time for events, and its labels fell seconds behind, see
  docs/performance.md round 7). Positions are committed to the worker's consumer group
  after the writes of the records before them are in the log (``streams/app.py``), as
  Faust would, so consumer-group lag stays the operators' measure.
* **risk scores**, for the label join (``PartitionFollower``): every scored event's
  inputs must reach it, as a label may come for any of them days later. The scores
  partitions followed are those matching the labels partitions the worker owns (the
  two topics are co-partitioned by event id). The position per partition is a row of
  the label-join table (``POSITION_KEY``), written through the same ``KafkaWriter``
  after the rows it covers, so it reaches the changelog behind them: when the partition
  moves, Faust restores the rows and the position together on the new owner, which
  resumes there. A score read twice (after a crash) finds its row already written, and
  a joined one its ``learned`` mark, so it yields no second training example.

A follower belongs to no consumer group: it never joins (Faust's group assigns) and
never commits itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import orjson
from aiokafka.structs import TopicPartition as AIOKafkaTP
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from faust.types import TP

from detectors.events import dead_letter
from schemas import ContractViolation
from streams.config import Settings
from streams.kafka.io import PartitionReader

log = logging.getLogger("abuse_detector.follower")

# A label-join row that no event id can collide with: 0xff never occurs in UTF-8.
POSITION_KEY = b"\xffrisk-scores-position"


class Origin(NamedTuple):
    """Where an input record came from: dead letters name it, state updates key on it."""
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @classmethod
    def of(cls, msg: Message) -> "Origin":
        return cls(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())

    def dead_letter(self, violation: ContractViolation) -> bytes:
        """The dead-letter record (JSON) of this input record, rejected for ``violation``."""
        return orjson.dumps(dead_letter(violation, value=self.value, key=self.key, topic=self.topic,
                                        partition=self.partition, offset=self.offset,
                                        now_ms=int(time.time() * 1000)))


class PartitionFollower:
    """Follows some partitions of a topic; ``follow`` sets which, ``poll`` reads.

    ``partition_fetch_bytes`` caps each fetch per partition: small fetches keep the
    partitions of a backlog close to each other in event time (see Settings.fetch_bytes).
    """

    def __init__(self, bootstrap: str, topic: str, max_buffer_kb: int = 16_384,
                 partition_fetch_bytes: int = 1_048_576, fetch: dict[str, int] | None = None):
        self.topic = topic
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"follower-{topic}-{id(self)}",  # never joined or committed (see the module doc)
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": 20,
            "max.partition.fetch.bytes": partition_fetch_bytes,
            "queued.max.messages.kbytes": max_buffer_kb,
            "log_level": 3,
            **(fetch or {}),  # e.g. BACKGROUND_FETCH
        })
        self.following: set[int] = set()
        self.read = 0

    def follow(self, partitions: Iterable[int], position: Callable[[int], int | None]) -> None:
        """Reads exactly ``partitions`` from now on; one newly followed starts at
        ``position(partition)``, or at the beginning of the partition if that is None."""
        wanted = set(partitions)
        dropped, added = self.following - wanted, wanted - self.following
        if dropped:
            self.consumer.incremental_unassign([TopicPartition(self.topic, p) for p in sorted(dropped)])
        if added:
            starts = {p: position(p) for p in sorted(added)}
            self.consumer.incremental_assign(
                [TopicPartition(self.topic, p, OFFSET_BEGINNING if start is None else start) for p, start in starts.items()])
            log.info("reading %s from %s", self.topic,
                     {p: "the beginning" if s is None else s for p, s in starts.items()})
        self.following = wanted

    def poll(self, max_records: int = 5000) -> list[Message]:
        """The records fetched since the last call, in offset order per partition (never blocks)."""
        if not self.following:
            return []
        records = []
        for msg in self.consumer.consume(max_records, timeout=0):
            error = msg.error()
            if error is None:
                records.append(msg)
            elif error.code() != KafkaError._PARTITION_EOF:
                # librdkafka retries these itself (e.g. a topic that does not exist yet)
                log.warning("reading %s: %s", self.topic, error)
        self.read += len(records)
        return records

    def view(self) -> dict[str, object]:
        """Partitions followed, records read, and per partition the next offset to read and
        how far behind the partition's end that is (as of the last fetch): the reader's lag."""
        positions = self.consumer.position([TopicPartition(self.topic, p) for p in sorted(self.following)])
        lag = {}
        for tp in positions:
            _, end = self.consumer.get_watermark_offsets(tp, cached=True)
            lag[tp.partition] = {"next_to_read": tp.offset if tp.offset >= 0 else None,
                                 "behind": end - tp.offset if tp.offset >= 0 and end >= 0 else None}
        return {"following": sorted(self.following), "read": self.read, "partitions": lag}

    def close(self) -> None:
        self.consumer.close()


def _at_most(positions: Mapping[int, int], before: Mapping[int, int] | None) -> dict[int, int]:
    """Each partition's position, at most its offset in ``before`` if it has one there."""
    before = before or {}
    return {p: min(o, before.get(p, o)) for p, o in positions.items()}


class AssignedSource:
    """The partitions of ``topic`` Faust's group assigned this worker, read by a ``PartitionFollower``.

    Each newly owned partition starts at the group's committed offset (else the log
    start). ``processed`` records how far the worker got; the worker commits those
    positions to its group (``commit``) only after every write of the records before
    them is in the log: at-least-once, as Faust's own commits. A fetch hands over
    one partition's whole chunk before the next partition's, so a lagging worker's
    partitions drift apart in event time by up to a chunk each: small chunks
    (``Settings.fetch_bytes``, 64 KB is ~200 events) keep them within a batch of each
    other; each batch of events is then scored in event-time order
    (streams/ordering.py), so shards merged across partitions describe the same moment.
    """

    def __init__(self, app: Any, settings: Settings, topic: str, fetch: dict[str, int] | None = None):
        self.app, self.topic = app, topic
        self.follower = PartitionFollower(settings.bootstrap_servers, self.topic,
                                          partition_fetch_bytes=settings.fetch_bytes, fetch=fetch)
        self.group = PartitionReader(settings, self.topic, group_id=settings.app_id)  # committed offsets
        self.owned: set[int] = set()
        self.next_offset: dict[int, int] = {}  # per owned partition: the next offset to process
        self.committed: dict[int, int] = {}
        self.closed = False

    async def on_assigned(self) -> None:
        """Call from ``on_partitions_assigned``: follows exactly the owned partitions."""
        owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic}
        added = sorted(owned - self.follower.following)
        starts = await asyncio.to_thread(self.group.start_offsets, added) if added else {}
        self.follower.follow(owned, starts.get)
        # Paused in aiokafka too, not only left unread by Faust: aiokafka sends no fetch to a
        # broker while records it fetched from it wait unconsumed, so a chunk held there
        # would delay the changelogs behind it (by seconds, as it did the labels).
        thread = self.app.consumer._thread
        paused = [AIOKafkaTP(self.topic, p) for p in sorted(owned)]
        await thread.call_thread(lambda: thread._ensure_consumer().pause(*paused))
        for partition, offset in starts.items():
            self.next_offset[partition] = self.committed[partition] = offset
        self.owned = owned

    def on_revoked(self, revoked: Any, before: Mapping[int, int] | None = None) -> dict[int, int]:
        """Call from ``on_partitions_revoked``: stops reading them; returns their positions to
        commit, each partition's at most its offset in ``before`` if it has one there."""
        gone = {tp.partition for tp in revoked if tp.topic == self.topic} & self.owned
        self.owned -= gone
        self.follower.follow(self.owned, lambda partition: None)  # only drops partitions
        positions = _at_most({p: self.next_offset.pop(p) for p in gone if p in self.next_offset}, before)
        for p in gone:
            self.committed.pop(p, None)
        return positions

    def poll(self, max_records: int) -> list[Message]:
        """The records fetched since the last call (never blocks); none once closed (shutting down)."""
        return [] if self.closed else self.follower.poll(max_records)

    def processed(self, messages: Iterable[Message]) -> None:
        for msg in messages:
            self.next_offset[msg.partition()] = msg.offset() + 1

    def uncommitted(self, before: Mapping[int, int] | None = None) -> dict[int, int]:
        """Positions processed since the last commit, each partition's at most its offset in
        ``before`` if it has one there. Capture them *before* flushing the writes."""
        return {p: o for p, o in _at_most(self.next_offset, before).items() if self.committed.get(p) != o}

    async def commit(self, positions: dict[int, int]) -> None:
        """Commits ``positions`` to the worker's consumer group (through Faust's consumer, a member)."""
        await self.app.consumer._commit({TP(self.topic, p): o for p, o in positions.items()})
        for p, o in positions.items():
            if p in self.owned:
                self.committed[p] = o

    def view(self) -> dict[str, Any]:
        """Owned partitions, and per partition the next offset to process, the last committed,
        and how far behind the partition's end the reader is (as of its last fetch)."""
        read = self.follower.view()
        return {
            "assigned": sorted(self.owned), "read": read["read"],
            "offsets": {p: {"next_to_process": self.next_offset.get(p), "committed": self.committed.get(p),
                            "behind": read["partitions"].get(p, {}).get("behind")} for p in sorted(self.owned)},
        }

    def close(self) -> None:
        self.closed = True
        self.follower.close()
        self.group.close()
