"""Kafka plumbing outside the Faust app: topic admin, producers, reading a topic."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Iterator, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from rocksdict import WriteBatch, WriteOptions

from streams.config import Settings

log = logging.getLogger("abuse_detector.kafka")

CHECKPOINT_MAX_BYTES = 64 * 1024 * 1024


def io_topics(settings: Settings) -> list[str]:
    return [settings.events_topic, settings.labels_topic, settings.scores_topic,
            settings.alerts_topic, settings.dead_letter_topic, settings.examples_topic, settings.checkpoint_topic]


def create_topics(settings: Settings, recreate: bool = False, timeout: float = 30.0) -> list[str]:
    """Creates the input/output topics (all co-partitioned); returns the ones created."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    names = io_topics(settings)
    if recreate:
        delete_topics(settings, names, timeout)
    existing = admin.list_topics(timeout=timeout).topics
    wanted = [n for n in names if n not in existing]
    for name in names:
        expected = 1 if name in (settings.examples_topic, settings.checkpoint_topic) else settings.partitions
        if name in existing and len(existing[name].partitions) != expected:
            raise SystemExit(
                f"topic {name!r} has {len(existing[name].partitions)} partitions, it needs {expected}; "
                "keyed topics must be co-partitioned: use `topics create --recreate` or set ABUSE_PARTITIONS"
            )
    new_topics = []
    for name in wanted:
        if name == settings.examples_topic:
            # One partition: every worker applies training examples in the same order.
            new_topics.append(NewTopic(name, 1, 1, config={"retention.ms": str(35 * 86_400_000)}))
        elif name == settings.checkpoint_topic:
            new_topics.append(NewTopic(name, 1, 1, config={"cleanup.policy": "compact",
                                                           "max.message.bytes": str(CHECKPOINT_MAX_BYTES)}))
        elif name == settings.scores_topic:
            # The label join's rows recovered from its changelog refer to their scores here
            # (streams/label_join.py): the topic keeps them as long as the join waits for labels.
            new_topics.append(NewTopic(name, settings.partitions, 1,
                                       config={"retention.ms": str(settings.label_ttl_ms)}))
        else:
            new_topics.append(NewTopic(name, settings.partitions, 1))
    futures = admin.create_topics(new_topics, operation_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result()
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    _wait_for_topics(admin, names, present=True, timeout=timeout)
    return wanted


def scores_retention_problem(settings: Settings, timeout: float = 10.0) -> str | None:
    """What is wrong, if anything, with how long the risk-scores topic keeps its records: the
    label join's rows recovered from their changelog refer to their scores there until their
    labels come, up to ``label_ttl_s`` (streams/label_join.py). None if the topic keeps them
    that long, or does not exist yet."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    resource = ConfigResource(ResourceType.TOPIC, settings.scores_topic)
    try:
        configs = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
    except KafkaException as exc:
        if "UNKNOWN_TOPIC" in str(exc):
            return None
        raise
    retention_ms = int(configs["retention.ms"].value)
    needed_ms = settings.label_ttl_ms
    if 0 <= retention_ms < needed_ms or int(configs["retention.bytes"].value) >= 0:
        return (f"topic {settings.scores_topic!r} keeps its records {retention_ms} ms "
                f"(retention.bytes {configs['retention.bytes'].value}), but a label may come up to "
                f"ABUSE_LABEL_TTL_S={settings.label_ttl_s} s after its score, and a worker that recovers "
                f"the label join from its changelog reads the scores back from this topic: set its "
                f"retention.ms to at least {needed_ms} and retention.bytes to -1 (kafka-configs.sh --alter "
                f"--entity-type topics --entity-name {settings.scores_topic} --add-config "
                f"retention.ms={needed_ms}), or their labels will train nothing after a recovery")
    return None


def delete_topics(settings: Settings, names: list[str], timeout: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    existing = [n for n in names if n in admin.list_topics(timeout=timeout).topics]
    if not existing:
        return
    for future in admin.delete_topics(existing, operation_timeout=timeout).values():
        try:
            future.result()
        except KafkaException as exc:
            if "UNKNOWN_TOPIC" not in str(exc):
                raise
    _wait_for_topics(admin, existing, present=False, timeout=timeout)


def _wait_for_topics(admin: AdminClient, names: list[str], present: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=timeout).topics
        if all((n in topics and not topics[n].error) == present for n in names):
            return
        time.sleep(0.2)
    raise TimeoutError(f"topics {names} did not become {'available' if present else 'deleted'} in {timeout}s")


# For the worker's consumers whose records nobody waits for by the millisecond (the label
# join's risk scores, the shard replica's changelogs, the training examples), each polled
# every 50 ms or so: the broker may hold a fetch that long to fill it. Answered as soon as
# one byte was there (librdkafka's default), each fetched a few records at a time, back to
# back: the broker then took 4% more CPU per event at 5,000 events/s offered and 16% more
# at 1,500 (docs/performance.md, round 19).
# Once a consumer's local queue passes queued.max.messages.kbytes (16 MB here: ~10,000 risk scores),
# librdkafka stops fetching its partitions for fetch.queue.backoff.ms, 1 s by default: the label
# join, which empties it in a tenth of that, then read nothing for 0.8-0.9 s at a time (round 42).
BACKGROUND_FETCH = {"fetch.min.bytes": 262_144, "fetch.wait.max.ms": 50, "fetch.queue.backoff.ms": 10}


def make_producer(settings: Settings, **extra: object) -> Producer:
    # murmur2 is what Java clients, aiokafka and therefore Faust use: keyed
    # records must land on the partition whose worker holds that key's state.
    config = {
        "bootstrap.servers": settings.bootstrap_servers,
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        "enable.idempotence": True,
        "compression.type": "lz4",
    }
    config.update(extra)
    return Producer(config)


def produce_waiting(producer: Producer, topic: str, key: bytes | None, value: bytes) -> None:
    """Produces one record, waiting while the producer's local queue is full."""
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            break
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)


