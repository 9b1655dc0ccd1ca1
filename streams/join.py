"""The label join's side of the risk scores, read with librdkafka instead of through Faust.

Every scored event's inputs must reach the label join: a label may come for any of
them, days later. Faust delivered each risk score to the join agent for ~200 µs of
its per-message path (as much as a third of scoring the event), and while scoring
had a backlog the join fell behind (see docs/performance.md). ``ScoreFollower``
reads the risk-scores partitions that match the labels partitions this worker owns
(the two topics are co-partitioned by event id), with a librdkafka consumer that
belongs to no group, at a few µs a record.

Its position per partition is a row of the label-join table (``POSITION_KEY``),
written through the same ``KafkaWriter`` after the rows it covers, so it reaches the
changelog behind them: when the partition moves, Faust restores the rows and the
position together on the new owner, which resumes there. A score read twice (after
a crash) finds its row already written, and a joined one its ``learned`` mark, so it
yields no second training example.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

log = logging.getLogger("abuse_detector.join")

# A label-join row that no event id can collide with: 0xff never occurs in UTF-8.
POSITION_KEY = b"\xffrisk-scores-position"


class ScoreFollower:
    """Follows some partitions of the risk-scores topic; ``follow`` sets which, ``poll`` reads."""

    def __init__(self, bootstrap: str, topic: str, max_buffer_kb: int = 16_384):
        self.topic = topic
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"score-follower-{id(self)}",  # never joined or committed: positions live in the table
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": 20,
            "queued.max.messages.kbytes": max_buffer_kb,
            "log_level": 3,
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
            log.info("label join reading %s from %s", self.topic,
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
        how far behind the partition's end that is (as of the last fetch): the join's lag."""
        positions = self.consumer.position([TopicPartition(self.topic, p) for p in sorted(self.following)])
        lag = {}
        for tp in positions:
            _, end = self.consumer.get_watermark_offsets(tp, cached=True)
            lag[tp.partition] = {"next_to_read": tp.offset if tp.offset >= 0 else None,
                                 "behind": end - tp.offset if tp.offset >= 0 and end >= 0 else None}
        return {"following": sorted(self.following), "read": self.read, "partitions": lag}

    def close(self) -> None:
        self.consumer.close()
