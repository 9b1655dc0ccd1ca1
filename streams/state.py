"""Entity state across workers: Faust tables for the shards a worker writes, a
replica of every shard for reading, and event-time expiry.

Users are the key of the events topic, so the worker that owns a user's
partition holds all of that user's state in the ``user-state`` table.

IPs, devices, merchants and cards show up on every partition. Each partition
``p`` keeps its own *shard* of such an entity in the entity's table under the
key ``b"<p>|<entity key>"`` (written while processing partition ``p``, so it
lands in changelog partition ``p`` like any Faust table write). Every worker
tails the partitions of those changelogs it does not own into a local RocksDB
replica. An event on partition ``p`` reads its own shard from the table
(exact), the shards of the worker's other partitions from their tables too,
and the rest from the replica (at most one replication delay old), and the
detector merges them. No event ever crosses a topic to reach its IP's owner;
the cost is at most one changelog write per entity per event plus the replication
reads. See docs/partitioning.md for the path, the costs and the staleness bound.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
from confluent_kafka import Consumer, TopicPartition
from rocksdict import AccessType, BlockBasedOptions, Options, Rdict, WriteBatch, WriteBufferManager

from detectors.worker_state import shard_key
from streams.kafka.io import BACKGROUND_FETCH

log = logging.getLogger("abuse_detector.state")

_OFFSET_PREFIX = b"\x01offset\x00"
_SKIPPED_KEY = b"\x01skipped"  # the partitions not followed (owned by this worker), as JSON
_COPY_CHUNK_ROWS = 10_000
# Most of the worker's store reads look for a key that is not there (a new score's event id in
# the label join, the shards and records of new entities, the reputation of entities that never
# had a label). A miss without a bloom filter took 10.5-11 µs in a 1M-key store of three files,
# 0.6-0.7 µs with 10 bits per key (~1% false positives); Faust's tables default to 3 bits
# (~24%): 1.9-2.5 µs against 0.5-0.8 (docs/performance.md, round 24). 1.25 bytes per key.
BLOOM_BITS_PER_KEY = 10
# The files' filters leave out the memtable: a read first seeks its skip list (a 64 MB
# memtable, Faust's, holds up to ~160,000 entity records), a few cold cache lines per level,
# hit or miss. A bloom filter of the memtable's keys answers most misses without the seek
# (docs/performance.md, round 30). Its size is this share of the memtable's: 330 KB in Faust's
# stores, ~16 bits per key of a full memtable of entity records.
MEMTABLE_BLOOM_RATIO = 0.005


def filter_memtable_misses(options: Options) -> None:
    """A bloom filter of each memtable's keys in ``options``' stores."""
    options.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO)
    options.set_memtable_whole_key_filtering(True)


def store_options(budget: WriteBufferManager | None = None) -> Options:
    """Options of the worker's own RocksDB stores (raw bytes, bloom filters for the misses, the
    worker's ``memtable_budget``)."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    table = BlockBasedOptions()
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, True)
    options.set_block_based_table_factory(table)
    filter_memtable_misses(options)
    within(budget)(options)
    return options


def table_options(**extra: Any) -> dict[str, Any]:
    """The options of a Faust table of the worker's: its stores in rocksdict, with
    BLOOM_BITS_PER_KEY bits of bloom filter per key (Faust's tables keep 3). A new dict for each
    table: Faust pops its keys."""
    return {"driver": "rocksdict", "bloom_filter_size": BLOOM_BITS_PER_KEY, **extra}


def amend_as_own_stores(table: Any, budget: WriteBufferManager | None) -> None:
    """A Faust table's stores given what ``store_options`` gives the worker's own: a bloom
    filter on each memtable, the memtables within ``budget``."""
    amend_table_stores(table, filter_memtable_misses)
    amend_table_stores(table, within(budget))


