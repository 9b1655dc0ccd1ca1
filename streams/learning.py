"""Every worker learns the same thing: the training-example feed, model
checkpoints and label-derived reputation.

The label join (``streams/app.py``) turns each label joined to its scoring-time inputs into a
training example on the ``training-examples`` topic, which has ONE partition:
a total order. Each worker's learner process (``streams/learner.py``) reads all of it (no
consumer group) and applies every example in that order (``ModelTrainer``) to

* the models, which it hands to the scoring thread, so all workers hold the same models.
  Control records (promote/rollback) travel on the same topic, so they happen at the same
  point in every worker's history.
* the worker's reputation store (``Reputations``), which the learner alone writes and
  the scoring thread reads for every event, as a RocksDB secondary instance of it
  (``ReputationReader``), brought up to date whenever the learner says what changed.

The models are checkpointed with the offset of the last example applied, to a
local file and to a compacted topic; a learner that restarts (or starts on an
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
from rocksdict import AccessType, Rdict, WriteBatch, WriteBufferManager

from detectors.lifecycle import CheckpointError, ModelSet
from detectors.pipeline import Detector
from detectors.reputation import add_label_stored
from detectors.worker_state import KeptPerEntity
from streams.kafka.io import BACKGROUND_FETCH, CHECKPOINT_MAX_BYTES
from streams.state import store_options

log = logging.getLogger("abuse_detector.learning")

_OFFSET_KEY = b"\x01offset"
CHECKPOINT_FILE = "models.ckpt"
REPUTATION_STORE = "reputation"  # under the learning data dir
_REPUTATION_READER = "reputation-reader"  # the secondary instance's own files
# Reputations read per entity per event, most of them of entities that never had a label: the
# answers (absent ones too) are kept, and the whole set is dropped when it reaches this size.
REPUTATIONS_KEPT = 100_000
_UNREAD = object()


def reputation_key(entity: str, key: str) -> bytes:
    return entity.encode() + b"\x00" + key.encode()


class ModelsUnavailable(RuntimeError):
    """The models a learner was told to start from cannot be read."""


def restore_models(bootstrap: str, checkpoint_topic: str, checkpoint_key: str, data_dir: Path, warm_start: str,
                   min_labels_per_class: int) -> tuple[ModelSet, str]:
    """The newest checkpoint (local file or topic), else the warm start, else new models; and
    where they came from. Raises ModelsUnavailable for a warm start that cannot be read."""
    candidates: list[tuple[str, ModelSet]] = []
    checkpoint_file = data_dir / CHECKPOINT_FILE
    if checkpoint_file.exists():
        try:
            candidates.append((str(checkpoint_file), ModelSet.from_bytes(checkpoint_file.read_bytes())))
        except CheckpointError as exc:
            log.warning("ignoring local checkpoint: %s", exc)
    from_topic = latest_checkpoint(bootstrap, checkpoint_topic, checkpoint_key.encode())
    if from_topic is not None:
        try:
            candidates.append((f"topic {checkpoint_topic}", ModelSet.from_bytes(from_topic)))
        except CheckpointError as exc:
            log.warning("ignoring checkpoint in %s: %s", checkpoint_topic, exc)
    if candidates:
        source, models = max(candidates, key=lambda c: c[1].offset)
        return models, f"{source} at example offset {models.offset}"
    if warm_start:  # a checkpoint, once there is one, always wins: it already holds the warm start
        try:
            return ModelSet.from_bytes(Path(warm_start).read_bytes()), f"warm start {warm_start}"
        except (OSError, CheckpointError) as exc:
            raise ModelsUnavailable(f"ABUSE_WARM_START={warm_start}: {exc}; "
                                    "write one with `abuse-detector bootstrap` or unset it") from None
    return ModelSet.new(min_labels_per_class), "nothing (new models)"


def _examples_consumer(bootstrap: str, examples_topic: str, start: int) -> Consumer:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "training-feed",
                         "enable.auto.commit": False, "log_level": 3, **BACKGROUND_FETCH})
    consumer.assign([TopicPartition(examples_topic, 0, start)])
    return consumer


def _feed_end(consumer: Consumer, examples_topic: str) -> int:
    """The offset after the feed's last record now; 0 if the topic does not exist yet."""
    metadata = consumer.list_topics(examples_topic, timeout=10).topics.get(examples_topic)
    if metadata is None or metadata.error:
        return 0
    return consumer.get_watermark_offsets(TopicPartition(examples_topic, 0), timeout=10)[1]


