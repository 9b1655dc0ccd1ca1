"""The worker's learner: a process of its own that learns the training-example feed, so the
scoring thread never does.

Learning a label cost a worker's scoring thread ~0.26 ms live (River's steps, the metrics,
the stacker's predictions), and each checkpoint pickled every model on it (~80 ms with a
platform's text vocabulary): a backfill of labels stalled scoring for as long as it took.
Now the worker starts a learner process (``Learner``) that restores the models, learns every
example in feed order, checkpoints them, and hands the scoring thread what scoring reads
(``detectors/handoff.py``) every ``HANDOFF_INTERVAL_S`` while examples come. Every worker's
learner learns the same examples in the same order, so all workers hold the same models,
each a handoff later than its learner. The scaler, which learns from scored traffic, goes
the other way every ``SCALERS_INTERVAL_S``: the learner scales an example as the scoring
thread scaled events at most that long before (before round 33, at the moment it learned).

The learner also applies each example's reputation changes to the worker's reputation store,
which it alone writes (``streams/learning.py``); the scoring thread reads it as a RocksDB
secondary instance, caught up whenever the learner says which entities changed (before
round 34 the scoring thread applied them itself, ~25 µs an example, at most 1,000 a second).

Messages over the pipe, learner to worker: ``("restored", where_from)`` or ``("failed",
why)`` first, then ``("reputations", changed)`` and ``("models", handoff)``, the first of
each sent once the learner has applied every example on the feed (``changed`` None: read
the store afresh), then, while something changes, every ``REPUTATIONS_INTERVAL_S`` and
``HANDOFF_INTERVAL_S``; ``("stopped", None)`` after its last checkpoint.
``("scalers-taken", None)`` for each scalers handoff. Worker to learner: ``("scalers",
handoff)``, each once the last was taken (a learner busy with a checkpoint never fills the
pipe, so the worker never blocks on it); ``("stop", None)``.
A learner that dies is started again (from the newest checkpoint) and the worker scores
with the models it holds meanwhile.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rocksdict import WriteBufferManager

from detectors.handoff import models_handoff, scalers_handoff, take_models, take_scalers
from detectors.lifecycle import ModelSet
from streams.config import Settings
from streams.learning import ModelsUnavailable, ModelTrainer, ReputationReader, Reputations, restore_models

log = logging.getLogger("abuse_detector.learner")

HANDOFF_INTERVAL_S = 0.1  # how stale the scoring thread's models may be while examples come (0.5 cost recall in the demo)
SCALERS_INTERVAL_S = 0.2  # how stale the learner's scalers may be
# How stale the scoring thread's reputations may be while labels come (they come minutes to days
# after their events). Each time, the scoring thread's reader catches up with the learner's store:
# ~0.4 ms however little changed, then ~1.3 µs a write batch (round 34).
REPUTATIONS_INTERVAL_S = 1.0
RESTART_AFTER_S = 5.0  # between two starts of a learner that keeps dying
_IDLE_POLL_S = 0.05
# Learning can wait; scoring cannot. The learner runs at a lower CPU priority, and learns a
# backlog (a backfill of labels) at most LEARNER_DUTY of the time, LEARNER_BATCH examples at a
# time: at full speed it took 0.7 of a core, and the scoring thread, slowed by the caches and
# memory they share, answered at p99 0.4 s while it lasted; at half, 0.09 s (round 33).
LEARNER_NICENESS = 10
LEARNER_BATCH = 500
LEARNER_DUTY = 0.5


@dataclass(frozen=True)
class LearnerConfig:
    bootstrap: str
    examples_topic: str
    checkpoint_topic: str
    checkpoint_key: str
    data_dir: str
    checkpoint_interval_s: float
    warm_start: str
    min_labels_per_class: int
    log_level: str

    @classmethod
    def of(cls, settings: Settings) -> "LearnerConfig":
        return cls(settings.bootstrap_servers, settings.examples_topic, settings.checkpoint_topic,
                   checkpoint_key=settings.app_id, data_dir=str(Path(settings.data_dir) / "learning"),
                   checkpoint_interval_s=settings.checkpoint_interval_s, warm_start=settings.warm_start,
                   min_labels_per_class=settings.min_labels_per_class, log_level=settings.log_level)


class Learner:
    """The worker's handle on its learner process; ``models`` is the scoring thread's
    ``ModelSet``, which ``poll`` updates in place from the learner's handoffs, and
    ``reputation_reader()`` reads the reputations the learner writes."""

    def __init__(self, config: LearnerConfig, models: ModelSet, budget: WriteBufferManager | None = None):
        self.config = config
        self.models = models
        self._budget = budget  # the worker's memtable budget, for its reader of the reputations
        self.reputations: ReputationReader | None = None  # opened once a learner has created the store
        self.restored_from = "nothing yet (the learner is starting)"
        self.restored = False
        self.handoffs = 0
        self.restarts = 0
        self._handed_at: float | None = None
        self._process: Any = None
        self._pipe: Connection | None = None
        self._started_at = 0.0
        self._stopping = False
        self._scalers_sent_at = 0.0
        self._scalers_in_flight = False

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the learner and waits until it has restored the models; SystemExit with its
        reason if it cannot (an unreadable warm start)."""
        self._spawn()
        deadline = time.monotonic() + timeout_s
        while not self.restored:
            if time.monotonic() > deadline:
                raise SystemExit(f"the learner process restored no models within {timeout_s:.0f}s: check the broker")
            try:
                self._take_messages(wait_s=0.1)
            except (EOFError, OSError):
                self._process.join(5)
                raise SystemExit(f"the learner process exited while starting (code {self._process.exitcode}); "
                                 "its error is in the log above") from None

    def _spawn(self) -> None:
        # spawn, not fork: the worker's librdkafka and RocksDB threads do not survive a fork
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(target=learn, args=(self.config, theirs, os.getpid()),
                                        name="abuse-detector-learner", daemon=True)
        self._process.start()
        theirs.close()
        self._pipe, self._started_at = ours, time.monotonic()
        self._scalers_in_flight = False

    def wait_for_models(self, timeout_s: float = 300.0) -> None:
        """Blocks until the learner's first models: the feed's every example learned."""
        deadline = time.monotonic() + timeout_s
        while not self.handoffs:
            if time.monotonic() > deadline:
                log.error("the learner handed over no models within %.0fs; scoring with %s", timeout_s,
                          self.restored_from)
                return
            self.poll(wait_s=0.1)

    def poll(self, wait_s: float = 0.0) -> int:
        """Takes the handoffs that came (never raises: a failure is logged and the learner
        restarted); returns how many."""
        before = self.handoffs
        try:
            self._take_messages(wait_s)
            if self.handoffs and not self._scalers_in_flight \
                    and time.monotonic() - self._scalers_sent_at >= SCALERS_INTERVAL_S:
                assert self._pipe is not None
                self._pipe.send(("scalers", scalers_handoff(self.models)))
                self._scalers_sent_at, self._scalers_in_flight = time.monotonic(), True
        except (EOFError, OSError):
            pass  # the learner is gone: restarted below
        if not self._stopping and not self._process.is_alive():
            if time.monotonic() - self._started_at >= RESTART_AFTER_S:
                log.error("the learner process exited (code %s); starting it again from the newest checkpoint",
                          self._process.exitcode)
                self._spawn()
                self.restarts += 1
        return self.handoffs - before

    def _take_messages(self, wait_s: float) -> None:
        pipe = self._pipe
        assert pipe is not None
        if not pipe.poll(wait_s):
            return
        while True:
            kind, payload = pipe.recv()
            if kind == "models":
                take_models(self.models, payload, own_scalers=self.handoffs > 0)
                self.handoffs, self._handed_at = self.handoffs + 1, time.monotonic()
            elif kind == "reputations":
                assert self.reputations is not None
                self.reputations.refresh(payload)
            elif kind == "scalers-taken":
                self._scalers_in_flight = False
            elif kind == "restored":
                self.restored_from, self.restored = payload, True
                if self.reputations is None:  # the learner has created the store by now
                    self.reputations = ReputationReader(Path(self.config.data_dir), self._budget)
            elif kind == "failed":
                if not self.restored:
                    raise SystemExit(payload)
                log.error("the learner could not restore the models: %s", payload)
            if not pipe.poll(0):
                return

    def reputation_reader(self) -> ReputationReader:
        """The scoring thread's reader of the reputations the learner writes: open once ``start``
        has returned, for as long as the worker runs (a new learner's store is reopened in it)."""
        assert self.reputations is not None, "the learner has not started"
        return self.reputations

    def view(self) -> dict[str, Any]:
        """For the worker's ``/models/`` page."""
        return {"pid": self._process.pid if self._process is not None else None,
                "alive": bool(self._process is not None and self._process.is_alive()),
                "restarts": self.restarts, "handoffs": self.handoffs,
                "last_handoff_s_ago": None if self._handed_at is None else round(time.monotonic() - self._handed_at, 3),
                "reputations_at_example": None if self.reputations is None else self.reputations.offset}

    def stop(self, timeout_s: float = 60.0) -> None:
        """Asks the learner for a last checkpoint and waits for it to exit, taking what it sends
        meanwhile (it may be waiting to send a handoff)."""
        self._stopping = True
        if self._process is None or not self._process.is_alive():
            return
        deadline = time.monotonic() + timeout_s
        try:
            assert self._pipe is not None
            self._pipe.send(("stop", None))
            while self._process.is_alive() and time.monotonic() < deadline:
                if self._pipe.poll(0.1):
                    kind, _ = self._pipe.recv()
                    if kind == "stopped":
                        break
        except (EOFError, OSError):
            pass
        self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            log.error("the learner did not stop within %.0fs; terminating it", timeout_s)
            self._process.terminate()
        if self.reputations is not None:
            self.reputations.close()