def read_topic(settings: Settings, topic: str, timeout: float = 10.0) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Every record currently in ``topic`` (up to the end offsets seen at the start)."""
    consumer = Consumer({
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": f"reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error:
            return
        remaining = {}
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                remaining[p] = high
        if not remaining:
            return
        consumer.assign([TopicPartition(topic, p, 0) for p in remaining])
        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error():
                    continue
                deadline = time.monotonic() + timeout
                yield msg.key(), msg.value()
                if msg.offset() + 1 >= remaining.get(msg.partition(), 0):
                    remaining.pop(msg.partition(), None)
    finally:
        consumer.close()


def topic_size(settings: Settings, topic: str, timeout: float = 10.0) -> int:
    """Records in ``topic`` (sum of end minus start offsets)."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"size-{uuid.uuid4().hex}"})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error:
            return 0
        total = 0
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            total += high - low
        return total
    finally:
        consumer.close()


SINGLE_RECORD_FETCH_BYTES = 65_536


class PartitionReader:
    """Offsets and record ranges of one topic's partitions, read straight from the broker.

    Never joins the group: ``group_id`` is only used to read the offsets the group has
    committed. One lock serialises calls, so the worker's agent and its timer can share it.
    """

    def __init__(self, settings: Settings, topic: str, group_id: str, timeout: float = 10.0,
                 single_records: bool = False) -> None:
        """``single_records``: for reads of one record at a time, fetches of 64 KB answered at
        once. The broker still returns the whole producer batch the record is in; librdkafka's
        defaults (1 MB, a fetch wait) took 32 ms a record, these 0.46 (docs/performance.md, round 38)."""
        self.topic, self.timeout = topic, timeout
        fetch = {"fetch.max.bytes": SINGLE_RECORD_FETCH_BYTES, "max.partition.fetch.bytes": SINGLE_RECORD_FETCH_BYTES,
                 "message.max.bytes": SINGLE_RECORD_FETCH_BYTES,  # librdkafka: at most fetch.max.bytes
                 "fetch.wait.max.ms": 0} if single_records else {}
        self._consumer = Consumer({
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_uncommitted",  # what the worker's own consumer (aiokafka) sees
            "fetch.max.bytes": settings.max_event_bytes * 64,
            **fetch,
        })
        self._lock = threading.Lock()

    def start_offsets(self, partitions: list[int]) -> dict[int, int]:
        """Where the group resumes each partition: its committed offset, else the log start."""
        with self._lock:
            committed = self._consumer.committed([TopicPartition(self.topic, p) for p in partitions],
                                                 timeout=self.timeout)
            starts = {}
            for tp in committed:
                if tp.offset >= 0:
                    starts[tp.partition] = tp.offset
                else:
                    low, _ = self._consumer.get_watermark_offsets(tp, timeout=self.timeout, cached=False)
                    starts[tp.partition] = low
            return starts

    def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        with self._lock:
            return {p: self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=self.timeout,
                                                            cached=False)[1]
                    for p in partitions}

    def read_range(self, partition: int, start: int, end: int) -> list[tuple[int, bytes | None, bytes | None]]:
        """(offset, key, value) of the records in [start, end); offsets with no record
        (transaction markers, compacted away) are simply absent."""
        with self._lock:
            self._consumer.assign([TopicPartition(self.topic, partition, start)])
            try:
                records = []
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline:
                    msg = self._consumer.poll(0.5)
                    if msg is None:
                        continue
                    if msg.error():
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            return records
                        raise KafkaException(msg.error())
                    if msg.offset() >= end:
                        return records
                    records.append((msg.offset(), msg.key(), msg.value()))
                    if msg.offset() + 1 >= end:
                        return records
                raise TimeoutError(f"reading {self.topic}[{partition}] offsets {start}..{end - 1} "
                                   f"took over {self.timeout}s; is the broker reachable?")
            finally:
                self._consumer.unassign()

    def close(self) -> None:
        with self._lock:
            self._consumer.close()


