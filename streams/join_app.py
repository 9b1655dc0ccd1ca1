"""The label join's worker: a Faust app of its own, in a process beside each scoring worker.

Path of a label::

    risk-scores (key event_id) --PartitionFollower--+
                                                    +--> label-join table (RocksDB + changelog)
    labels (key event_id) -------AssignedSource-----+--> training-examples (partition 0)
                                                    +--> dead-letters (a label that breaks its contract)

The join keeps each scored event's risk score under its event id until its label comes
(``streams/label_join.py``; ``detectors/labels.py`` decides what a joined score and label
yield). It reads only topics (the scores the scoring workers wrote, the labels) and writes
only its table and the examples, so it needs nothing of the scoring worker's state: it runs
as its own Faust app (``{app_id}-label-join``, its own consumer group), which assigns the labels
partitions, restores the table from its changelog and keeps its standby replicas, as Faust
does for the scoring worker's tables. Until round 42 the scoring worker joined on its scoring
thread, which then took a fifth more CPU per event (reading each score back, storing 1.9 KB a
row, in the caches the scoring shares): one worker now scores 17,245-18,231 events/s on this box
where it scored 14,475-15,261, its processes together taking 9% less CPU per event
(docs/performance.md, round 42).

A worker upgraded in place keeps the rows waiting for labels (the table's changelog keeps its
name), and its new consumer group reads the labels topic once from its start: a label joined
again yields no second example (``detectors/labels.py``).

``run_worker`` (``streams/app.py``) starts the join in a process of its own (``LabelJoinProcess``),
restarts it if it dies, stops it with the worker, and shows what it reports on the worker's
``/replica/`` page; a join process also ends when its worker dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

import faust
import orjson

from detectors.events import decode_label
from detectors.labels import Example, on_label
from schemas import ContractViolation
from streams.config import Settings, quiet_library_loggers
from streams.consumer import flush_before_faust, new_app
from streams.follower import POSITION_KEY, AssignedSource, Origin, PartitionFollower
from streams.kafka.io import BACKGROUND_FETCH, KafkaWriter
from streams.label_join import ScoreJoin, ScoresReadBack, pending_of, read_back_row, reference_offset
from streams.state import amend_as_own_stores, memtable_budget, pace_background_writes, table_options

log = logging.getLogger("abuse_detector.label_join")

JOIN_POLL_S = 0.05  # how often the risk scores and the read-back labels are joined
COMMIT_INTERVAL_S = 1.0  # the labels' positions' commits
LABELS_WAIT_S = 0.02  # an idle join's look for labels
LABELS_MAX = 1000  # labels joined per look
VIEW_INTERVAL_S = 0.5  # how often the process reports to its worker (the ``/replica/`` page)
RESTART_AFTER_S = 5.0  # between two starts of a join process that keeps dying
STOP_TIMEOUT_S = 60.0
JOIN_NICENESS = 10  # (a) 18,791 events/s by the median of five pairs against 18,462 without (round 42)
READY_TIMEOUT_S = 120.0  # how long a starting worker waits for its join's partitions
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
PROCESS_NAME = b"label-join"  # its main thread's name in /proc (comm), by which the soak tells it from the learner


def join_settings(settings: Settings) -> Settings:
    """The join's own app id: its consumer group, its table's changelog and its data directory."""
    return settings.replace(app_id=f"{settings.app_id}-label-join")


def build_join_app(settings: Settings, report: Callable[[dict[str, Any]], None] | None = None) -> faust.App:
    """The label join's Faust app for the scoring worker's ``settings``; ``report(view)`` is
    given what the join did, every VIEW_INTERVAL_S (the worker's ``/replica/`` page)."""
    changelog_name = f"{settings.app_id}-label-join-changelog"
    settings = join_settings(settings)
    app = new_app(settings, {settings.labels_topic}, broker_commit_interval=COMMIT_INTERVAL_S,
                  web_enabled=False)  # its worker's web server shows what it reports

    # Rows, examples and dead letters go through a librdkafka producer of the join's own.
    writer = KafkaWriter(settings)

    async def flush_writer() -> None:
        await asyncio.get_running_loop().run_in_executor(None, writer.flush)
        writer.persist_offsets()

    flush_before_faust(app, flush_writer)

    # Scoring-time features per event id. RocksDB TTL and changelog retention bound their
    # lifetime, so labels that never come cost nothing forever. The changelog keeps the name it
    # had while the scoring worker joined (until round 42): a worker upgraded in place restores
    # from it the rows still waiting for their labels.
    class LabelJoinTable(faust.Table):
        def _changelog_topic_name(self) -> str:
            return changelog_name

    label_join = app.tables.add(LabelJoinTable(
        app, name="label-join", default=None, key_type=bytes, value_type=bytes, partitions=settings.partitions,
        beacon=app.tables.beacon, options=table_options(ttl=settings.label_ttl_s),
        extra_topic_configs={"cleanup.policy": "compact,delete", "retention.ms": str(settings.label_ttl_ms)},
    ))
    pace_background_writes(label_join, settings.label_join_write_mb_s)
    amend_as_own_stores(label_join, memtable_budget(settings.state_memtable_mb))

    labels = AssignedSource(app, settings, settings.labels_topic, fetch=BACKGROUND_FETCH)
    scores = PartitionFollower(settings.bootstrap_servers, settings.scores_topic, fetch=BACKGROUND_FETCH)
    scores_read_back = ScoresReadBack.of_topic(settings)  # for label-join rows recovered as references

    async def commit() -> None:
        """Commits the labels' positions once every write before them is in the log; a label
        whose row's score is still being read back holds its partition's position."""
        offsets = labels.uncommitted(scores_read_back.held_from())
        if offsets:
            await flush_writer()
            await labels.commit(offsets)

    @app.on_partitions_revoked.connect
    async def forget_partitions(app: faust.App, revoked: Any, **kwargs: Any) -> None:
        offsets = labels.on_revoked(revoked, scores_read_back.held_from())
        await flush_writer()  # the next owner starts where this one stopped
        if offsets:
            await labels.commit(offsets)

    @app.on_partitions_assigned.connect
    async def own_partitions(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        await labels.on_assigned()

    @app.timer(COMMIT_INTERVAL_S, name="commit-labels")
    async def commit_labels() -> None:
        try:
            await commit()
        except Exception:  # the next commit retries; a raising timer stops for good
            log.exception("committing the labels' positions failed; retrying in %.1fs", COMMIT_INTERVAL_S)

    def pending_db(partition: int) -> Any:
        """The label-join store of a partition (scores and labels are co-partitioned)."""
        return label_join.data._db_for_partition(partition)

    def reject(origin: Origin, violation: ContractViolation) -> None:
        writer.send(settings.dead_letter_topic, origin.key, origin.dead_letter(violation))

    def send_example(key: bytes, example: Example) -> None:
        # every worker's learner learns it, in the same order (see streams/learning.py)
        writer.send(settings.examples_topic, key, orjson.dumps(example), partition=0)

    def join_label(origin: Origin) -> None:
        try:
            label = decode_label(origin.value, settings.max_event_bytes)
        except ContractViolation as violation:
            reject(origin, violation)
            return
        key = label["event_id"].encode()
        if scores_read_back.waiting(origin.partition, key):  # behind an earlier label of its key, read back
            scores_read_back.request(origin.partition, origin.offset, key, label, None)
            return
        row = pending_db(origin.partition).get(key)
        reference = reference_offset(row)
        if reference is not None:
            scores_read_back.request(origin.partition, origin.offset, key, label, reference)
            return
        finish_label(origin.partition, key, label, row)

    def finish_label(partition: int, key: bytes, label: dict[str, Any], row: bytes | None) -> None:
        pending, example = on_label(pending_of(row), label)
        writer.put(label_join, partition, key, orjson.dumps(pending))
        if example is not None:
            send_example(key, example)

    def join_labels(messages: list[Any]) -> None:
        for msg in messages:
            origin = Origin.of(msg)
            try:
                join_label(origin)
            except Exception as exc:  # a bug in the join must not stop the partition
                log.exception("joining label %s/%d@%d failed", origin.topic, origin.partition, origin.offset)
                reject(origin, ContractViolation("processing_error", f"{type(exc).__name__}: {exc}"))
        writer.poll()
        labels.processed(messages)

    def join_read_back_labels() -> None:
        """Joins the labels whose recovered rows' scores have been read back, in their order."""
        completed = scores_read_back.completed()
        for read in completed:
            if read.partition not in labels.owned:  # moved away meanwhile: its next owner reads the label again
                continue
            row = pending_db(read.partition).get(read.key)
            reference = reference_offset(row)
            if reference is not None and reference != read.reference:  # recovered again meanwhile
                scores_read_back.request(read.partition, read.offset, read.key, read.label, reference)
                continue
            if reference is not None:
                row = read_back_row(read.key, read.found)
            finish_label(read.partition, read.key, read.label, row)
        if completed:
            writer.poll()

    def follow_scores() -> None:
        """Joins the risk scores of the labels partitions this process owns (streams/follower.py)."""
        def position(partition: int) -> int | None:
            stored = pending_db(partition).get(POSITION_KEY)
            return None if stored is None else int(stored)

        scores.follow(labels.owned, position)
        joined = ScoreJoin(lambda partition: pending_db(partition).get)
        read_up_to: dict[int, int] = {}
        for msg in scores.poll():  # a few hundred a read at full load: no Origin made for each
            partition, offset, value = msg.partition(), msg.offset(), msg.value()
            try:
                # the worker keys scores by event id; a score written by anyone else may not be
                joined.add(partition, msg.key() or orjson.loads(value)["event_id"].encode(), value, offset)
            except Exception as exc:  # e.g. a score someone else wrote without a key or an event id
                log.exception("joining risk score %s/%d@%d failed", msg.topic(), partition, offset)
                reject(Origin.of(msg), ContractViolation("processing_error", f"{type(exc).__name__}: {exc}"))
            read_up_to[partition] = offset + 1
        for partition, offset in read_up_to.items():
            rows = joined.rows.setdefault(partition, {})
            rows[POSITION_KEY] = b"%d" % offset  # the last row: the changelog has the rows it covers before it
            writer.put_many(label_join, partition, list(rows.items()), joined.logged.get(partition))
        for key, example in joined.examples:
            send_example(key, example)
        writer.poll()

    def ready() -> bool:
        """Whether the group has given this process its partitions, their rows restored."""
        return bool(app.rebalancing_count) and not app.rebalancing

    def view() -> dict[str, Any]:
        return {"pid": os.getpid(), "ready": ready(), "labels_partitions": labels.view(),
                "risk_scores": scores.view(), **scores_read_back.view()}

    stopping = False

    @app.task
    async def join() -> None:
        joined_at = reported_at = 0.0
        was_ready = False
        quiet_library_loggers(settings.log_level)  # set up by Faust's worker before its tasks start
        gc.freeze()  # what is alive now lives as long as the process (as the scoring worker does)
        while not stopping:
            now = time.monotonic()
            if report is not None and (now - reported_at >= VIEW_INTERVAL_S or ready() != was_ready):
                reported_at, was_ready = now, ready()
                report(view())
            if app.rebalancing:  # a new partition's rows, its position among them, may still be recovering
                await asyncio.sleep(LABELS_WAIT_S)
                continue
            new_labels = labels.poll(LABELS_MAX)
            if new_labels:
                join_labels(new_labels)
            if now - joined_at >= JOIN_POLL_S:
                joined_at = now
                for step in (follow_scores, join_read_back_labels):
                    try:
                        step()
                    except Exception:
                        log.exception("%s failed; retrying in %.2fs", step.__name__, JOIN_POLL_S)
            await asyncio.sleep(0 if new_labels else LABELS_WAIT_S)

    async def stop_joining() -> None:
        """Before Faust closes the table's stores: the last positions committed, no join after."""
        nonlocal stopping
        stopping = True
        try:
            await commit()
        except Exception:  # the next owner starts from the last commit: labels joined again are no-ops
            log.exception("committing the labels' positions at shutdown failed")

    app.stop_joining = stop_joining  # type: ignore[attr-defined]

    @app.on_before_shutdown.connect
    async def release(app: faust.App, **kwargs: Any) -> None:
        await stop_joining()
        labels.close()
        writer.close()
        scores.close()
        scores_read_back.close()

    return app


def _die_with(parent_pid: int) -> None:
    """The kernel sends this process SIGTERM when its parent exits, even by SIGKILL: a join left
    running would keep its partitions, and the lock on their stores, from its worker's successor.
    A stop that hangs (a broker gone, say) ends STOP_TIMEOUT_S after the parent's death."""
    def exit_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        time.sleep(STOP_TIMEOUT_S)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="parent-watch", daemon=True).start()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, PROCESS_NAME)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the thread above ends it
        return
    if os.getppid() != parent_pid:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def run_join(settings: Settings, reports: Connection, parent_pid: int) -> None:
    """The join process: its app until SIGTERM (its worker's stop, or its worker's death)."""
    from faust.worker import Worker

    _die_with(parent_pid)
    # Joining can wait, scoring cannot: on cores the join shares with its worker (and the broker),
    # the scoring thread goes first, as it does before the learner (streams/learner.py).
    os.nice(JOIN_NICENESS)

    def report(view: dict[str, Any]) -> None:
        try:
            reports.send(view)
        except OSError:  # the worker is gone: this process gets SIGTERM next
            pass

    app = build_join_app(settings, report=report)

    class JoinWorker(Worker):
        async def on_stop(self) -> None:  # before the app's stop, which closes the table's stores
            await app.stop_joining()  # type: ignore[attr-defined]
            await super().on_stop()

    JoinWorker(app, loglevel=settings.log_level).execute_from_commandline()


