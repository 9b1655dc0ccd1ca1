"""Table writes through ``KafkaWriter``: the same store put and the same raw
changelog record a Faust table write makes, so recovery, standbys and the shard
replica read them unchanged; deletes are tombstones; changelog offsets are
recorded only once delivered; output records land where Faust would put them."""

from __future__ import annotations

import asyncio
import os
import time

import faust
import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType
from faust.types import TP

from streams.kafka.io import KafkaWriter, PartitionReader, scores_retention_problem

pytestmark = pytest.mark.integration


def _table(settings, tmp_path) -> faust.Table:
    app = faust.App(settings.app_id, broker=f"kafka://{settings.bootstrap_servers}", store="rocksdb://",
                    datadir=str(tmp_path / "tables"), autodiscover=False)
    table = app.Table("user-state", default=None, key_type=bytes, value_type=bytes, partitions=2,
                      options={"driver": "rocksdict"})
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    for future in admin.create_topics([NewTopic(table.changelog_topic_name, 2, 1)]).values():
        future.result(30)
    return table


def _read(settings, topic: str, partition: int, start: int, end: int) -> list[tuple[int, bytes | None, bytes | None]]:
    """Records ``start`` to ``end`` (excluded) of a partition, as (offset, key, value)."""
    reader = PartitionReader(settings, topic, f"{settings.app_id}-check")
    try:
        return reader.read_range(partition, start, end)
    finally:
        reader.close()


def test_table_writes_land_in_store_and_changelog_partition_and_deletes_are_tombstones(settings, tmp_path):
    table = _table(settings, tmp_path)
    writer = KafkaWriter(settings)
    writer.put(table, 1, b"u1", b'{"l":1}')
    writer.put(table, 1, b"u2", b'{"l":2}')
    writer.put(table, 1, b"u1", None)
    writer.put(table, 0, b"u3", b'{"l":3}')
    store = table.data
    topic = table.changelog_topic_name
    assert store.persisted_offset(TP(topic, 1)) is None  # nothing recorded before delivery
    asyncio.run(asyncio.to_thread(writer.flush))
    writer.persist_offsets()

    assert store._db_for_partition(1).get(b"u1") is None
    assert store._db_for_partition(1).get(b"u2") == b'{"l":2}'
    assert store._db_for_partition(0).get(b"u3") == b'{"l":3}'
    log = _read(settings, topic, 1, 0, 3)
    assert log == [(0, b"u1", b'{"l":1}'), (1, b"u2", b'{"l":2}'), (2, b"u1", None)]
    assert store.persisted_offset(TP(topic, 1)) == 2 and store.persisted_offset(TP(topic, 0)) == 0
    assert writer.written == 4
    writer.close()


def test_several_writes_of_one_partition_land_in_store_and_changelog_in_order(settings, tmp_path):
    table = _table(settings, tmp_path)
    writer = KafkaWriter(settings)
    writer.put(table, 0, b"u0", b'{"l":0}')
    writer.put_many(table, 1, [(b"u1", b'{"l":1}'), (b"u2", b'{"l":2}'), (b"u1", b'{"l":3}')])
    asyncio.run(asyncio.to_thread(writer.flush))
    writer.persist_offsets()

    db = table.data._db_for_partition(1)
    assert (db.get(b"u1"), db.get(b"u2")) == (b'{"l":3}', b'{"l":2}')  # the last write of a key wins
    log = _read(settings, table.changelog_topic_name, 1, 0, 3)
    assert log == [(0, b"u1", b'{"l":1}'), (1, b"u2", b'{"l":2}'), (2, b"u1", b'{"l":3}')]
    assert table.data.persisted_offset(TP(table.changelog_topic_name, 1)) == 2
    # Faust's own write of that offset skipped RocksDB's log too: a crash loses the offset
    # with the records, and recovery replays them from the changelog.
    assert [wal.stat().st_size for wal in table.data.partition_path(1).glob("*.log")] == [0]
    assert writer.written == 4
    writer.close()