# A write batch grows by copying, and a TTL store copies it again to stamp each value: one
# batch of a read's few hundred 1.7 KB label-join rows (~0.4 MB) cost 2.6-3.3 µs a row, in
# batches of ~64 KB that stay in the CPU's cache 2.1 (docs/performance.md, round 24).
WRITE_BATCH_BYTES = 65_536
_WITHOUT_WAL = WriteOptions()
_WITHOUT_WAL.disable_wal = True


class KafkaWriter:
    """Everything the worker writes, without Faust's per-message producer path.

    In a profile of a loaded worker, Faust's producer buffer and aiokafka's send were the
    largest cost after the detector; the bytes were not (shrinking the risk score to a few
    bytes changed nothing). Measured on the same preload: entity-table writes through
    this writer took one worker from ~790 to ~1,100 events/s.

    * ``put`` is a Faust table write done the same way: the put into the partition's
      RocksDB that Faust's store uses, and the same raw key/value record to the same
      changelog partition. Everything Faust builds on the changelog is unchanged:
      recovery, standby replicas, the shard replica. ``None`` deletes (a tombstone).
      The changelog is the table's log, so the store skips RocksDB's own write-ahead
      log, as Kafka Streams' stores do: it had cost ~11 µs per 4 KB label-join row
      against ~2 µs without. A crash loses the newest writes still in memory together
      with the changelog offset recorded after them (RocksDB keeps a prefix of its
      writes), and Faust's recovery replays them from the changelog.
    * ``send`` produces an output record (murmur2, like Faust, for keyed records).

    At-least-once holds because ``flush`` runs before every offset commit (the worker
    wires it into Faust's producer flush): an input offset is committed only after
    every record written for the events before it is in the log. All writes of a
    worker go through this one producer, so each partition keeps their order.
    """

    def __init__(self, settings: Settings, flush_timeout_s: float = 60.0):
        self.flush_timeout_s = flush_timeout_s
        # lz4 like the project's other producers: librdkafka compresses on its own thread, and
        # the risk scores and label-join rows shrink ~4x (lz4 in Faust's Python producer had
        # measured 10-15% slower, docs/performance.md round 2). Delivery reports for failures
        # only: a report per record delivered cost ~1.6 µs of the worker's CPU each, four per
        # event (round 13); the changelogs' delivered offsets come from the broker at each flush.
        self.producer = make_producer(settings, **{"delivery.report.only.error": True,
                                                   "on_delivery": self._on_failure})
        self._bootstrap = settings.bootstrap_servers
        self._offsets_reader: Consumer | None = None
        self._closed = False
        self.written = 0
        self._tables: dict[str, Any] = {}  # changelog topic -> Faust table
        self._changelogs_written: set[tuple[str, int]] = set()  # since the last flush
        self._errors: list[str] = []
        self._delivered: dict[tuple[str, int], int] = {}  # changelog partition -> an offset delivered
        self._lock = threading.Lock()  # failures are reported by flush (a thread) and poll (the loop)

    def _on_failure(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            with self._lock:
                self._errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    @staticmethod
    def _store(table: Any, partition: int) -> tuple[str, Any]:
        """A table's changelog topic and its partition's RocksDB, set to skip RocksDB's log for
        every write, Faust's own too: its changelog offset written with the log would survive a
        crash that lost the records it covers, and recovery would skip them."""
        db = table.data._db_for_partition(partition)
        # Every time (~0.1 µs): a reference kept to remember it would keep a revoked
        # partition's store open, which Faust closes by dropping its own.
        db.set_write_options(_WITHOUT_WAL)
        return table.changelog_topic_name, db

    def put(self, table: Any, partition: int, key: bytes, value: bytes | None) -> None:
        """Sets (or with ``value=None`` deletes) ``key`` in partition ``partition`` of a Faust table."""
        topic, db = self._store(table, partition)
        if value is None:
            db.delete(key)
        else:
            db.put(key, value)
        self._tables[topic] = table
        self._changelogs_written.add((topic, partition))
        self.send(topic, key, value, partition)

    def put_many(self, table: Any, partition: int, items: list[tuple[bytes, bytes]],
                 logged_as: Mapping[bytes, bytes] | None = None) -> None:
        """``put`` of several keys of one partition of a table: writes of the store in batches
        of about WRITE_BATCH_BYTES, then their changelog records in order. ``logged_as`` gives
        the changelog value of the keys whose changelog record is not their stored value (the
        label join's references, see streams/label_join.py)."""
        topic, db = self._store(table, partition)
        writes, size = WriteBatch(raw_mode=True), -1  # -1: nothing in the batch
        for key, value in items:
            writes.put(key, value)
            size += len(value) + 1
            if size >= WRITE_BATCH_BYTES:
                db.write(writes)
                writes, size = WriteBatch(raw_mode=True), -1
        if size >= 0:
            db.write(writes)
        self._tables[topic] = table
        self._changelogs_written.add((topic, partition))
        logged = logged_as or {}
        self.send_many(topic, [(key, logged.get(key, value)) for key, value in items], partition)

    def send_many(self, topic: str, records: list[tuple[bytes | None, bytes | None]],
                  partition: int | None = None) -> None:
        """``send`` of each (key, value) of ``records``, in order: one call for a batch's risk
        scores or a read's label-join rows, where a ``send`` each cost ~0.3 µs more an event."""
        produce, waited = self.producer.produce, 0
        for key, value in records:
            try:
                if partition is None:
                    produce(topic, value, key)
                else:
                    produce(topic, value, key, partition)
            except BufferError:  # librdkafka's queue is full: ``send`` waits for it to drain (and counts)
                self.send(topic, key, value, partition)
                waited += 1
        self.written += len(records) - waited

    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        while True:
            try:
                if partition is None:
                    self.producer.produce(topic, value, key)
                else:
                    self.producer.produce(topic, value, key, partition)
                break
            except BufferError:  # librdkafka's queue is full: let it drain
                self.producer.poll(0.05)
        self.written += 1

    def poll(self) -> None:
        self.producer.poll(0)

    def flush(self) -> None:
        """Waits until every record written is in the log; raises if one can't be.
        Blocks: the worker runs it in a thread."""
        # Taken before flushing: each of these partitions' records written so far is then in
        # the log, and in the store (``put`` writes the store first), up to the log's end.
        written, self._changelogs_written = self._changelogs_written, set()
        remaining = self.producer.flush(self.flush_timeout_s)
        with self._lock:
            errors, self._errors = self._errors[:5], []
        if errors or remaining:
            self._changelogs_written |= written
            raise RuntimeError(
                f"{remaining} records not delivered within {self.flush_timeout_s:.0f}s"
                f"{'; errors: ' + '; '.join(errors) if errors else ''}: the input offsets are not committed, "
                "so their events will be processed again; check the broker")
        self._read_delivered(written)

    def _read_delivered(self, written: set[tuple[str, int]]) -> None:
        """The changelogs' newest offsets, for ``persist_offsets``. Only this worker writes its
        partitions of its tables' changelogs, so a log's last record is one of its own."""
        if not written or self._closed:  # closed: recorded by the flush before closing, or recovered
            return
        if self._offsets_reader is None:
            self._offsets_reader = Consumer({"bootstrap.servers": self._bootstrap, "group.id": "unused",
                                             "enable.auto.commit": False, "log_level": 3})
        delivered = {}
        try:
            for topic, partition in written:
                _, end = self._offsets_reader.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10, cached=False)
                if end > 0:
                    delivered[(topic, partition)] = end - 1
        except KafkaException as exc:  # the records are delivered: only recovery's start point waits
            log.warning("reading the changelogs' offsets failed (%s); recorded at the next flush", exc)
            self._changelogs_written |= written
            return
        with self._lock:
            self._delivered.update(delivered)

    def persist_offsets(self) -> None:
        """Records the delivered changelog offsets in the tables' stores, as Faust does after
        its own sends, so a restart recovers only what came after them. On the loop's thread."""
        from faust.types import TP

        with self._lock:
            delivered, self._delivered = self._delivered, {}
        for (topic, partition), offset in delivered.items():
            store = self._tables[topic].data
            if partition in store._dbs:  # not for a partition revoked (and closed) meanwhile
                store.set_persisted_offset(TP(topic, partition), offset)

    def close(self) -> None:
        self.producer.flush(self.flush_timeout_s)
        self._closed = True
        if self._offsets_reader is not None:
            self._offsets_reader.close()
            self._offsets_reader = None
