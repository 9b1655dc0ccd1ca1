"""The Faust app: topics, tables and agents. Wiring only; detection lives in ``detectors``.

Path of an event::

    events (key user_id) --process-inputs--> risk-scores (key event_id), alerts (key user_id)
       |   <entity>-state tables (RocksDB + changelog)
       |   shard replica (other workers' partitions)
       +-> dead-letters (anything that breaks its contract)

``process-inputs`` reads the events of the partitions Faust assigned with librdkafka
(``AssignedSource``, ``streams/follower.py``). For an event it reads the user's record and,
for IP/device/merchant/card, its own partition's shard from the tables (the shards of the
worker's other partitions too) plus the other workers' shards from the replica (see
``streams/state.py``), scores, and writes back one record per entity. Faust's consumer
assigns the partitions and recovers the tables but delivers no record. All writes (tables
and outputs) go through one ``KafkaWriter``, not Faust's producer.

The label join (risk scores and labels in, training examples out) is a Faust app of its own
in a process beside the worker (``streams/join_app.py``), and learning another
(``streams/learner.py``): the scoring thread does neither."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import faust
import orjson
from confluent_kafka import Message
from faust.exceptions import SameNode
from faust.types import TP

import detectors
from detectors.catalog import ENTITIES
from detectors.entities import entity_features, merge_records, readable
from detectors.events import decode_event
from detectors.lifecycle import ModelSet
from detectors.pipeline import Detector, Extracted, Scored
from detectors.rules import RulesWatcher
from detectors.worker_state import EntityReads, HeldKey, shard_key
from schemas import ContractViolation
from streams.config import Settings, quiet_library_loggers
from streams.consumer import flush_before_faust, new_app
from streams.follower import AssignedSource, Origin
from streams.heap import keep_freed_heap
from streams.join_app import LabelJoinProcess
from streams.kafka.io import KafkaWriter, scores_retention_problem
from streams.learner import Learner, LearnerConfig
from streams.ordering import BatchPacing, event_time_order
from streams.state import (
    ExpirySweeper, ShardReplica, amend_as_own_stores, memtable_budget, table_options,
)

log = logging.getLogger("abuse_detector.worker")

REPLICA_POLL_S = 0.05
LEARNING_POLL_S = 0.05
RULES_POLL_S = 1.0
LABEL_JOIN_POLL_S = 1.0  # what the label join's process reports, and whether it is alive
COMMIT_INTERVAL_S = 1.0  # the input positions' commits
EVENTS_FETCH_MIN_BYTES = 65_536  # ~160 events: at 5,000 events/s a fetch is full in ~30 ms
# The young generation's (Python's default: 700, 10, 10). Python counts the tracked objects made
# less those freed since its last collection: a batch's objects (the records it decodes among
# them) swing that count by tens of thousands at full load, so at 50,000 (rounds 10 to 24) a
# young collection came every 0.35-7 s and found nothing to free. Above the swing, one comes when
# objects pile up, reference cycles for it to free among them (docs/performance.md, round 25).
GC_THRESHOLDS = (200_000, 20, 20)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _applied(raw: bytes | None) -> int:
    """The input offset a stored record last applied (-1 if none)."""
    if raw is None:
        return -1
    applied = orjson.loads(raw).get("o")
    return applied[1] if applied else -1


def score_isolating_failures(detector: Detector, batch: list[Extracted], now_ms: int) -> list[Scored | Exception]:
    """``detector.score_many(batch)``, with each result's JSON; if that raises (a detector bug),
    each event alone, so only the events the bug hits fail, each with its exception in its place."""
    try:
        return list(detector.score_many(batch, now_ms, with_json=True))
    except Exception:
        log.exception("scoring a batch of %d events failed; scoring them one at a time", len(batch))
    results: list[Scored | Exception] = []
    for item in batch:
        try:
            results.append(detector.score_many([item], now_ms, with_json=True)[0])
        except Exception as exc:
            log.exception("scoring failed for event %s", item[0].get("event_id"))
            results.append(exc)
    return results


def table_name(entity: str) -> str:
    return f"{entity}-state"


def build_app(settings: Settings, detector: Detector | None = None,
              label_join: LabelJoinProcess | None = None) -> faust.App:
    """A Faust app wired to ``settings``; ``detector`` defaults to fresh models and the rules file;
    ``label_join`` is the label join's process, kept alive and shown on the ``/replica/`` page."""
    rules = RulesWatcher(Path(settings.rules_file) if settings.rules_file else None)
    detector = detector or Detector(ModelSet.new(settings.min_labels_per_class), rules=rules)
    # At-least-once: a redelivered event is scored again (same ids) but never counted twice in
    # state (records remember the last offset they applied). The events are read with librdkafka
    # (AssignedSource), the consumer never delivers them.
    app = new_app(settings, {settings.events_topic}, broker_commit_interval=COMMIT_INTERVAL_S,
                  broker_max_poll_records=500, web_bind="127.0.0.1", web_host="127.0.0.1",
                  web_port=settings.web_port)
    app.detector = detector  # type: ignore[attr-defined]

    # Scores, alerts, dead letters and every table write go through one
    # librdkafka producer, not Faust's (see KafkaWriter: Faust's per-message path was
    # the largest cost after the detector), flushed before Faust's.
    writer = KafkaWriter(settings)

    async def flush_writer(write_all_held: bool = True) -> None:
        if write_all_held:  # every flush but the periodic commit's: no held record is left out
            write_held()
        await asyncio.get_running_loop().run_in_executor(None, writer.flush)
        writer.persist_offsets()

    flush_before_faust(app, flush_writer)

    # One compact record per entity (per shard for sharded entities): at most one
    # changelog write per entity per state_write_interval_s (see detectors/worker_state.py HeldRecords).
    # key_type/value_type bytes = stored raw.
    tables = {
        name: app.Table(table_name(name), default=None, key_type=bytes, value_type=bytes,
                        partitions=settings.partitions, options=table_options())
        for name in ENTITIES
    }
    budget = memtable_budget(settings.state_memtable_mb)  # shared by every store of the worker
    for table in tables.values():
        amend_as_own_stores(table, budget)
    sharded = [name for name, entity in ENTITIES.items() if entity.sharded]
    replica = ShardReplica(
        settings.bootstrap_servers,
        {name: tables[name].changelog_topic_name for name in sharded},
        settings.partitions,
        Path(settings.data_dir) / "shard-replica",
        budget,
    )
    sweeper = ExpirySweeper(every_events=settings.sweep_every_events)
    learner = Learner(LearnerConfig.of(settings), detector.models, budget)
    learner.start()
    app.replica, app.sweeper, app.entity_tables = replica, sweeper, tables  # type: ignore[attr-defined]

    # The events of the partitions Faust assigns, read with librdkafka (streams/follower.py).
    # The events' owned partitions are also the ones whose shards
    # are read from the local stores (exact, written by this process); only the others
    # come from the replica (one replication delay old).
    # The events in fetches the broker may hold fetch_wait_ms to fill: answered at the first
    # byte, as before round 19, a loaded worker fetched a few events at a time, back to back, and
    # at 5,000 events/s offered the fetches cost the broker a third of its CPU and librdkafka's
    # threads a quarter of theirs, which the cores' other work then waited for (p99 98-164 ms
    # against 292-375; at 1,500 events/s p50 went from 5 to 9 ms).
    events_fetch = {"fetch.min.bytes": EVENTS_FETCH_MIN_BYTES, "fetch.wait.max.ms": settings.fetch_wait_ms}
    events = AssignedSource(app, settings, settings.events_topic, fetch=events_fetch)

    async def commit(offsets: dict[int, int], write_all_held: bool = True) -> None:
        """Commits the events' positions once every write of the records before them is in the log
        (``write_all_held=False``: the positions stop before every change still held)."""
        if offsets:
            await flush_writer(write_all_held)
            await events.commit(offsets)

    async def commit_processed(write_all_held: bool) -> None:
        """Commits what was processed. Without ``write_all_held`` (the periodic commits) an
        events partition commits only up to the oldest event whose changes are still held,
        and the write rounds write them when due: writing every held record at each commit
        stopped the worker for ~30 ms every second at 5,000 events/s (docs/performance.md,
        round 24). A crash then scores again up to an interval's events more, each counted
        once (records remember the last offset they applied)."""
        held_from = None if write_all_held else reads.held.unwritten_from()
        await commit(events.uncommitted(held_from), write_all_held)

    @app.on_partitions_revoked.connect
    async def forget_partitions(app: faust.App, revoked: Any, **kwargs: Any) -> None:
        # committed before the group moves on, so the next owner starts where this one stopped
        await commit(events.on_revoked(revoked, None))
        await flush_writer()
        reads.forget_owned_stores()

    def restoring() -> bool:
        """Whether the group has yet to give this worker its partitions (Faust counts rebalances
        from its first join), is moving them, or Faust is restoring their tables."""
        return app.rebalancing or not app.rebalancing_count

    @app.on_partitions_assigned.connect
    async def own_partitions(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        reads.forget_owned_stores()
        await events.on_assigned()
        replica.own(events.owned, local_partition)

    def local_partition(entity: str, partition: int) -> tuple[Iterable[tuple[bytes, bytes]], int | None]:
        """The records of this worker's store of one partition of an entity's table (it wrote
        all of them while it owned the partition), and the changelog offset the store holds
        everything up to (records after it may be in the store too: replicated again, the same)."""
        store = tables[entity].data
        offset = store.persisted_offset(TP(tables[entity].changelog_topic_name, partition))
        db = store._db_for_partition(partition)
        return ((key, value) for key, value in db.items() if key != store.offset_key), offset

    @app.timer(COMMIT_INTERVAL_S, name="commit-inputs")
    async def commit_inputs() -> None:
        try:
            await commit_processed(write_all_held=False)
        except Exception:  # the next commit retries; a raising timer stops for good
            log.exception("committing the input positions failed; retrying in %.1fs", COMMIT_INTERVAL_S)

    # What each event reads of its entities' state, and the records batches changed, each
    # written once it has been held state_write_interval_s (and before every flush): a hot IP
    # costs one JSON encoding, one store write and one changelog record per interval, not one
    # per event or per small batch (detectors/worker_state.py).
    reputations = learner.reputation_reader()
    reads = EntityReads(
        lambda name, partition: tables[name].data._db_for_partition(partition).get,  # minus Faust's table layers
        replica.shards, reputations.reputation_of, settings.partitions, settings.state_write_interval_s,
        reputations_kept=reputations.kept)

    def write_records(records: list[tuple[HeldKey, bytes, int]]) -> None:
        by_store: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
        for (name, key), raw, partition in records:
            by_store.setdefault((name, partition), []).append((key, raw))
            reads.written(name, key, raw)
        for (name, partition), items in by_store.items():
            writer.put_many(tables[name], partition, items)

    def write_held() -> None:
        write_records(reads.held.take_all())

    def write_held_if_due() -> None:
        write_records(reads.held.take_due())
        writer.poll()

    def sweep(partition: int) -> None:
        """Deletes idle entities from a slice of this partition's stores (after a batch's events are scored)."""
        watermark = sweeper.watermarks[partition]
        for name, table in tables.items():
            store = table.data  # Faust's RocksDB store: one DB per partition, plus its own offset key
            db = store._db_for_partition(partition)
            idle, last_key = reads.idle_among(name, db.items(from_key=sweeper.cursor(name, partition)), watermark,
                                              sweeper.slice_keys, store.offset_key)
            sweeper.advance(name, partition, last_key)
            for key in idle:
                writer.put(table, partition, key, None)
                reads.deleted(name, key)
                sweeper.deleted += 1

    def reject(origin: Origin, violation: ContractViolation) -> None:
        writer.send(settings.dead_letter_topic, origin.key, origin.dead_letter(violation))

    def reload_rules() -> None:
        error_before = rules.error
        if rules.poll():
            log.warning("rules reloaded: version %s, %d rules", rules.rules.version, len(rules.rules.rules))
        elif rules.error and rules.error != error_before:
            log.error("rules file rejected, keeping version %s: %s", rules.rules.version, rules.error)

    housekeeping = [("replicate-shards", REPLICA_POLL_S, replica.poll),
                    ("models-from-learner", LEARNING_POLL_S, learner.poll),
                    ("reload-rules", RULES_POLL_S, reload_rules)]
    if label_join is not None:
        housekeeping.append(("label-join-process", LABEL_JOIN_POLL_S, label_join.keep_alive))
    last_run = {name: 0.0 for name, _, _ in housekeeping}

    def keep_up() -> None:
        """Runs the periodic steps that are due. Called by the agents between events, and by
        timers when idle: Faust starts timers only after the first recovery, and a worker must
        read fresh shards from its first event on."""
        now = time.monotonic()
        for name, interval, step in housekeeping:
            if now - last_run[name] >= interval:
                last_run[name] = now
                try:
                    step()
                except Exception:
                    log.exception("%s failed; retrying in %.2fs", name, interval)

    @app.timer(REPLICA_POLL_S, name="housekeeping")
    async def housekeeping_when_idle() -> None:
        if not stopping:
            keep_up()  # never raises: each step's failure is logged and retried (a raising timer stops for good)

    stopping = False

    async def stop_scoring() -> None:
        """Run by the worker before Faust stops the app: Faust closes the table stores before
        ``on_before_shutdown``, so the records held (up to state_write_interval_s) are written,
        and the positions of their events committed, here, and no batch starts after it."""
        nonlocal stopping
        stopping = True
        try:
            await commit_processed(write_all_held=True)
        except Exception:  # the next owner starts from the last commit: processed again, never counted twice
            log.exception("committing the input positions at shutdown failed")

    app.stop_scoring = stop_scoring  # type: ignore[attr-defined]  # by run_worker's Worker

    @app.on_before_shutdown.connect
    async def release(app: faust.App, **kwargs: Any) -> None:
        await stop_scoring()  # done already when run by run_worker's Worker; commits nothing new then
        events.close()
        learner.stop()  # after a last checkpoint: a restart then replays nothing it already learned
        writer.close()
        replica.close()

    warmed_up = False

    def warm_up() -> None:
        """Before the first event: shards replicated, models current and the label join assigned
        its partitions, like Faust's table recovery."""
        nonlocal warmed_up
        if not warmed_up:
            quiet_library_loggers(settings.log_level)
            replica.catch_up()
            learner.wait_for_models()
            if label_join is not None:
                label_join.wait_until_ready()
            warmed_up = True
            # What is alive now lives as long as the worker: out of the cyclic collector's full
            # scans, which the many short-lived objects of a batch trigger (+5-7% events/s).
            gc.freeze()
            # A batch's objects are acyclic: the collector's young scans of them found nothing
            # to free (docs/performance.md, rounds 10 and 25).
            gc.set_threshold(*GC_THRESHOLDS)

    # A batch's events travel with their Kafka messages: an ``Origin`` is made only for a
    # dead letter (one per event cost ~0.5 µs, docs/performance.md, round 40).
    def extract_one(msg: Message, record: dict[str, Any], extracted: list[tuple[Message, Extracted]]) -> None:
        """An event's features and entity records; the records join the batch's at once,
        as the batch's next events of the same entities read them."""
        try:
            states, extraction = reads.extract(record, msg.partition(), msg.offset())
        except Exception as exc:  # a detector bug must not stop the partition
            # A record an earlier event of the batch changed keeps what this event changed in
            # it before the error; any other is read again (held or stored bytes).
            log.exception("feature extraction failed for event %s", record.get("event_id"))
            reject(Origin.of(msg), ContractViolation("processing_error", f"{type(exc).__name__}: {exc}"))
            return
        extracted.append((msg, (record, states, extraction)))

    def score_extracted(extracted: list[tuple[Message, Extracted]]) -> None:
        results = score_isolating_failures(detector, [item for _, item in extracted], _now_ms())
        risk_scores, alerts = [], []
        seen: dict[int, list[int]] = {}  # partition -> [events scored, latest event time]
        for (msg, (record, _, extraction)), result in zip(extracted, results):
            if isinstance(result, Exception):  # its entity records already count it (see extract_one)
                reject(Origin.of(msg), ContractViolation("processing_error", f"{type(result).__name__}: {result}"))
                continue
            partition = msg.partition()
            for name, entity_record in result.records.items():
                # extract_one held the records extraction changed, the very objects the alert
                # policy updates; a redelivered event's user record is new to the hold here
                if name not in extraction.records:
                    reads.hold(name, partition, result.keys[name], entity_record, msg.offset())
            risk_scores.append((record["event_id"].encode(), result.risk_score_json))
            if result.alert is not None:
                alerts.append((record["user_id"].encode(), result.alert_json))
            counted = seen.get(partition)
            if counted is None:
                seen[partition] = [1, record["ts"]]
            else:
                counted[0] += 1
                if record["ts"] > counted[1]:
                    counted[1] = record["ts"]
        writer.send_many(settings.scores_topic, risk_scores)
        writer.send_many(settings.alerts_topic, alerts)
        for partition, (events_scored, latest_ts) in seen.items():
            for _ in range(sweeper.observe(partition, latest_ts, events_scored)):
                try:
                    sweep(partition)
                except Exception:  # housekeeping must never stop scoring
                    log.exception("expiry sweep of partition %d failed", partition)

    def score_batch(messages: list[Message]) -> None:
        """One batch of events, start to end without an await: a rebalance (which commits
        after flushing the writer) finds every event read either untouched or finished."""
        reads.begin_batch(events.owned)
        decoded: list[tuple[Message, dict[str, Any]]] = []
        for msg in messages:
            try:
                decoded.append((msg, decode_event(msg.value(), settings.max_event_bytes)))
            except ContractViolation as violation:
                reject(Origin.of(msg), violation)
        extracted: list[tuple[Message, Extracted]] = []
        try:
            for msg, record in event_time_order(decoded, partition=lambda d: d[0].partition(),
                                                ts=lambda d: d[1]["ts"]):
                extract_one(msg, record, extracted)
            if extracted:
                score_extracted(extracted)
        finally:  # no change is left decoded past its batch
            reads.end_batch()
        write_held_if_due()
        events.processed(messages)

    # Inputs are processed in batches of what has arrived: under a backlog a full batch
    # is waiting (librdkafka fetches while the previous one is scored), a busy worker
    # takes a batch at most every batch_interval_s, and an idle one looks again every
    # batch_wait_s.
    pacing = BatchPacing(settings.batch_interval_s)

    @app.task
    async def process_inputs() -> None:
        busy = False  # the last look found inputs (when idle, the housekeeping timer keeps up)
        while True:
            if stopping:  # the worker is shutting down: the stores close next (see stop_scoring)
                await asyncio.sleep(settings.batch_wait_s)
                continue
            if app.rebalancing:  # partitions move, and Faust may restore tables from changelogs
                reads.forget_owned_stores()
                await asyncio.sleep(settings.batch_wait_s)
                continue
            if busy:
                # Before the poll, not between it and the scoring: the events that come while
                # the periodic steps run join this batch instead of waiting for the next one
                # (docs/performance.md, round 26).
                keep_up()
            if busy:
                wait_s = pacing.wait_s(time.monotonic())
                if wait_s:  # the next batch gathers what arrives meanwhile
                    await asyncio.sleep(wait_s)
                    if stopping or app.rebalancing:  # since the checks above: handled there
                        continue
            new_events = events.poll(settings.batch_max_events)
            if new_events:
                warm_up()
                pacing.started(time.monotonic())
                score_batch(new_events)
            busy = bool(new_events)
            if busy:
                # Lets the loop's other tasks (Faust's timers and services) run; Faust's consumer
                # thread, which since round 8 reads only changelogs and heartbeats, gets the GIL
                # at the interpreter's switch interval. A fixed pause here (5 ms until round 14)
                # was a fixed cost per batch: at moderate load, where batches are small, it
                # doubled p50 latency (docs/performance.md).
                await asyncio.sleep(0)
            else:
                write_held_if_due()  # idle too: other workers read the shards at most an interval late
                await asyncio.sleep(settings.batch_wait_s)

    def explain(kind: str, key: str) -> dict[str, Any] | None:
        warm_up()
        keep_up()
        write_held()  # the tables then hold every event scored so far
        entity = ENTITIES[kind]
        if entity.sharded:
            by_partition = replica.shard_map(kind, key)
            # A table copy may be fresher (a shard this worker writes) or staler (a partition it
            # owned before a rebalance, or one still recovering) than the replica: every record
            # names the last input offset it applied, so keep the newer of the two.
            for partition in range(settings.partitions):
                own = tables[kind].get(shard_key(partition, key))
                if own is not None and _applied(own) > _applied(by_partition.get(partition)):
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
            "state": readable(entity, view),
        }

    @app.page("/entities/{kind}/{key}/")
    async def entity_view(web: Any, request: Any, kind: str, key: str) -> Any:
        if kind not in ENTITIES:
            return web.json({"error": f"unknown entity type {kind!r}; one of {sorted(ENTITIES)}"}, status=400)
        # Before its partitions, the shard replica would wait for them with the worker stopped;
        # while they restore from their changelogs, the tables' view would be partial.
        if restoring():
            return web.json({"error": "this worker is taking over partitions and restoring their state; "
                                      "retry in a few seconds"}, status=503)
        if not ENTITIES[kind].sharded:
            try:  # a user lives on the worker that owns its partition
                return await app.router.route_req(tables[kind].name, key.encode(), web, request)
            except SameNode:
                pass
        answer = explain(kind, key)
        if answer is None:
            return web.json({"error": f"no state for {kind}:{key}"}, status=404)
        return web.json(answer)

    @app.page("/models/")
    async def models_view(web: Any, request: Any) -> Any:
        keep_up()
        return web.json({**detector.models.report(), "rules_version": rules.rules.version,
                         "rules_error": rules.error, "restored_from": learner.restored_from,
                         "learner": learner.view()})

    @app.page("/replica/")
    async def replica_view(web: Any, request: Any) -> Any:
        keep_up()
        stats = replica.stats
        return web.json({
            "rebalancing": restoring(),  # /entities/ answers 503 meanwhile
            "applied": stats.applied,
            "polls": stats.polls,
            "partitions_followed": replica.followed,
            "caught_up": stats.caught_up,
            "newest_replicated_write_ms": stats.newest_record_ms,
            "replication_lag": stats.lag_summary(),
            "idle_entities_deleted": sweeper.deleted,
            "events_partitions": events.view(),
            "label_join": label_join.view() if label_join is not None else None,
        })

    return app


def run_worker(settings: Settings) -> None:
    """Runs one worker until SIGINT/SIGTERM."""
    from faust.worker import Worker

    if not detectors.compiled_modules() and not detectors.pure_python_requested():
        log.warning("the detector runs from its Python source, ~1.4x slower than its compiled build: "
                    "install a C compiler and reinstall (`make install`)")
    try:
        keep_freed_heap(settings.heap_keep_mb)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    label_join = LabelJoinProcess(settings)
    app = build_app(settings, label_join=label_join)
    try:
        problem = scores_retention_problem(settings)
    except Exception as exc:  # the broker may be starting: the worker waits for it anyway
        problem = None
        log.info("could not check the retention of topic %r: %s", settings.scores_topic, exc)
    if problem:
        log.warning(problem)

    class ScoringWorker(Worker):
        async def on_stop(self) -> None:  # before the app's stop, which closes the table stores
            await app.stop_scoring()  # type: ignore[attr-defined]
            await asyncio.get_running_loop().run_in_executor(None, label_join.stop)
            await super().on_stop()

    label_join.start()
    ScoringWorker(app, loglevel=settings.log_level).execute_from_commandline()
