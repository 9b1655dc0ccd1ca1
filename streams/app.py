"""The Faust app: topics, tables and agents. Wiring only; detection lives in ``detectors``.

Path of an event::

    events (key user_id) --score-events--> risk-scores (key event_id) --join-labels--+
       |   <entity>-state tables (RocksDB + changelog)   alerts (key user_id)       |
       |   shard replica (all changelog partitions)                labels (key event_id)
       +-> dead-letters (anything that breaks its contract)

``score-events`` reads the user's record and, for IP/device/merchant/card,
its own partition's shard from the tables plus the other shards from the
replica (see ``streams/state.py``), scores, and writes back one record per
entity. ``join-labels`` reads risk-scores and labels, which are co-partitioned
by event id, keeps the scoring-time features per event id in the label-join
table (bounded lifetime) and trains the model when both sides are present.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faust
import orjson
from faust.exceptions import SameNode

from detectors.catalog import ENTITIES
from detectors.entities import entity_features, is_idle, merge_records
from detectors.events import dead_letter, decode_event, decode_label
from detectors.features import EntityState, entity_keys
from detectors.labels import on_label, on_score
from detectors.model import OnlineRiskModel
from detectors.pipeline import Detector
from schemas import ContractViolation
from streams.config import Settings
from streams.state import ExpirySweeper, ShardReplica, shard_key

log = logging.getLogger("abuse_detector.worker")

REPLICA_POLL_S = 0.05


def _now_ms() -> int:
    return int(time.time() * 1000)


def _raw_topic(app: faust.App, *names: str) -> faust.TopicT:
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


def _load(raw: bytes | None) -> dict[str, Any] | None:
    return orjson.loads(raw) if raw else None


def table_name(entity: str) -> str:
    return f"{entity}-state"


def build_app(settings: Settings, detector: Detector | None = None) -> faust.App:
    """A Faust app wired to ``settings``; ``detector`` defaults to a fresh online model."""
    detector = detector or Detector(OnlineRiskModel(settings.min_labels_per_class), settings.alert_threshold)
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap_servers}",
        store="rocksdb://",
        datadir=settings.data_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        # At-least-once: a redelivered event is scored again (same ids) but never
        # counted twice in state (records remember the last offset they applied).
        broker_commit_interval=1.0,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=settings.web_port,
        autodiscover=False,
    )
    app.detector = detector  # type: ignore[attr-defined]

    events = _raw_topic(app, settings.events_topic)
    scores = _raw_topic(app, settings.scores_topic)
    alerts = _raw_topic(app, settings.alerts_topic)
    dead_letters = _raw_topic(app, settings.dead_letter_topic)
    scores_and_labels = _raw_topic(app, settings.scores_topic, settings.labels_topic)

    # One compact record per entity (per shard for sharded entities): one
    # changelog write per entity per event. key_type/value_type bytes = stored raw.
    tables = {
        name: app.Table(table_name(name), default=None, key_type=bytes, value_type=bytes,
                        partitions=settings.partitions, options={"driver": "rocksdict"})
        for name in ENTITIES
    }
    # Scoring-time features per event id. RocksDB TTL and changelog retention
    # bound their lifetime, so labels that never come cost nothing forever.
    label_join = app.Table(
        "label-join", default=None, key_type=bytes, value_type=bytes, partitions=settings.partitions,
        options={"driver": "rocksdict", "ttl": settings.label_ttl_s},
        extra_topic_configs={"cleanup.policy": "compact,delete", "retention.ms": str(settings.label_ttl_s * 1000)},
    )
    sharded = [name for name, entity in ENTITIES.items() if entity.sharded]
    replica = ShardReplica(
        settings.bootstrap_servers,
        {name: tables[name].changelog_topic_name for name in sharded},
        settings.partitions,
        Path(settings.data_dir) / "shard-replica",
    )
    sweeper = ExpirySweeper(every_events=settings.sweep_every_events)
    app.replica, app.sweeper, app.entity_tables = replica, sweeper, tables  # type: ignore[attr-defined]

    def table_key(entity: str, partition: int, key: str) -> bytes:
        return shard_key(partition, key) if ENTITIES[entity].sharded else key.encode()

    def states_for(keys: dict[str, str], partition: int) -> dict[str, EntityState]:
        states = {}
        for name, key in keys.items():
            own = tables[name].get(table_key(name, partition, key))
            others = replica.shards(name, key, exclude=partition) if ENTITIES[name].sharded else ()
            states[name] = EntityState(own, others)
        return states

    def sweep(partition: int) -> None:
        """Deletes idle entities from a slice of this partition's stores (stream context)."""
        watermark = sweeper.watermarks[partition]
        for name, table in tables.items():
            store = table.data  # Faust's RocksDB store: one DB per partition, plus its own offset key
            db = store._db_for_partition(partition)
            for key in sweeper.next_slice(name, partition, db.keys(from_key=sweeper.cursor(name, partition))):
                if key == store.offset_key:
                    continue
                raw = db.get(key)
                if raw is not None and is_idle(ENTITIES[name], orjson.loads(raw), watermark):
                    del table[key]
                    sweeper.deleted += 1

    async def reject(event: faust.EventT, violation: ContractViolation) -> None:
        message = event.message
        record = dead_letter(violation, value=message.value, key=message.key, topic=message.topic,
                             partition=message.partition, offset=message.offset, now_ms=_now_ms())
        await dead_letters.send(key=message.key, value=orjson.dumps(record))

    @app.timer(REPLICA_POLL_S)
    async def replicate_shards() -> None:
        replica.poll()

    @app.agent(events, name="score-events")
    async def score_events(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                record = decode_event(event.value, settings.max_event_bytes)
            except ContractViolation as violation:
                await reject(event, violation)
                continue
            partition = event.message.partition
            try:
                keys = entity_keys(record)
                scored = detector.score(record, states_for(keys, partition), _now_ms(),
                                        source=(partition, event.message.offset))
            except Exception as exc:  # a detector bug must not stop the partition
                log.exception("scoring failed for event %s", record.get("event_id"))
                await reject(event, ContractViolation("processing_error", f"{type(exc).__name__}: {exc}"))
                continue
            for name, raw in scored.updates.items():
                tables[name][table_key(name, partition, keys[name])] = raw
            await scores.send(key=record["event_id"].encode(), value=orjson.dumps(scored.risk_score))
            if scored.alert is not None:
                await alerts.send(key=record["user_id"].encode(), value=orjson.dumps(scored.alert))
            if sweeper.observe(partition, record["ts"]):
                try:
                    sweep(partition)
                except Exception:  # housekeeping must never stop scoring
                    log.exception("expiry sweep of partition %d failed", partition)

    @app.agent(scores_and_labels, name="join-labels")
    async def join_labels(stream: faust.StreamT) -> None:
        async for event in stream.events():
            if event.message.topic == settings.scores_topic:
                score = orjson.loads(event.value)
                key = score["event_id"].encode()
                pending, learn = on_score(_load(label_join.get(key)), score["features"], score["ts"])
            else:
                try:
                    label = decode_label(event.value, settings.max_event_bytes)
                except ContractViolation as violation:
                    await reject(event, violation)
                    continue
                key = label["event_id"].encode()
                pending, learn = on_label(_load(label_join.get(key)), label["label"])
            label_join[key] = orjson.dumps(pending)
            if learn is not None:
                detector.learn(*learn)

    def explain(kind: str, key: str) -> dict[str, Any] | None:
        entity = ENTITIES[kind]
        if entity.sharded:
            by_partition = replica.shard_map(kind, key)
            # Shards this worker writes now: the table is exact, the replica may lag. (A table
            # partition this worker owned before a rebalance is stale; the replica is not.)
            active = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == settings.events_topic}
            for partition in active:
                own = tables[kind].get(shard_key(partition, key))
                if own is not None:
                    by_partition[partition] = own
            shards = list(by_partition.values())
        else:
            own = tables[kind].get(key.encode())
            shards = [own] if own is not None else []
        view = merge_records(entity, [orjson.loads(s) for s in shards])
        if view is None:
            return None
        as_of = {"type": "explain", "ts": view["l"], "user_id": key}
        return {
            "entity": f"{kind}:{key}",
            "shards": len(shards),
            "state_bytes": sum(len(s) for s in shards),
            "watermark_ms": view["l"],
            "features": entity_features(entity, view, as_of, previous_last=view["l"]),
            "state": view,
        }

    @app.page("/entities/{kind}/{key}/")
    async def entity_view(web: Any, request: Any, kind: str, key: str) -> Any:
        if kind not in ENTITIES:
            return web.json({"error": f"unknown entity type {kind!r}; one of {sorted(ENTITIES)}"}, status=400)
        if not ENTITIES[kind].sharded:
            try:  # a user lives on the worker that owns its partition
                return await app.router.route_req(tables[kind].name, key.encode(), web, request)
            except SameNode:
                pass
        answer = explain(kind, key)
        if answer is None:
            return web.json({"error": f"no state for {kind}:{key}"}, status=404)
        return web.json(answer)

    @app.page("/replica/")
    async def replica_view(web: Any, request: Any) -> Any:
        stats = replica.stats
        return web.json({
            "applied": stats.applied,
            "caught_up": stats.caught_up,
            "newest_replicated_write_ms": stats.newest_record_ms,
            "replication_lag": stats.lag_summary(),
            "idle_entities_deleted": sweeper.deleted,
        })

    return app


def run_worker(settings: Settings) -> None:
    """Runs one worker until SIGINT/SIGTERM."""
    from faust.worker import Worker

    app = build_app(settings)
    Worker(app, loglevel=settings.log_level).execute_from_commandline()