def memtable_budget(mb: int) -> WriteBufferManager | None:
    """One budget of ``mb`` MB for the memtables of every store given it (``within``); None for 0.

    Each Faust store keeps up to two 64 MB memtables, and a worker has one store per table and
    partition: 26 on one worker of four partitions, whose RSS reached ~1.1 GB after two minutes
    at 5,000 events/s, when no entity store had flushed yet (docs/performance.md, rounds 30-31).
    Past the budget, the store written to flushes its memtable; writers never stall."""
    if mb < 0:
        raise ValueError(f"ABUSE_STATE_MEMTABLE_MB={mb}: give MB (0 for no budget)")
    return WriteBufferManager(mb << 20, False) if mb else None


def within(budget: WriteBufferManager | None) -> Callable[[Options], None]:
    """What puts a store's options under ``budget`` (if any), for ``amend_table_stores`` and
    ``store_options``."""
    def amend(options: Options) -> None:
        if budget is not None:
            options.set_write_buffer_manager(budget)
    return amend


def amend_table_stores(table: Any, amend: Callable[[Options], None]) -> None:
    """Has ``amend`` change the options of each partition's RocksDB store of a Faust table, after
    Faust's own (table options cannot express them). Other stores (``memory://``) are left alone."""
    options = getattr(table.data, "rocksdb_options", None)
    if options is None:
        return
    build = options.as_options

    def amended() -> Options:
        amended_options = build()
        amend(amended_options)
        return amended_options

    options.as_options = amended


def pace_background_writes(table: Any, mb_per_s: int) -> None:
    """Caps what RocksDB's flushes and compactions write per second in each partition's store
    of a Faust table (``mb_per_s`` 0: no cap)."""
    if mb_per_s < 0:
        raise ValueError(f"ABUSE_LABEL_JOIN_WRITE_MB_S={mb_per_s}: give MB/s (0 for no cap)")
    if mb_per_s:
        amend_table_stores(table, lambda options: options.set_ratelimiter(mb_per_s << 20, 100_000, 10))


# An entity's store of one partition as this worker wrote it: its (key, record) rows, and the
# offset of the changelog record the store holds everything up to (None: none).
LocalPartition = Callable[[str, int], tuple[Iterable[tuple[bytes, bytes]], "int | None"]]