class LabelJoinProcess:
    """The scoring worker's handle on its label join's process: ``keep_alive`` restarts it if it
    died, ``view`` is what it last reported, ``stop`` ends it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.restarts = 0
        self._process: Any = None
        self._reports: Connection | None = None
        self._view: dict[str, Any] = {}
        self._started_at = 0.0

    def start(self) -> None:
        # spawn, not fork: the worker's librdkafka and RocksDB threads do not survive a fork
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=False)
        self._process = context.Process(target=run_join, args=(self.settings, theirs, os.getpid()),
                                        name="abuse-detector-label-join", daemon=True)
        self._process.start()
        theirs.close()
        self._reports, self._started_at = ours, time.monotonic()

    def keep_alive(self) -> None:
        """Takes what the join reported; starts it again if it exited."""
        self._take_reports()
        if self._process is not None and not self._process.is_alive() \
                and time.monotonic() - self._started_at >= RESTART_AFTER_S:
            log.error("the label join's process exited (code %s); starting it again", self._process.exitcode)
            self.restarts += 1
            self.start()

    def wait_until_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Blocks until the join owns its partitions (so the scores written from now on are joined
        as they come), it exits, or ``timeout_s`` passes: the scores wait for it in their topic."""
        deadline = time.monotonic() + timeout_s
        while not self._view.get("ready"):
            if time.monotonic() > deadline or self._process is None or not self._process.is_alive():
                log.warning("the label join's process is not ready after %.0fs; scoring without waiting for it",
                            timeout_s)
                return
            if self._reports is not None and self._reports.poll(0.05):
                self._take_reports()

    def view(self) -> dict[str, Any]:
        """For the worker's ``/replica/`` page."""
        self._take_reports()
        alive = bool(self._process is not None and self._process.is_alive())
        return {"alive": alive, "restarts": self.restarts, **self._view}

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, which its Faust worker takes as a stop: positions committed, stores closed."""
        if self._process is None:
            return
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout_s)
            if self._process.is_alive():
                log.error("the label join's process did not stop within %.0fs; killing it", timeout_s)
                self._process.kill()
                self._process.join(5)
        self._process = None

    def _take_reports(self) -> None:
        try:
            while self._reports is not None and self._reports.poll(0):
                self._view = self._reports.recv()
        except (EOFError, OSError):
            pass  # it exited: keep_alive starts it again