def test_keys_logged_as_another_value_keep_their_own_in_the_store(settings, tmp_path):
    """The label join's new rows: the store keeps the score, the changelog where it is."""
    table = _table(settings, tmp_path)
    writer = KafkaWriter(settings)
    writer.put_many(table, 0, [(b"e1", b"s{score 1}"), (b"e2", b"{pending}"), (b"e3", b"s{score 3}")],
                    logged_as={b"e1": b"r10", b"e3": b"r12", b"elsewhere": b"r99"})
    asyncio.run(asyncio.to_thread(writer.flush))
    db = table.data._db_for_partition(0)
    assert [db.get(k) for k in (b"e1", b"e2", b"e3", b"elsewhere")] == [b"s{score 1}", b"{pending}", b"s{score 3}", None]
    assert _read(settings, table.changelog_topic_name, 0, 0, 3) == [
        (0, b"e1", b"r10"), (1, b"e2", b"{pending}"), (2, b"e3", b"r12")]
    writer.close()


def test_a_full_producer_queue_mid_rows_loses_none_and_keeps_their_order(settings, tmp_path):
    """put_many produces the changelog records itself; one refused with BufferError (librdkafka's
    queue full) is sent again once the queue drains, in its place, and counted once."""
    table = _table(settings, tmp_path)
    writer = KafkaWriter(settings)

    class QueueFullOnce:
        def __init__(self, producer):
            self.producer, self.calls = producer, 0

        def produce(self, *args):
            self.calls += 1
            if self.calls == 2:
                raise BufferError("Local: Queue full")
            return self.producer.produce(*args)

        def __getattr__(self, name):
            return getattr(self.producer, name)

    writer.producer = QueueFullOnce(writer.producer)
    writer.put_many(table, 0, [(b"e1", b"s1"), (b"e2", b"s2"), (b"e3", b"s3")], logged_as={b"e2": b"r7"})
    assert writer.written == 3 and writer.producer.calls == 4
    asyncio.run(asyncio.to_thread(writer.flush))
    assert _read(settings, table.changelog_topic_name, 0, 0, 3) == [
        (0, b"e1", b"s1"), (1, b"e2", b"r7"), (2, b"e3", b"s3")]
    writer.close()


def test_writes_larger_than_one_store_batch_land_whole_and_in_order(settings, tmp_path, monkeypatch):
    """put_many writes the store in batches of about WRITE_BATCH_BYTES: every row lands,
    an empty value too, and a key written in two batches keeps its last value."""
    import streams.kafka.io as io

    monkeypatch.setattr(io, "WRITE_BATCH_BYTES", 16)
    table = _table(settings, tmp_path)
    writer = KafkaWriter(settings)
    rows = [(b"k%d" % i, b"v" * (i % 7)) for i in range(40)] + [(b"k3", b"last")]
    writer.put_many(table, 0, rows)
    asyncio.run(asyncio.to_thread(writer.flush))
    db = table.data._db_for_partition(0)
    assert {key: db.get(key) for key, _ in rows} == dict(rows)
    assert db.get(b"k0") == b"" and db.get(b"k3") == b"last"
    log = _read(settings, table.changelog_topic_name, 0, 0, len(rows))
    assert [(key, value) for _, key, value in log] == rows
    writer.close()


def test_a_flush_after_close_still_delivers_and_does_not_raise(settings, tmp_path):
    """The worker closes its writer before Faust's own shutdown flushes it once more (the
    writer's flush stands in for Faust's producer's): a table write in between must be
    delivered, and that flush must not fail, or Faust's shutdown stops halfway and the
    process hangs on a thread it never stopped."""
    table = _table(settings, tmp_path)
    writer = KafkaWriter(settings)
    writer.put(table, 0, b"u1", b'{"l":1}')
    writer.flush()
    writer.persist_offsets()
    writer.close()
    writer.put(table, 0, b"u2", b'{"l":2}')  # e.g. the label join's timer, between the two
    writer.flush()
    assert writer._offsets_reader is None  # nothing opened again that no one would close
    assert [key for _, key, _ in _read(settings, table.changelog_topic_name, 0, 0, 2)] == [b"u1", b"u2"]