class ModelTrainer:
    """The learner's feed reader: every example, in order, taught to ``models``, which are
    checkpointed by time, and applied to ``reputations``, committed after each poll. Each
    part skips what it already holds (their offsets differ after a restart). Remembers what
    changed since ``take_changes``: the handoff to the scoring thread carries only the text
    model's weights of the n-grams learned since."""

    def __init__(self, models: ModelSet, reputations: "Reputations", bootstrap: str, examples_topic: str,
                 checkpoint_topic: str, checkpoint_key: str, data_dir: Path, checkpoint_interval_s: float):
        self.models = models
        self.reputations = reputations
        self.bootstrap = bootstrap
        self.examples_topic = examples_topic
        self.checkpoint_topic = checkpoint_topic
        self.checkpoint_key = checkpoint_key.encode()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_file = data_dir / CHECKPOINT_FILE
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3,
                                  "compression.type": "zstd", "message.max.bytes": CHECKPOINT_MAX_BYTES})
        self.consumer: Consumer | None = None
        # Each checkpoint pickles every model, 82 ms for a text model whose n-grams fill 196,000
        # buckets (6.2 MB): by time, not every 500 examples as until round 27, which at 300
        # labels/s was every 1.7 s (docs/performance.md, round 27). Off the scoring thread
        # since round 33, it still holds up the handoffs.
        self.checkpoint_interval_s = checkpoint_interval_s
        self.applied_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.changed = False
        self.changed_ngrams: set[str] = set()

    def applied_offset(self) -> int:
        return min(self.models.offset, self.reputations.offset)

    def _reader(self) -> Consumer:
        """The feed's consumer, from the record after the last one both parts applied."""
        if self.consumer is None:
            self.consumer = _examples_consumer(self.bootstrap, self.examples_topic, self.applied_offset() + 1)
        return self.consumer

    def catch_up(self, timeout_s: float = 300.0) -> None:
        """Applies every record on the feed when called."""
        end = _feed_end(self._reader(), self.examples_topic)
        deadline = time.monotonic() + timeout_s
        while self.applied_offset() < end - 1:
            if time.monotonic() > deadline:
                log.error("training feed did not catch up within %.0fs", timeout_s)
                return
            self.poll(max_records=5000, timeout_s=0.1)

    def poll(self, max_records: int = 5000, timeout_s: float = 0.0) -> int:
        applied = 0
        for msg in self._reader().consume(max_records, timeout=timeout_s):
            if msg.error():
                continue
            self.apply(orjson.loads(msg.value()), msg.offset())
            applied += 1
        self.reputations.commit()
        self.applied_since_checkpoint += applied
        if self.applied_since_checkpoint and time.monotonic() - self.last_checkpoint >= self.checkpoint_interval_s:
            self.checkpoint()
        return applied

    def apply(self, record: dict[str, Any], offset: int) -> None:
        self.reputations.apply(record, offset)
        models = self.models
        if offset <= models.offset:
            return
        if record.get("kind") == "control":
            if record["action"] in ("promote", "rollback"):
                models.promote()
                log.warning("%s: champion is now %s", record["action"], models.champion.name)
            models.offset = offset
        else:
            models.learn(record, offset)
            if record.get("text"):
                self.changed_ngrams.update(record["text"])
        self.changed = True

    def take_changes(self) -> set[str] | None:
        """The n-grams of the texts learned since the last call; None if nothing changed."""
        if not self.changed:
            return None
        changed, self.changed, self.changed_ngrams = self.changed_ngrams, False, set()
        return changed

    def checkpoint(self) -> None:
        raw = self.models.to_bytes()
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
        self.reputations.close()


