"""The worker's offset guard, wired to Faust: every record of an input topic's owned
partitions reaches its agent, also when Faust skips one or stalls a partition.

The decisions are in ``streams/progress.py``; this module reads the broker (committed
offsets, end offsets, skipped ranges) and acts on Faust's consumer (seek, rebalance).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

import faust
from faust.types import TP

from streams.config import Settings
from streams.kafka.io import PartitionReader
from streams.progress import PartitionProgress

log = logging.getLogger("abuse_detector.worker")


class Origin(NamedTuple):
    """Where an input record came from: dead letters name it, state updates key on it."""
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @classmethod
    def of(cls, message: Any) -> "Origin":
        return cls(message.topic, message.partition, message.offset, message.key, message.value)


class OffsetGuard:
    """Per input topic: the next offset to process of each partition this worker owns."""

    def __init__(self, app: faust.App, settings: Settings, topic: str) -> None:
        self.app, self.topic = app, topic
        self.progress = PartitionProgress(settings.stall_after_s)
        self.reader = PartitionReader(settings, topic, group_id=settings.app_id)
        self.owned: set[int] = set()

    async def on_assigned(self) -> None:
        """Call from ``on_partitions_assigned``: before any record of the new assignment,
        since Faust may commit past a record it skips."""
        self.owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic}
        self.progress.assigned(self.owned, time.monotonic())
        await self._learn_start_offsets()

    def on_revoked(self, revoked: Any) -> None:
        self.owned = self.owned - {tp.partition for tp in revoked if tp.topic == self.topic}

    def admit(self, message: Any, now: float) -> list[Origin]:
        """The records to process for ``message``, in offset order: any the consumer
        skipped before it (read from the broker: blocking, and rare), then itself."""
        partition, offset = message.partition, message.offset
        gap = self.progress.gap_before(partition, offset)
        origins = self._skipped(partition, *gap) if gap is not None else []
        origins.append(Origin.of(message))
        self.progress.processed(partition, offset, now)
        return origins

    def _skipped(self, partition: int, start: int, end: int) -> list[Origin]:
        try:
            records = self.reader.read_range(partition, start, end)
        except Exception:  # the broker is unreachable: say exactly what is missing
            self.progress.unfilled.append((partition, start, end))
            log.exception("%s partition %d: the consumer skipped offsets %d..%d and reading them from the "
                          "broker failed; they are NOT processed: produce those records to %s again "
                          "(they never reached state, so nothing counts twice)",
                          self.topic, partition, start, end - 1, self.topic)
            return []
        if records:  # no records: transaction markers, a real gap
            self.progress.gaps_filled += 1
            self.progress.records_filled += len(records)
            log.warning("%s partition %d: the consumer skipped %d record(s) at offsets %d..%d; "
                        "read them from the broker", self.topic, partition, len(records), start, end - 1)
        return [Origin(self.topic, partition, offset, key, value) for offset, key, value in records]

    async def watch(self) -> None:
        """Call from a timer: a partition with records past its next offset and no progress
        for ``stall_after_s`` is sought back to it; after a few seeks, the group rebalances."""
        await self._learn_start_offsets()
        if self.app.rebalancing or not self.owned:
            return
        ends = await asyncio.to_thread(self.reader.end_offsets, sorted(self.owned))
        consumer = self.app.consumer
        for stall in self.progress.overdue(ends, time.monotonic()):
            if self.progress.should_rebalance(stall):
                log.error("%s partition %d still stalled at offset %d (end %d) after %d seeks; "
                          "asking the group to rebalance", self.topic, stall.partition, stall.next_offset,
                          stall.end_offset, stall.seeks)
                await consumer._thread.call_thread(consumer._thread._ensure_consumer()._coordinator.request_rejoin)
            else:
                log.warning("%s partition %d stalled at offset %d (end %d): seeking back to it",
                            self.topic, stall.partition, stall.next_offset, stall.end_offset)
                tp = TP(self.topic, stall.partition)
                if tp in consumer._paused_partitions and not self.app.in_recovery:
                    consumer.resume_partitions({tp})
                await consumer._thread.seek_wait({tp: stall.next_offset})
            self.progress.seeked(stall.partition, time.monotonic())

    async def _learn_start_offsets(self) -> None:
        unknown = [p for p in self.progress.unknown_start() if p in self.owned]
        if not unknown:
            return
        generation = self.progress.generation
        try:
            starts = await asyncio.to_thread(self.reader.start_offsets, unknown)
        except Exception:  # the timer retries
            log.exception("reading the committed offsets of %s partitions %s failed", self.topic, unknown)
            return
        for partition, offset in starts.items():
            self.progress.start_at(partition, offset, generation)

    def view(self) -> dict[str, Any]:
        """What the worker is assigned, fetches, has paused or holds back for a full buffer,
        and per partition the next offset to process against the fetcher's position and
        high watermark: a partition assigned but not moving is a stalled one."""
        consumer = self.app.consumer

        def of(tps: Any) -> list[int]:
            return sorted(tp.partition for tp in (tps or ()) if tp.topic == self.topic)

        assigned = [tp for tp in consumer.assignment() if tp.topic == self.topic]
        fetcher = consumer._thread._consumer._subscription.subscription.assignment  # aiokafka's view
        progress = self.progress

        def offsets(tp: TP) -> dict[str, int | None]:
            state = fetcher.state_value(tp) if fetcher else None
            return {"next_to_process": progress.next_offset.get(tp.partition),
                    "fetch_position": state._position if state else None,
                    "highwater": state.highwater if state else None}

        return {
            "assigned": of(assigned), "fetching": of(consumer._active_partitions),
            "paused": of(consumer._paused_partitions), "buffer_full": of(consumer._buffered_partitions),
            "offsets": {tp.partition: offsets(tp) for tp in assigned},
            "gaps_filled": progress.gaps_filled, "records_filled": progress.records_filled,
            "stall_recoveries": progress.recoveries,
            "unfilled_gaps": [{"partition": p, "from": a, "to": b - 1} for p, a, b in progress.unfilled],
        }

    def close(self) -> None:
        self.reader.close()