@dataclass
class ReplicaStats:
    applied: int = 0
    polls: int = 0
    newest_record_ms: int = 0  # timestamp of the newest replicated write
    caught_up: bool = False  # reached the end offsets seen at start
    # write-to-apply delay of recently replicated writes (ms): the staleness of the other shards
    recent_lag_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))

    def lag_summary(self) -> dict[str, float]:
        lags = sorted(self.recent_lag_ms)
        if not lags:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        return {"p50_ms": lags[len(lags) // 2], "p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))],
                "max_ms": lags[-1]}


class ShardReplica:
    """A local, read-only copy of the sharded entity changelogs' partitions this worker does
    not own.

    ``poll()`` applies what the changelogs received since the last call (it never
    blocks); replicated offsets are stored with the data, so a restart resumes
    where it stopped instead of re-reading the topics.

    ``own()`` names the partitions the worker owns after each rebalance. Their shards are
    read from the worker's own stores, so the replica does not follow them: it would copy
    back every record the worker wrote (docs/performance.md, round 23). A partition the
    worker owned and no longer does is copied from its store (the worker wrote every record
    of it) and followed from the offset the store holds everything up to, instead of reading
    the changelog written meanwhile again.
    """

    def __init__(self, bootstrap: str, changelogs: dict[str, str], partitions: int, path: Path,
                 budget: WriteBufferManager | None = None):
        self.changelogs = changelogs  # entity name -> changelog topic
        self._key_prefixes = {topic: name.encode() + b"\x00" for name, topic in changelogs.items()}
        self.partitions = partitions
        path.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), options=store_options(budget), access_type=AccessType.read_write())
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"replica-{id(self)}",  # never committed: offsets live in self.db
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "log_level": 3,
            **BACKGROUND_FETCH,  # replicated at most ~50 ms later, in fewer fetches
        })
        self.stats = ReplicaStats()
        self._assigned = False
        self._end_offsets: dict[tuple[str, int], int] = {}
        # Kept with the data: after a restart, a partition skipped before is copied from the
        # store when it turns out not to be owned any more, not read from a stale offset.
        stored = self.db.get(_SKIPPED_KEY)
        self.skipped: set[int] = set(orjson.loads(stored)) if stored is not None else set()

    @property
    def followed(self) -> list[int]:
        return [p for p in range(self.partitions) if p not in self.skipped]

    def _offset_key(self, topic: str, partition: int) -> bytes:
        return _OFFSET_PREFIX + topic.encode() + b"\x00%d" % partition

    def _assign(self) -> bool:
        metadata = self.consumer.list_topics(timeout=5)
        missing = [t for t in self.changelogs.values() if t not in metadata.topics or metadata.topics[t].error]
        if missing:
            log.info("shard replica waiting for changelogs %s", missing)
            return False  # Faust creates the changelogs when it starts; try again on the next poll
        assignment = []
        for topic in self.changelogs.values():
            for p in metadata.topics[topic].partitions:
                if p in self.skipped:
                    continue
                stored = self.db.get(self._offset_key(topic, p))
                start = int(stored) if stored is not None else -2  # -2: from the beginning
                assignment.append(TopicPartition(topic, p, start))
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
                # 0: nothing to replicate (empty, or already replicated up to the end before a restart)
                self._end_offsets[(topic, p)] = high if high > max(low, start) else 0
        self.consumer.assign(assignment)
        self._assigned = True
        log.info("shard replica following %s", [(tp.topic, tp.partition, tp.offset) for tp in assignment])
        return True

    def poll(self, max_records: int = 20_000) -> int:
        self.stats.polls += 1
        if not self._assigned and not self._assign():
            return 0
        applied = 0
        offsets: dict[tuple[str, int], int] = {}
        now_ms = time.time() * 1000
        stats, prefixes = self.stats, self._key_prefixes
        newest_ms = stats.newest_record_ms
        lags = stats.recent_lag_ms if stats.caught_up else None
        # One write per poll, offsets included: a put of its own cost ~7 µs (RocksDB's write
        # path and log per write), ~2.5 µs in a batch; and a crash keeps records and offsets together.
        writes = WriteBatch(raw_mode=True)
        while applied < max_records:
            batch = self.consumer.consume(min(5000, max_records - applied), timeout=0)
            if not batch:
                break
            for msg in batch:
                if msg.error():
                    continue
                topic = msg.topic()
                key = prefixes[topic] + msg.key()
                value = msg.value()
                if value is None:
                    writes.delete(key)
                else:
                    writes.put(key, value)
                offsets[(topic, msg.partition())] = msg.offset() + 1
                written_ms = msg.timestamp()[1]
                if written_ms > newest_ms:
                    newest_ms = written_ms
                if lags is not None:
                    lags.append(max(0.0, now_ms - written_ms))
            applied += len(batch)
        stats.newest_record_ms = newest_ms
        for (topic, partition), offset in offsets.items():
            writes.put(self._offset_key(topic, partition), b"%d" % offset)
        if applied:
            self.db.write(writes)
        self.stats.applied += applied
        if not self.stats.caught_up:
            positions = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.position(
                [TopicPartition(t, p) for t, p in self._end_offsets])}
            self.stats.caught_up = all(positions.get(tp, -1) >= end or end == 0 for tp, end in self._end_offsets.items())
        return applied

    def own(self, owned: Iterable[int], local: LocalPartition) -> None:
        """Follows every partition but ``owned``, the worker's partitions after a rebalance.
        One owned before and not now is made current from ``local(entity, partition)``
        first (see the class doc)."""
        owned = set(owned) & set(range(self.partitions))
        newly_owned, released = owned - self.skipped, self.skipped - owned
        unfollowed = [TopicPartition(topic, p) for topic in self.changelogs.values() for p in sorted(newly_owned)]
        for tp in unfollowed:
            self._end_offsets.pop((tp.topic, tp.partition), None)  # no longer part of catching up
        if unfollowed and self._assigned:
            self.consumer.incremental_unassign(unfollowed)
        starts = {(topic, p): self._copy(entity, topic, p, local)
                  for p in sorted(released) for entity, topic in self.changelogs.items()}
        self.skipped = owned
        self.db.put(_SKIPPED_KEY, orjson.dumps(sorted(owned)))  # after the copies: a crash copies again
        if starts:
            log.info("shard replica following partitions %s again, from %s", sorted(released),
                     {f"{topic}[{p}]": start for (topic, p), start in starts.items()})
            if self._assigned:
                self.consumer.incremental_assign([TopicPartition(t, p, start) for (t, p), start in starts.items()])

    def _copy(self, entity: str, topic: str, partition: int, local: LocalPartition) -> int:
        """Replaces the replica's rows of one entity's partition with the worker's store of it;
        returns the offset to follow the changelog from, stored with the rows."""
        prefix = self._key_prefixes[topic]
        rows, last_offset = local(entity, partition)
        start = -2 if last_offset is None else last_offset + 1  # -2: from the beginning
        writes = WriteBatch(raw_mode=True)
        # the partition's shards are the keys b"<p>|...": up to b"<p>}", as "}" follows "|"
        writes.delete_range(prefix + b"%d|" % partition, prefix + b"%d}" % partition)
        for n, (key, value) in enumerate(rows, 1):
            writes.put(prefix + key, value)
            if n % _COPY_CHUNK_ROWS == 0:
                self.db.write(writes)
                writes = WriteBatch(raw_mode=True)
        writes.put(self._offset_key(topic, partition), b"%d" % start)
        self.db.write(writes)
        return start

    def catch_up(self, timeout_s: float = 300.0) -> bool:
        """Blocks until every changelog partition is replicated up to its end as of now.

        Called before a worker scores its first event, so no event is ever scored
        against a replica that is still loading."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if self.stats.caught_up:
                return True
            time.sleep(0.01)
        log.error("shard replica did not catch up within %.0fs; scoring with what it has", timeout_s)
        return False

    def shards(self, entity: str, key: str, partitions: Iterable[int]) -> tuple[bytes, ...]:
        """The replicated shards of one entity in ``partitions`` (none if empty)."""
        return tuple(self._read(entity, key, list(partitions)).values())

    def shard_map(self, entity: str, key: str) -> dict[int, bytes]:
        """Partition -> replicated shard of one entity, in the partitions followed."""
        return self._read(entity, key, self.followed)

    def _read(self, entity: str, key: str, partitions: list[int]) -> dict[int, bytes]:
        if not partitions:
            return {}
        raws = self.db.get([entity.encode() + b"\x00" + shard_key(p, key) for p in partitions])  # one multi-get
        return {p: raw for p, raw in zip(partitions, raws) if raw is not None}

    def close(self) -> None:
        self.consumer.close()
        self.db.close()


@dataclass
class ExpirySweeper:
    """Deletes idle entities by event time, a slice of one partition's store at a time.

    Each partition's event-time watermark is the largest event time processed
    on it; an entity whose last event is older than its idle expiry relative to
    that watermark is deleted (a changelog tombstone, so the deletion survives
    restarts and moves with the partition).
    """

    every_events: int = 500
    slice_keys: int = 200
    watermarks: dict[int, int] = field(default_factory=dict)
    _seen: dict[int, int] = field(default_factory=dict)
    _cursors: dict[tuple[str, int], bytes | None] = field(default_factory=dict)
    deleted: int = 0

    def observe(self, partition: int, ts: int, events: int = 1) -> int:
        """Records ``events`` events of ``partition``, the latest at event time ``ts`` (a
        batch's are recorded at once); returns how many slices of the partition are due
        for a sweep (one every ``every_events`` events)."""
        if ts > self.watermarks.get(partition, -1):
            self.watermarks[partition] = ts
        before = self._seen.get(partition, 0)
        self._seen[partition] = before + events
        return (before + events) // self.every_events - before // self.every_events

    def cursor(self, table_name: str, partition: int) -> bytes | None:
        """Where this table's next slice in ``partition`` starts (None: at the store's first key)."""
        return self._cursors.get((table_name, partition))

    def advance(self, table_name: str, partition: int, last_key: bytes | None) -> None:
        """A slice of ``slice_keys`` ended at ``last_key`` (None: at the store's end): the next
        starts after it (at the store's first key again)."""
        self._cursors[(table_name, partition)] = None if last_key is None else last_key + b"\x00"
