"""Every worker learns the same thing: the training-example feed, model
checkpoints and label-derived reputation.

The label join (``streams/app.py``) turns each label joined to its scoring-time inputs into a
training example on the ``training-examples`` topic, which has ONE partition:
a total order. Each worker reads all of it (no consumer group) and applies
every example in that order to its ``ModelSet`` and its local reputation
store, so all workers hold identical models and reputations. Control records
(promote/rollback) travel on the same topic, so they happen at the same point
in every worker's history.

The models are checkpointed with the offset of the last example applied, to a
local file and to a compacted topic; a worker that restarts (or starts on an
empty disk) loads the newest checkpoint and replays only the examples after
it. Reputation is stored with its own offset in a local RocksDB and rebuilt
from the feed (retention 35 days, above the 28-day window) if the disk is new.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from rocksdict import AccessType, Rdict, WriteBufferManager

from detectors.lifecycle import CheckpointError, ModelSet
from detectors.pipeline import Detector
from detectors.reputation import add_label_stored
from streams.kafka.io import BACKGROUND_FETCH, CHECKPOINT_MAX_BYTES
from streams.state import KeptPerEntity, store_options

log = logging.getLogger("abuse_detector.learning")

_OFFSET_KEY = b"\x01offset"
# Reputations read per entity per event, most of them of entities that never had a label: the
# answers (absent ones too) are kept, and the whole set is dropped when it reaches this size.
REPUTATIONS_KEPT = 100_000
_UNREAD = object()


def reputation_key(entity: str, key: str) -> bytes:
    return entity.encode() + b"\x00" + key.encode()


class LearningFeed:
    def __init__(self, detector: Detector, bootstrap: str, examples_topic: str, checkpoint_topic: str,
                 checkpoint_key: str, data_dir: Path, checkpoint_interval_s: float,
                 budget: WriteBufferManager | None = None):
        self.detector = detector
        self.examples_topic = examples_topic
        self.checkpoint_topic = checkpoint_topic
        self.checkpoint_key = checkpoint_key.encode()
        self.bootstrap = bootstrap
        data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_file = data_dir / "models.ckpt"
        self.reputation = Rdict(str(data_dir / "reputation"), options=store_options(budget),
                                access_type=AccessType.read_write())
        self._reputations_kept = KeptPerEntity(REPUTATIONS_KEPT)  # entity -> key -> stored bytes or None
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3,
                                  "compression.type": "zstd", "message.max.bytes": CHECKPOINT_MAX_BYTES})
        self.consumer: Consumer | None = None
        # Each checkpoint pickles every model on the scoring thread, 82 ms for a text model whose
        # n-grams fill 196,000 buckets (6.2 MB): by time, not every 500 examples as until round 27,
        # which at 300 labels/s was every 1.7 s (docs/performance.md, round 27).
        self.checkpoint_interval_s = checkpoint_interval_s
        self.applied_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.restored_from: str = "nothing (new models)"
        self.restored = False

    # -- start-up ------------------------------------------------------------
    def restore(self) -> None:
        """Loads the newest checkpoint (local file or topic) into the detector."""
        candidates: list[tuple[str, ModelSet]] = []
        if self.checkpoint_file.exists():
            try:
                candidates.append((str(self.checkpoint_file), ModelSet.from_bytes(self.checkpoint_file.read_bytes())))
            except CheckpointError as exc:
                log.warning("ignoring local checkpoint: %s", exc)
        from_topic = latest_checkpoint(self.bootstrap, self.checkpoint_topic, self.checkpoint_key)
        if from_topic is not None:
            try:
                candidates.append((f"topic {self.checkpoint_topic}", ModelSet.from_bytes(from_topic)))
            except CheckpointError as exc:
                log.warning("ignoring checkpoint in %s: %s", self.checkpoint_topic, exc)
        if candidates:
            source, models = max(candidates, key=lambda c: c[1].offset)
            self.detector.models = models
            self.restored_from = f"{source} at example offset {models.offset}"
            self.restored = True
        log.info("models restored from %s", self.restored_from)

    def _start_consumer(self) -> None:
        models_offset = self.detector.models.offset
        stored = self.reputation.get(_OFFSET_KEY)
        reputation_offset = int(stored) if stored is not None else -1
        start = min(models_offset, reputation_offset) + 1
        self.consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "training-feed",
                                  "enable.auto.commit": False, "log_level": 3, **BACKGROUND_FETCH})
        self.consumer.assign([TopicPartition(self.examples_topic, 0, start)])
        self.reputation_offset = reputation_offset

    # -- the feed --------------------------------------------------------------
    def poll(self, max_records: int = 5000) -> int:
        if self.consumer is None:
            self._start_consumer()
        assert self.consumer is not None
        applied = 0
        for msg in self.consumer.consume(max_records, timeout=0):
            if msg.error():
                continue
            self.apply(orjson.loads(msg.value()), msg.offset())
            applied += 1
        if applied:
            self.reputation.put(_OFFSET_KEY, b"%d" % self.reputation_offset)
        self.applied_since_checkpoint += applied
        if self.applied_since_checkpoint and time.monotonic() - self.last_checkpoint >= self.checkpoint_interval_s:
            self.checkpoint()
        return applied

    def catch_up(self, timeout_s: float = 300.0) -> None:
        """Applies every example already on the feed before the worker scores anything."""
        if self.consumer is None:
            self._start_consumer()
        assert self.consumer is not None
        metadata = self.consumer.list_topics(self.examples_topic, timeout=10).topics.get(self.examples_topic)
        if metadata is None or metadata.error:
            return
        _, end = self.consumer.get_watermark_offsets(TopicPartition(self.examples_topic, 0), timeout=10)
        deadline = time.monotonic() + timeout_s
        while min(self.detector.models.offset, self.reputation_offset) < end - 1:
            if time.monotonic() > deadline:
                log.error("training feed did not catch up within %.0fs", timeout_s)
                return
            if not self.poll():
                time.sleep(0.01)

    def apply(self, record: dict[str, Any], offset: int) -> None:
        models = self.detector.models
        if record.get("kind") == "control":
            if offset > models.offset:
                if record["action"] in ("promote", "rollback"):
                    models.promote()
                    log.warning("%s: champion is now %s", record["action"], models.champion.name)
                models.offset = offset
            return
        if offset > models.offset:
            deltas = self.detector.learn(record, offset)
        else:  # the models already know it; only the reputation store is behind
            deltas = self.detector.reputation_deltas(record)
        if offset > self.reputation_offset:
            for d in deltas:
                key = reputation_key(d.entity, d.key)
                self.reputation.put(key, add_label_stored(self.reputation.get(key), d.label_ts, d.delta))
                self._reputations_kept.forget(d.entity, d.key)
            self.reputation_offset = offset

    def reputation_of(self, entity: str, key: str) -> bytes | None:
        """An entity's stored reputation, None if it never had a label. Only ``apply``
        writes the store (in this process), and it forgets what it changes."""
        stored = self._reputations_kept.get(entity, key, _UNREAD)
        if stored is _UNREAD:
            stored = self.reputation.get(reputation_key(entity, key))
            self._reputations_kept.put(entity, key, stored)
        return stored

    def checkpoint(self) -> None:
        raw = self.detector.models.to_bytes()
        tmp = self.checkpoint_file.with_suffix(".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, self.checkpoint_file)
        self.producer.produce(self.checkpoint_topic, key=self.checkpoint_key, value=raw)
        self.producer.poll(0)
        self.applied_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()

    def close(self) -> None:
        if self.applied_since_checkpoint:
            self.checkpoint()
        self.producer.flush(10)
        if self.consumer is not None:
            self.consumer.close()
        self.reputation.close()


def control_record(action: str, actor: str) -> bytes:
    return orjson.dumps({"kind": "control", "action": action, "actor": actor, "ts": int(time.time() * 1000)})


def latest_checkpoint(bootstrap: str, topic: str, key: bytes) -> bytes | None:
    """The newest model checkpoint stored under ``key`` in the compacted checkpoint topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "checkpoint-reader",
                         "enable.auto.commit": False, "log_level": 3})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error:
            return None
        latest = None
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            remaining = high - low
            while remaining > 0:
                batch = consumer.consume(500, timeout=2)
                if not batch:
                    break
                for msg in batch:
                    remaining -= 1
                    if not msg.error() and msg.key() == key and msg.value() is not None:
                        latest = msg.value()
        return latest
    finally:
        consumer.close()