def learn(config: LearnerConfig, pipe: Connection, worker_pid: int) -> None:
    """The learner process: restore, catch up, then learn and hand over until told to stop
    or the worker is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker's Ctrl-C stops it through the pipe, after a checkpoint
    os.nice(LEARNER_NICENESS)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s learner %(message)s")
    data_dir = Path(config.data_dir)
    try:
        models, restored_from = restore_models(config.bootstrap, config.checkpoint_topic, config.checkpoint_key,
                                               data_dir, config.warm_start, config.min_labels_per_class)
    except ModelsUnavailable as exc:
        pipe.send(("failed", str(exc)))
        return
    log.info("models restored from %s", restored_from)
    reputations = Reputations(data_dir)  # created before the worker opens its reader of it
    pipe.send(("restored", restored_from))
    trainer = ModelTrainer(models, reputations, config.bootstrap, config.examples_topic, config.checkpoint_topic,
                           config.checkpoint_key, data_dir, config.checkpoint_interval_s)
    trainer.catch_up()
    trainer.take_changes()
    reputations.take_changed()
    pipe.send(("reputations", None))
    pipe.send(("models", models_handoff(models, changed_ngrams=None)))
    handed_at = reputations_at = time.monotonic()
    try:
        while os.getppid() == worker_pid:  # else the worker died without stopping its learner
            while pipe.poll(0):
                kind, payload = pipe.recv()
                if kind == "scalers":
                    take_scalers(models, payload)
                    pipe.send(("scalers-taken", None))
                elif kind == "stop":
                    trainer.close()
                    pipe.send(("stopped", None))
                    return
            started = time.monotonic()
            if trainer.poll(max_records=LEARNER_BATCH, timeout_s=_IDLE_POLL_S):
                # a backlog (a backfill of labels) is learned at most at LEARNER_DUTY of a core
                time.sleep((time.monotonic() - started) * (1 / LEARNER_DUTY - 1))
            if time.monotonic() - reputations_at >= REPUTATIONS_INTERVAL_S:
                changed_reputations = reputations.take_changed()  # committed by the poll
                if changed_reputations:
                    pipe.send(("reputations", changed_reputations))
                    reputations_at = time.monotonic()
            if time.monotonic() - handed_at >= HANDOFF_INTERVAL_S:
                changed = trainer.take_changes()
                if changed is not None:
                    pipe.send(("models", models_handoff(models, changed_ngrams=changed)))
                    handed_at = time.monotonic()
    except (EOFError, BrokenPipeError):
        pass  # the worker closed its end: it is gone
    trainer.close()