def test_keyed_outputs_land_on_the_partition_faust_would_choose(settings):
    """murmur2, as aiokafka and Java: a score must sit on its event id's partition,
    where the label join reads the labels of that event id."""
    from aiokafka.partitioner import DefaultPartitioner

    writer = KafkaWriter(settings)
    keys = [f"e{i}".encode() for i in range(40)]
    for key in keys:
        writer.send(settings.scores_topic, key, b"{}")
    writer.flush()
    writer.close()
    landed = {}
    for partition in range(settings.partitions):
        reader = PartitionReader(settings, settings.scores_topic, f"{settings.app_id}-check")
        try:
            landed.update({key: partition for _, key, _ in reader.read_range(partition, 0, len(keys))})
        finally:
            reader.close()
    partitions = list(range(settings.partitions))
    assert landed == {key: DefaultPartitioner()(key, partitions, partitions) for key in keys}


def test_flush_waits_for_earlier_writes_only_and_reports_failures(settings):
    """A commit's flush returns while the agents keep writing (it must not wait for the
    writes to stop), and a write the broker refuses stops the commit instead of vanishing."""
    import threading
    import time

    writer = KafkaWriter(settings)
    for i in range(100):
        writer.send(settings.alerts_topic, b"u%d" % i, b"{}")
    stop = threading.Event()

    def keep_writing() -> None:
        # Bursts up to ~50,000 records/s, several times what a worker writes (about ten records
        # per event at ~1,300 events/s); an unpaced loop can outrun lz4 compression on 2 cores.
        while not stop.is_set():
            for _ in range(50):
                writer.send(settings.alerts_topic, b"later", b"{}")
            time.sleep(0.001)

    writer_thread = threading.Thread(target=keep_writing)
    writer_thread.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        writer.flush()  # returns although writes never stop
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        writer_thread.join()
    writer.flush()

    small = f"small-{settings.app_id}"  # the broker refuses records over 1 KB here
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    admin.create_topics([NewTopic(small, 1, 1, config={"max.message.bytes": "1024"})])[small].result(30)
    writer.send(small, b"k", os.urandom(10_000))  # random: no compression brings it under 1 KB
    with pytest.raises(RuntimeError, match="not delivered"):
        writer.flush()
    writer.close()


def test_a_risk_scores_topic_that_keeps_scores_shorter_than_the_label_ttl_is_reported(settings):
    """The label join's recovered rows read their scores back from the risk-scores topic."""
    assert scores_retention_problem(settings) is None  # as `topics create` makes it
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})

    def set_retention(ms: int, bytes_: int = -1) -> None:
        resource = ConfigResource(ResourceType.TOPIC, settings.scores_topic, incremental_configs=[
            ConfigEntry(name, str(value), incremental_operation=AlterConfigOpType.SET)
            for name, value in (("retention.ms", ms), ("retention.bytes", bytes_))])
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(30)
        # the broker applies a topic's new config a moment after the controller took it
        described = ConfigResource(ResourceType.TOPIC, settings.scores_topic)
        deadline = time.monotonic() + 30
        while True:
            configs = admin.describe_configs([described])[described].result(30)
            if (configs["retention.ms"].value, configs["retention.bytes"].value) == (str(ms), str(bytes_)):
                return
            assert time.monotonic() < deadline, configs
            time.sleep(0.1)

    set_retention(7 * 86_400_000)
    problem = scores_retention_problem(settings)
    assert problem and f"retention.ms to at least {settings.label_ttl_s * 1000}" in problem
    set_retention(-1, 10**9)  # kept forever, but only a GB of it
    assert "retention.bytes to -1" in scores_retention_problem(settings)
    set_retention(-1)
    assert scores_retention_problem(settings) is None
    assert scores_retention_problem(settings.replace(scores_topic="no-such-topic")) is None