class Reputations:
    """The reputation store as the learner, its one writer, keeps it: each example's
    reputation changes, and the offset of the last example applied, written together in one
    write batch per ``commit`` (a learner that dies before a commit leaves the store as the
    last one left it, so the next applies those examples once). ``take_changed`` tells the
    readers which entities changed."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Rdict(str(data_dir / REPUTATION_STORE), options=store_options(),
                           access_type=AccessType.read_write())
        self.offset = _stored_offset(self.store)
        self._pending: dict[bytes, bytes] = {}  # applied, not yet committed
        self._committed_offset = self.offset
        self._changed: set[tuple[str, str]] = set()

    def apply(self, record: dict[str, Any], offset: int) -> None:
        if offset <= self.offset:
            return
        if record.get("kind") != "control":
            for d in Detector.reputation_deltas(record):
                key = reputation_key(d.entity, d.key)
                before = self._pending.get(key)
                if before is None:
                    before = self.store.get(key)
                self._pending[key] = add_label_stored(before, d.label_ts, d.delta)
                self._changed.add((d.entity, d.key))
        self.offset = offset

    def commit(self) -> None:
        if self.offset == self._committed_offset:
            return
        batch = WriteBatch(raw_mode=True)
        for key, value in self._pending.items():
            batch.put(key, value)
        batch.put(_OFFSET_KEY, b"%d" % self.offset)
        self.store.write(batch)
        self._pending.clear()
        self._committed_offset = self.offset

    def take_changed(self) -> list[tuple[str, str]]:
        """The (entity, key) pairs whose reputation the examples applied since the last call
        changed (the readers see them once committed)."""
        changed, self._changed = list(self._changed), set()
        return changed

    def close(self) -> None:
        self.commit()
        self.store.close()


def _stored_offset(store: Rdict) -> int:
    """The offset of the last example a reputation store holds the changes of (-1: none)."""
    stored = store.get(_OFFSET_KEY)
    return int(stored) if stored is not None else -1


class ReputationReader:
    """The scoring thread's view of the learner's reputation store: a RocksDB secondary
    instance (read-only, no lock; it sees the learner's writes once it has caught up with
    them). ``reputation_of`` keeps what it read; ``refresh`` catches up and forgets what
    changed."""

    def __init__(self, data_dir: Path, budget: WriteBufferManager | None = None):
        self._path, self._budget = data_dir, budget
        self._kept = KeptPerEntity(REPUTATIONS_KEPT)  # entity -> key -> stored bytes or None
        self.store = self._open()

    def _open(self) -> Rdict:
        return Rdict(str(self._path / REPUTATION_STORE), options=store_options(self._budget),
                     access_type=AccessType.secondary(str(self._path / _REPUTATION_READER)))

    @property
    def kept(self) -> KeptPerEntity:
        """What ``reputation_of`` keeps (None for an entity without a reputation): the scoring
        thread's ``EntityReads`` looks here first, and asks ``reputation_of`` on a miss."""
        return self._kept

    def reputation_of(self, entity: str, key: str) -> bytes | None:
        """An entity's stored reputation, None if it never had a label."""
        stored = self._kept.get(entity, key, _UNREAD)
        if stored is _UNREAD:
            stored = self.store.get(reputation_key(entity, key))
            self._kept.put(entity, key, stored)
        return stored

    def refresh(self, changed: list[tuple[str, str]] | None) -> None:
        """Reads what the learner wrote since the last refresh, and forgets the ``changed``
        entities' kept reputations; None: a new learner, whose store is opened afresh and
        nothing kept is trusted (a secondary instance caught up across a restart of its
        primary kept serving a value the restarted primary had overwritten)."""
        if changed is None:
            self.store.close()
            self.store = self._open()
            self._kept.clear()
            return
        self.store.try_catch_up_with_primary()
        for entity, key in changed:
            self._kept.forget(entity, key)

    @property
    def offset(self) -> int:
        """The offset of the last example whose reputation changes the reader sees."""
        return _stored_offset(self.store)

    def close(self) -> None:
        self.store.close()


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
