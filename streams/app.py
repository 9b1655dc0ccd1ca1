"""The Faust app: topics, tables and agents. Wiring only; detection lives in ``detectors``.

Path of an event::

    events (key user_id) --score_events--> risk-scores (key event_id) --join_labels--+
        |  user-state table (RocksDB, changelog)     alerts (key user_id)            |
        +-> dead-letters (anything that breaks its contract)       labels (key event_id)

``join_labels`` reads risk-scores and labels, which are co-partitioned by
event id, keeps the scoring-time features per event id in the label-join
table (bounded lifetime) and trains the model when both sides are present.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
import orjson

from detectors.events import decode_event, decode_label, dead_letter
from detectors.labels import on_label, on_score
from detectors.model import OnlineRiskModel
from detectors.pipeline import Detector
from schemas import ContractViolation
from streams.config import Settings

log = logging.getLogger("abuse_detector.worker")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _raw_topic(app: faust.App, *names: str) -> faust.TopicT:
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


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

    # One compact record per user; one changelog write per event.
    user_state = app.Table(
        "user-state", default=None, key_type=bytes, value_type=bytes,  # bytes => stored raw
        partitions=settings.partitions, options={"driver": "rocksdict"},
    )
    # Scoring-time features per event id. RocksDB TTL and changelog retention
    # bound their lifetime, so labels that never come cost nothing forever.
    label_join = app.Table(
        "label-join", default=None, key_type=bytes, value_type=bytes,  # bytes => stored raw
        partitions=settings.partitions,
        options={"driver": "rocksdict", "ttl": settings.label_ttl_s},
        extra_topic_configs={"cleanup.policy": "compact,delete", "retention.ms": str(settings.label_ttl_s * 1000)},
    )

    async def reject(event: faust.EventT, violation: ContractViolation) -> None:
        message = event.message
        record = dead_letter(violation, value=message.value, key=message.key, topic=message.topic,
                             partition=message.partition, offset=message.offset, now_ms=_now_ms())
        await dead_letters.send(key=message.key, value=orjson.dumps(record))

    @app.agent(events, name="score-events")
    async def score_events(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                record = decode_event(event.value, settings.max_event_bytes)
            except ContractViolation as violation:
                await reject(event, violation)
                continue
            user_key = record["user_id"].encode()
            try:
                scored = detector.score(record, user_state.get(user_key), _now_ms())
            except Exception as exc:  # a detector bug must not stop the partition
                log.exception("scoring failed for event %s", record.get("event_id"))
                await reject(event, ContractViolation("processing_error", f"{type(exc).__name__}: {exc}"))
                continue
            user_state[user_key] = scored.user_state
            await scores.send(key=record["event_id"].encode(), value=orjson.dumps(scored.risk_score))
            if scored.alert is not None:
                await alerts.send(key=user_key, value=orjson.dumps(scored.alert))

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

    return app


def _load(raw: bytes | None) -> dict[str, Any] | None:
    return orjson.loads(raw) if raw else None


def run_worker(settings: Settings) -> None:
    """Runs one worker until SIGINT/SIGTERM."""
    from faust.worker import Worker

    app = build_app(settings)
    Worker(app, loglevel=settings.log_level).execute_from_commandline()
