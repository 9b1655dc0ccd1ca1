"""`abuse-detector bench`: how fast one worker is, on the local real broker.

Measurements in one run, each on its own fresh topics:

(a) throughput: N simulated records (events, labels and a few malformed ones)
    are preloaded, then one worker process consumes them with the full
    pipeline; events/s = scored events / (time from the first score's write to the
    last score's or training example's, whichever is later: the label join too).
(b) latency: a caught-up worker gets a fixed offered load; per event, the risk
    score's Kafka timestamp (when the worker produced it) minus the event's
    (when it was produced); p50/p95/p99.
(b'') (b)'s events with the simulator's labels among them (about 6% of events get
    one): the label join, the training examples and every worker's learning from
    them, and the models trained as they come, which (b)'s events alone never
    train. The BENCH line's p99 stays (b)'s.
(b') the same as (b) at 60% of (a)'s throughput: latency when the worker keeps up.
(c) ceiling: the same records through a plain confluent-kafka loop in this
    process (consume, decode, the same ``Detector`` with RocksDB state, produce
    scores and alerts, no Faust), the local upper bound; ratio = (a) / (c).
(d) two worker processes against one on the same preload, each started and
    sharing the partitions before it (so no rebalance falls inside the measurement).
(e) the I/O floor: (c) without the detector (consume, decode and validate, produce
    one of (c)'s risk scores per event): what Kafka alone costs on this machine,
    the part of (c) that no change to the detector can take away.

(a) and (c) also report CPU milliseconds per event (the worker process's, all its
threads, over the same span; the plain loop's process's): on a shared or noisy
machine they vary far less than events/s between runs of the same code. (b')
reports the live worker's, from its first timed event to its last score: what a
worker pays in the small batches of moderate load (more than (a)'s preload).
(a), (c) and (e) also report the local broker's CPU per event: it shares the machine.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from rocksdict import Rdict

import detectors
from detectors.entities import Record
from detectors.events import decode_event
from detectors.features import EntityState, encode_record, entity_keys, extract
from detectors.lifecycle import ModelSet
from detectors.pipeline import Detector
from schemas import ContractViolation
from streams.config import Settings
from streams.demo import free_port, start_worker, stop_worker
from streams.heap import keep_freed_heap
from streams.kafka.io import create_topics, delete_topics, make_producer, produce_waiting
from streams.kafka.local import LocalKafka
from streams.simulator import SimulationConfig, simulate


WARM_UP_RECORDS = 8_000
# A broker the bench has just started served its first minute of live load (many small
# requests) at up to four times the CPU per event, though the preloads had warmed its bulk
# paths (round 19: p99 1.2-1.8 s at 5,000 events/s, 41-269 ms once warm): its JIT compiler
# had not met those paths yet. A long-running broker has.
LIVE_WARM_UP_S = 30.0
# The offered load is produced as an upstream service's producer would: librdkafka's (and, since
# Kafka 4.0, Java's) default linger of 5 ms, the schedule kept in steps of 2 ms. Until round 20
# the generator lingered 1 ms and slept once per event: at 5,000 events/s, ~1,900 produce
# requests a second and a fifth of a core, on the two cores the worker and the broker share.
# An event's latency still counts from its own produce call (its Kafka timestamp).
LOAD_LINGER_MS = 5
LOAD_PACING_S = 0.002
# (b) and (b') each offer their load this long. A worker's stalls come every 12-30 s (RocksDB
# flushing the label join, the kernel writing back, the odd slow second): in 10 s windows,
# until round 20, p99 at 5,000 events/s moved between 50 and 261 ms with whether one fell inside;
# over 30 s it was 67-75 ms in the bench and 44-70 ms ad hoc.
LATENCY_SECONDS = 30.0
# ... after this much of the same load offered to the same worker, untimed (reported apart).
# A worker started for (b) right after the preloads spent its first 5-8 s of load at a p99 of
# 200-1,030 ms (round 26; ad hoc, on a box left alone, no worse than later seconds): the
# bench's workers exit and its stores and topics are deleted just before, and this virtual
# machine reports freed memory to its host, likely making a new process pay for every page it
# touches first. (b) measures a worker that keeps up, not one that has just started.
LATENCY_SETTLE_S = 15.0
PLAIN_LOOP_STATE = "plain-loop"  # the ceiling's RocksDB, under the bench home


@dataclass
class BenchResult:
    events: int
    events_per_s: float
    ceiling_events_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    offered_per_s: float
    latency_events: int
    two_worker_events_per_s: float
    one_worker_assigned_first_per_s: float  # (d)'s baseline: one worker, started the way the two are
    kept_up_rate: float  # (b') offered load, a share of (a): latency when the worker keeps up
    kept_up_ms: tuple[float, float, float]  # its p50, p95, p99
    cpu_ms_per_event: float | None = None  # (a)'s worker process (None where /proc is missing)
    ceiling_cpu_ms_per_event: float | None = None  # (c)'s process
    kept_up_cpu_ms_per_event: float | None = None  # (b')'s worker: live, in the small batches of moderate load
    broker_cpu_ms_per_event: float | None = None  # the local broker's during (a)
    ceiling_broker_cpu_ms_per_event: float | None = None  # during (c)
    floor: Throughput | None = None  # (e)
    latency_cpu_ms_per_event: float | None = None  # (b)'s worker
    latency_thread_busy: float | None = None  # (b)'s scoring thread (``Latency.scoring_thread_busy``)
    kept_up_thread_busy: float | None = None  # (b')'s
    labelled: Latency | None = None  # (b''): (b)'s events with the simulator's labels among them

    @property
    def ratio(self) -> float:
        return self.events_per_s / self.ceiling_events_per_s if self.ceiling_events_per_s else 0.0

    @property
    def two_worker_speedup(self) -> float:
        baseline = self.one_worker_assigned_first_per_s
        return self.two_worker_events_per_s / baseline if baseline else 0.0

    def line(self) -> str:
        return (f"BENCH events_per_s={self.events_per_s:.0f} ceiling_events_per_s={self.ceiling_events_per_s:.0f} "
                f"ratio={self.ratio:.2f} p99_ms={self.p99_ms:.0f} two_worker_speedup={self.two_worker_speedup:.2f}")


def _fresh(settings: Settings, name: str, home: Path) -> Settings:
    run = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    s = settings.replace(
        app_id=run, events_topic=f"{run}-events", labels_topic=f"{run}-labels", scores_topic=f"{run}-scores",
        alerts_topic=f"{run}-alerts", dead_letter_topic=f"{run}-dlq", examples_topic=f"{run}-examples",
        checkpoint_topic=f"{run}-checkpoints", data_dir=str(home / run), web_port=free_port(), log_level="warning")
    create_topics(s)
    return s


@contextmanager
def _measurement(settings: Settings, name: str, home: Path) -> Iterator[Settings]:
    """Fresh topics and state for one measurement, deleted once it is measured (the logs
    stay): run after run they had filled the local broker's disk and slowed it."""
    fresh = _fresh(settings, name, home)
    try:
        yield fresh
    finally:
        _discard(fresh)


def _discard(settings: Settings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    prefix = f"{settings.app_id}-"  # ours and Faust's (changelogs, assignor) alike
    delete_topics(settings, [t for t in admin.list_topics(timeout=30).topics if t.startswith(prefix)])
    data_dir = Path(settings.data_dir)
    for path in [data_dir, *data_dir.parent.glob(f"{data_dir.name}-*")]:  # one per worker
        shutil.rmtree(path, ignore_errors=True)


def _preload(settings: Settings, records: list[Any], producer: Producer | None = None) -> int:
    if producer is None:  # not ``or``: a Producer with nothing queued is falsy (its len is 0)
        producer = make_producer(settings, **{"linger.ms": 50, "batch.size": 1_000_000})
    events = 0
    for r in records:
        topic = settings.labels_topic if r.kind == "label" else settings.events_topic
        events += r.kind == "event"
        produce_waiting(producer, topic, r.key, r.value)
    assert producer.flush(120) == 0, "the broker did not take the preload"
    return events


class _ScoreWatcher:
    """Reads a scores topic (and the training examples, which the label join writes),
    keeping each record's Kafka timestamp by event id."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"bench-{uuid.uuid4().hex}",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.consumer.subscribe([settings.scores_topic, settings.examples_topic])
        self.seen: dict[str, int] = {}
        self.examples: dict[str, int] = {}

    def until(self, count: int, timeout: float, alive: Callable[[], bool] = lambda: True,
              labelled: int = 0) -> dict[str, int]:
        """Until ``count`` events are scored and ``labelled`` events have a training example."""
        deadline = time.monotonic() + timeout
        while (len(self.seen) < count or len(self.examples) < labelled) and time.monotonic() < deadline and alive():
            for msg in self.consumer.consume(2000, timeout=0.5):
                if msg.error():
                    continue
                into = self.seen if msg.topic() == self.settings.scores_topic else self.examples
                into.setdefault(msg.key().decode(), msg.timestamp()[1])  # both are keyed by event id
        return self.seen

    def close(self) -> None:
        self.consumer.close()


class Throughput(NamedTuple):
    events_per_s: float
    cpu_ms_per_event: float | None  # the measured processes', summed; None where /proc is missing
    broker_cpu_ms_per_event: float | None = None  # the local broker's over the same span


def _stat_ticks(stat: Path) -> int:
    """User plus system clock ticks so far from a ``/proc`` stat file (OSError once it is gone)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _process_cpu_s(pid: int, thread: int | None = None) -> float | None:
    """User plus system CPU seconds so far of a process, all its threads and the processes it
    runs (a worker's learner, since round 33), or of one of its threads (Linux)."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        ticks = _stat_ticks(Path(stat))
    except OSError:
        return None
    if thread is None:
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                for child in children.read_text().split():
                    ticks += _stat_ticks(Path(f"/proc/{child}/stat"))
            except OSError:
                pass  # the thread or the child ended meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: list[int]) -> float | None:
    times = [_process_cpu_s(pid) for pid in pids]
    return None if None in times else sum(times)  # type: ignore[arg-type]


def _broker_cpu_s(pid: int | None) -> float | None:
    return None if pid is None else _process_cpu_s(pid)


def _ms_per_event(cpu_before_s: float | None, cpu_after_s: float | None, events: int) -> float | None:
    return None if cpu_before_s is None or cpu_after_s is None else 1000 * (cpu_after_s - cpu_before_s) / events


def _wait_for_assignment(worker_settings: list[Settings], procs: list[Any], timeout: float = 180) -> None:
    """Until the workers own every events partition between them, each some, and so do their
    label joins the labels partitions: a worker or a join joining mid-measurement would stop
    its group for a rebalance and count it as work."""
    deadline = time.monotonic() + timeout
    every = list(range(worker_settings[0].partitions))
    while time.monotonic() < deadline:
        owned, joined = [], []
        for s in worker_settings:
            try:
                page = orjson.loads(urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/replica/", timeout=5).read())
                owned.append(page["events_partitions"]["assigned"])
                joined.append(page["label_join"]["labels_partitions"]["assigned"])
            except (OSError, ValueError, KeyError, TypeError):
                owned.append([])
                joined.append([])
        if all(owned) and sorted(p for ps in owned for p in ps) == every \
                and all(joined) and sorted(p for ps in joined for p in ps) == every:
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a worker exited before its partitions were assigned; logs: {worker_settings[0].data_dir}")
        time.sleep(0.5)
    raise RuntimeError(f"the workers and their label joins did not share the partitions within {timeout:.0f}s")


def _worker_throughput(settings: Settings, records: list[Any], workers: int, log_dir: Path, timeout: float,
                       assigned_first: bool = False, broker_pid: int | None = None) -> Throughput:
    """Events/s from the first risk score to the moment the workers have scored every event
    *and* joined every label (a worker whose label join falls behind has not finished).
    ``assigned_first``: the workers start and share the partitions before the preload,
    rather than after it (which a worker that joins second would interrupt with a rebalance)."""
    labelled = len({r.event_id for r in records if r.kind == "label"})
    watcher = _ScoreWatcher(settings)
    procs = []
    try:
        worker_settings = [settings.replace(data_dir=f"{settings.data_dir}-{i}", web_port=free_port())
                           for i in range(workers)]
        events = 0 if assigned_first else _preload(settings, records)
        for i, s in enumerate(worker_settings):
            procs.append(start_worker(s, log_dir / f"{settings.app_id}-{i}.log"))
        if assigned_first:
            _wait_for_assignment(worker_settings, procs)
            events = _preload(settings, records)
        def alive() -> bool:
            return all(p.poll() is None for p in procs)

        watcher.until(1, timeout, alive=alive)  # start-up and recovery are not the work measured
        cpu_before, broker_before = _cpu_s([p.pid for p in procs]), _broker_cpu_s(broker_pid)
        seen = watcher.until(events, timeout, alive=alive, labelled=labelled)
        cpu_after, broker_after = _cpu_s([p.pid for p in procs]), _broker_cpu_s(broker_pid)
        for i, p in enumerate(procs):
            if p.poll() is not None:
                print(f"  warning: worker {i} exited with code {p.returncode}; log: {log_dir / f'{settings.app_id}-{i}.log'}")
    finally:
        for p in procs:
            stop_worker(p)
        watcher.close()
    if len(seen) < events or len(watcher.examples) < labelled:
        print(f"  warning: only {len(seen)} of {events} events scored and {len(watcher.examples)} of {labelled} "
              f"labelled events joined within {timeout:.0f}s")
    stamps = sorted(seen.values())
    if len(stamps) < 2:
        return Throughput(0.0, None)
    # from the first score to the last score or example: startup and recovery are not throughput
    end = max(stamps[-1], max(watcher.examples.values(), default=0))
    print(f"      label join done {(end - stamps[-1]) / 1000:.1f}s after the last score")
    counted = max(1, len(stamps) - 1)
    return Throughput((len(stamps) - 1) / max(1e-3, (end - stamps[0]) / 1000),
                      _ms_per_event(cpu_before, cpu_after, counted), _ms_per_event(broker_before, broker_after, counted))


class Latency(NamedTuple):
    ms: list[float]  # per event, sorted
    cpu_ms_per_event: float | None  # the live worker's, from the first timed event to the last score
    # the worker's main thread (which scores every event): its CPU time over the same span's wall
    # time. Near 1 the events queue behind one another, and the tail grows with it.
    scoring_thread_busy: float | None
    settling_p99_ms: float | None = None  # the untimed first seconds of load (``settle_s``)
    labels: int = 0  # labels offered with the events (distinct event ids)
    examples: int = 0  # of those, joined into a training example by the end


def steady_load() -> None:
    """Keeps this process's cyclic garbage collector from pausing its load loop: its full scans
    of what the process holds (the simulator's state, the records to offer, the score reader's)
    took 25-65 ms every ~10 s, and the loop then produced the events it owed at once, a burst the
    worker took as long again to score (docs/performance.md, round 37)."""
    gc.collect()
    gc.freeze()


def _latency(settings: Settings, records: list[Any], rate: float, log_dir: Path, settle_s: float = 0.0) -> Latency:
    """The offered load's latency, timed after its first ``settle_s`` seconds (whose p99 is
    reported apart): ``records`` after the first 200, which connect the producer. ``rate`` is
    of events; labels among the records go to the labels topic, in their place between them."""
    worker = start_worker(settings, log_dir / f"{settings.app_id}.log")
    watcher = _ScoreWatcher(settings)
    producer = make_producer(settings, **{"linger.ms": LOAD_LINGER_MS})
    try:
        warmup = records[:200]
        settling: set[str] = set()
        sent: set[str] = set()
        labelled: set[str] = set()
        _preload(settings, warmup, producer)  # the measuring producer: connected when timing starts
        watcher.until(sum(r.kind == "event" for r in warmup), 120, alive=lambda: worker.poll() is None)
        untimed = int(settle_s * rate)
        steady_load()
        started = timed_from = time.monotonic()
        cpu_started, thread_started = _process_cpu_s(worker.pid), _process_cpu_s(worker.pid, thread=worker.pid)
        n = 0  # events offered
        for r in records[200:]:
            if r.kind == "label":
                producer.produce(settings.labels_topic, key=r.key, value=r.value)
                labelled.add(r.event_id)
                producer.poll(0)
                continue
            n += 1
            if n == untimed + 1 and untimed:  # one schedule throughout: the timed load follows at once
                timed_from = time.monotonic()
                cpu_started, thread_started = _process_cpu_s(worker.pid), _process_cpu_s(worker.pid, thread=worker.pid)
            producer.produce(settings.events_topic, key=r.key, value=r.value)
            (settling if n <= untimed else sent).add(r.event_id)
            producer.poll(0)
            ahead = n / rate - (time.monotonic() - started)
            if ahead > LOAD_PACING_S:
                time.sleep(ahead)
        producer.flush(60)
        seen = watcher.until(len(watcher.seen) + len(settling) + len(sent), 180, alive=lambda: worker.poll() is None)
        cpu_ended, thread_ended = _process_cpu_s(worker.pid), _process_cpu_s(worker.pid, thread=worker.pid)
        elapsed = time.monotonic() - timed_from
        if labelled:  # the join may trail the scores: their examples are counted, not timed
            watcher.until(0, 30, alive=lambda: worker.poll() is None, labelled=len(labelled))
    finally:
        stop_worker(worker)
        watcher.close()
    produced = _event_timestamps(settings, sent | settling)
    busy = None if thread_started is None or thread_ended is None else (thread_ended - thread_started) / elapsed

    def latencies(ids: set[str]) -> list[int]:
        return sorted(seen[e] - produced[e] for e in ids if e in seen and e in produced)
    early = latencies(settling)
    return Latency(latencies(sent), _ms_per_event(cpu_started, cpu_ended, len(sent)), busy,
                   _percentile(early, 0.99) if early else None,
                   labels=len(labelled), examples=len(labelled & watcher.examples.keys()))


def _percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (sorted), nan for none."""
    return float(values[min(len(values) - 1, int(q * len(values)))]) if values else float("nan")


def _event_timestamps(settings: Settings, wanted: set[str]) -> dict[str, int]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"bench-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.events_topic])
    found: dict[str, int] = {}
    idle = time.monotonic()
    while len(found) < len(wanted) and time.monotonic() - idle < 10:
        for msg in consumer.consume(2000, timeout=0.5):
            idle = time.monotonic()
            try:
                event_id = orjson.loads(msg.value()).get("event_id")
            except orjson.JSONDecodeError:
                continue
            if event_id in wanted:
                found[event_id] = msg.timestamp()[1]
    consumer.close()
    return found


def detector_build() -> str:
    """Whether the detector runs compiled (setup.py) or from its Python source: the numbers differ ~1.4x."""
    compiled = detectors.compiled_modules()
    if not compiled:
        return f"pure Python (not compiled, or {detectors.PURE_PYTHON_ENV}=1)"
    guided = "with the profile of a training run" if detectors.build_profile() else "without a profile"
    return f"compiled with Cython ({len(compiled)} modules), {guided}"


# How long a plain loop's consume waits to fill a batch of 1,000: librdkafka waits the whole of
# it for a last, partial batch, which a 1 s wait added to (c)'s clock before round 16.
BATCH_WAIT_S = 0.05


class _Clock:
    """A loop's span in this process, from its first event: wall time, its CPU and the broker's."""

    def __init__(self, broker_pid: int | None):
        self.broker_pid = broker_pid
        self.started: float | None = None
        self.cpu_started = 0.0
        self.broker_started: float | None = None

    def start(self) -> None:
        if self.started is None:
            self.started, self.cpu_started = time.monotonic(), time.process_time()
            self.broker_started = _broker_cpu_s(self.broker_pid)

    def throughput(self, events: int) -> Throughput:
        if self.started is None or not events:
            return Throughput(0.0, None)
        return Throughput(events / max(time.monotonic() - self.started, 1e-3),
                          _ms_per_event(self.cpu_started, time.process_time(), events),
                          _ms_per_event(self.broker_started, _broker_cpu_s(self.broker_pid), events))


def _event_batches(settings: Settings, events: int, clock: _Clock) -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Batches of (message, decoded event) from the start of every events partition until
    ``events`` are read (or none came for 30 s); starts ``clock`` with the first batch."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"plain-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.max.bytes": 4 * 1024 * 1024})
    partitions = consumer.list_topics(settings.events_topic, timeout=10).topics[settings.events_topic].partitions
    consumer.assign([TopicPartition(settings.events_topic, p, 0) for p in partitions])
    read = 0
    idle = time.monotonic()
    try:
        while read < events and time.monotonic() - idle < 30:
            messages = consumer.consume(1000, timeout=BATCH_WAIT_S)
            if not messages:
                continue
            idle = time.monotonic()
            clock.start()
            batch = []
            for msg in messages:
                if msg.error():
                    continue
                try:
                    batch.append((msg, decode_event(msg.value(), settings.max_event_bytes)))
                except ContractViolation:
                    continue
            read += len(batch)
            yield batch
    finally:
        consumer.close()


FLOOR_OUTPUTS = 2_000  # (c)'s first risk scores, which (e) writes in turn: compressed as the real ones are


class PlainLoop(NamedTuple):
    throughput: Throughput
    scores: list[bytes]  # the first FLOOR_OUTPUTS it wrote


def plain_loop(settings: Settings, events: int, state_dir: Path, broker_pid: int | None = None) -> PlainLoop:
    """The ceiling: consume -> decode -> same Detector over RocksDB state -> produce, no Faust.
    Its CPU is this process's (all threads) from its first event to its last delivery."""
    keep_freed_heap(settings.heap_keep_mb)  # as the worker's process does (streams/heap.py)
    producer = make_producer(settings)
    db = Rdict(str(state_dir / PLAIN_LOOP_STATE))
    detector = Detector(ModelSet.new(settings.min_labels_per_class))
    gc.freeze()  # as the worker does once warm (here it also keeps the preloaded records out of full scans)
    clock = _Clock(broker_pid)
    done = 0
    scores: list[bytes] = []
    for batch in _event_batches(settings, events, clock):
        # Like the worker: features per event over the batch's records (kept decoded), models
        # per batch, each entity's record encoded and stored once per batch.
        records: dict[bytes, Record] = {}
        extracted = []
        for msg, event in batch:
            state_keys = {name: f"{name}|{key}".encode() for name, key in entity_keys(event).items()}
            states = {name: EntityState(record=records[k]) if k in records else EntityState(db.get(k))
                      for name, k in state_keys.items()}
            extraction = extract(event, states, (msg.partition(), msg.offset()))
            for name, record in extraction.records.items():
                records[state_keys[name]] = record
            extracted.append((event, states, extraction))
        for (event, _, _), scored in zip(extracted, detector.score_many(extracted, int(time.time() * 1000),
                                                                       with_json=True)):
            for name, record in scored.records.items():
                records[f"{name}|{scored.keys[name]}".encode()] = record
            score = scored.risk_score_json
            producer.produce(settings.scores_topic, key=event["event_id"].encode(), value=score)
            if len(scores) < FLOOR_OUTPUTS:
                scores.append(score)
            if scored.alert is not None:
                producer.produce(settings.alerts_topic, key=event["user_id"].encode(), value=scored.alert_json)
            producer.poll(0)
            done += 1
        for key, record in records.items():
            db[key] = encode_record(record)
    producer.flush(60)
    db.close()
    return PlainLoop(clock.throughput(done), scores)


def io_floor(settings: Settings, events: int, outputs: list[bytes], broker_pid: int | None = None) -> Throughput:
    """(e) The plain loop without the detector: consume, decode and validate each event, produce one
    of ``outputs`` (real risk scores, in turn) for it. What Kafka alone costs on this machine: the
    part of (c), and of any worker, that no change to the detector can take away."""
    producer = make_producer(settings)
    clock = _Clock(broker_pid)
    done = 0
    for batch in _event_batches(settings, events, clock):
        for _, event in batch:
            producer.produce(settings.scores_topic, key=event["event_id"].encode(), value=outputs[done % len(outputs)])
            producer.poll(0)
            done += 1
    producer.flush(60)
    return clock.throughput(done)


KEPT_UP_SHARE = 0.6


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _print_settling(measured: Latency) -> None:
    if measured.settling_p99_ms is not None:
        print(f"      the untimed first {LATENCY_SETTLE_S:.0f}s: p99 {measured.settling_p99_ms:,.0f} ms")


def _print_latency(title: str, ms: tuple[float, float, float], cpu_ms_per_event: float | None,
                   thread_busy: float | None, count: tuple[str, int] | None = None) -> None:
    """A latency load's rows of the table: p50, p95, p99, ``count`` (a name and a number), CPU."""
    for name, value in zip((f"{title}, p50 ms", "    p95 ms", "    p99 ms"), ms):
        print(f"  {name:44s}{value:>14,.0f}")
    if count is not None:
        print(f"  {'    ' + count[0]:44s}{count[1]:>14,d}")
    print(f"  {'    worker CPU per event, ms':44s}{_ms(cpu_ms_per_event):>14s}")
    print(f"  {'    scoring thread busy, share of time':44s}{_share(thread_busy):>14s}")


def _print_throughput(measured: Throughput) -> None:
    print(f"      {measured.events_per_s:,.0f} events/s, {_ms(measured.cpu_ms_per_event)} ms CPU per event "
          f"(the broker: {_ms(measured.broker_cpu_ms_per_event)})")


@contextmanager
def on_local_broker(settings: Settings, kind: str) -> Iterator[tuple[Settings, Path, int | None]]:
    """The local broker (started, and stopped after, if it is not running already): the settings
    pointing at it, a folder for the run's logs (``<home>/<kind>/<time>``) and the broker's pid."""
    home = settings.home_path / kind / time.strftime("%Y%m%d-%H%M%S")
    home.mkdir(parents=True, exist_ok=True)
    kafka = LocalKafka(settings.home_path, settings.kafka_port, settings.kafka_controller_port)
    we_started = not kafka.status().running
    broker_pid = kafka.up().pid
    try:
        yield settings.replace(bootstrap_servers=kafka.bootstrap), home, broker_pid
    finally:
        if we_started:
            kafka.down()


def run_bench(settings: Settings, events: int = 40_000, rate: float = 5000.0, latency_seconds: float = LATENCY_SECONDS,
              seed: int = 11) -> BenchResult:
    with on_local_broker(settings, "bench") as (settings, home, broker_pid):
        days = events / 40_000
        records = [r for r in simulate(SimulationConfig(seed=seed, days=days)) if r.kind != "malformed"]
        n_events = sum(r.kind == "event" for r in records)
        print(f"bench: {n_events} events (+{len(records) - n_events} labels) preloaded per measurement; "
              f"logs in {home}")
        print(f"  detector: {detector_build()}")

        # A broker just started runs interpreted and loads its coordinators: without a
        # warm-up the first measurement, (a), ran on a slower broker than the others.
        print("  warm-up (not counted) ...", flush=True)
        with _measurement(settings, "warmup", home) as warmup:
            _worker_throughput(warmup, records[:WARM_UP_RECORDS], 1, home, timeout=300.0)
        print(f"  live warm-up at {rate:,.0f} events/s for {LIVE_WARM_UP_S:.0f}s (not counted) ...", flush=True)
        warm = [r for r in simulate(SimulationConfig(seed=seed + 3, days=rate * LIVE_WARM_UP_S / 37_000))
                if r.kind == "event"]
        with _measurement(settings, "live-warmup", home) as live_warmup:
            _latency(live_warmup, warm, rate, home)

        with _measurement(settings, "one", home) as one:
            print("  (a) one worker, full pipeline ...", flush=True)
            worker = _worker_throughput(one, records, 1, home, timeout=max(600.0, n_events / 50),
                                        broker_pid=broker_pid)
            _print_throughput(worker)

            print("  (c) plain confluent-kafka loop, same detector, no Faust ...", flush=True)
            plain = plain_loop(one, n_events, home, broker_pid)
            ceiling = plain.throughput
            shutil.rmtree(home / PLAIN_LOOP_STATE, ignore_errors=True)
            _print_throughput(ceiling)

            mean_bytes = sum(map(len, plain.scores)) / max(1, len(plain.scores))
            print(f"  (e) I/O floor: (c) without the detector, writing (c)'s scores ({mean_bytes:,.0f} bytes on "
                  "average) ...", flush=True)
            floor = io_floor(one, n_events, plain.scores, broker_pid) if plain.scores else None
            if floor is not None:
                _print_throughput(floor)
            throughput = worker.events_per_s

        # Both started and sharing the partitions before the preload, against one worker started
        # the same way, so the speedup compares like with like ((a) is preloaded first, like (c)).
        def assigned_first(workers: int) -> float:
            with _measurement(settings, f"{workers}-assigned-first", home) as fresh:
                return _worker_throughput(fresh, records, workers, home, timeout=max(600.0, n_events / 50),
                                          assigned_first=True).events_per_s

        print("  (d) two workers, and one started the same way ...", flush=True)
        two_workers, one_worker = assigned_first(2), assigned_first(1)
        print(f"      {two_workers:,.0f} against {one_worker:,.0f} events/s")

        offered_s = LATENCY_SETTLE_S + latency_seconds
        print(f"  (b) latency at {rate:,.0f} events/s offered for {latency_seconds:.0f}s, "
              f"after {LATENCY_SETTLE_S:.0f}s of it untimed ...", flush=True)
        # (b'') offers the same events, with the labels among them
        simulated = list(simulate(SimulationConfig(seed=seed + 1, days=rate * offered_s / 37_000)))
        live = [r for r in simulated if r.kind == "event"]
        with _measurement(settings, "latency", home) as fresh:
            latency = _latency(fresh, live, rate, home, settle_s=LATENCY_SETTLE_S)
            latencies = latency.ms
        _print_settling(latency)

        print("  (b'') the same events with the simulator's labels among them ...", flush=True)
        live = [r for r in simulated if r.kind in ("event", "label")]
        with _measurement(settings, "labelled", home) as fresh:
            labelled = _latency(fresh, live, rate, home, settle_s=LATENCY_SETTLE_S)
        _print_settling(labelled)

        kept_up_rate = max(100.0, round(KEPT_UP_SHARE * throughput, -2))
        print(f"  (b') latency at {kept_up_rate:,.0f} events/s offered ({KEPT_UP_SHARE:.0%} of (a)) "
              f"for {latency_seconds:.0f}s, after {LATENCY_SETTLE_S:.0f}s of it untimed ...", flush=True)
        live = [r for r in simulate(SimulationConfig(seed=seed + 2, days=kept_up_rate * offered_s / 37_000))
                if r.kind == "event"]
        with _measurement(settings, "kept-up", home) as fresh:
            kept_up = _latency(fresh, live, kept_up_rate, home, settle_s=LATENCY_SETTLE_S)
        _print_settling(kept_up)

        result = BenchResult(n_events, throughput, ceiling.events_per_s, _percentile(latencies, 0.5),
                             _percentile(latencies, 0.95), _percentile(latencies, 0.99), rate, len(latencies),
                             two_workers, one_worker, kept_up_rate,
                             (_percentile(kept_up.ms, 0.5), _percentile(kept_up.ms, 0.95),
                              _percentile(kept_up.ms, 0.99)),
                             worker.cpu_ms_per_event, ceiling.cpu_ms_per_event, kept_up.cpu_ms_per_event,
                             worker.broker_cpu_ms_per_event, ceiling.broker_cpu_ms_per_event, floor,
                             latency_cpu_ms_per_event=latency.cpu_ms_per_event,
                             latency_thread_busy=latency.scoring_thread_busy,
                             kept_up_thread_busy=kept_up.scoring_thread_busy, labelled=labelled)
    print()
    print(f"  {'measure':44s}{'value':>14s}")
    print(f"  {'(a) one worker, events/s':44s}{result.events_per_s:>14,.0f}")
    print(f"  {'(c) plain loop ceiling, events/s':44s}{result.ceiling_events_per_s:>14,.0f}")
    print(f"  {'    ratio (a)/(c)':44s}{result.ratio:>14.2f}")
    print(f"  {'(a) worker CPU per event, ms':44s}{_ms(result.cpu_ms_per_event):>14s}")
    print(f"  {'(c) plain loop CPU per event, ms':44s}{_ms(result.ceiling_cpu_ms_per_event):>14s}")
    cpu_ratio = (result.ceiling_cpu_ms_per_event / result.cpu_ms_per_event
                 if result.cpu_ms_per_event and result.ceiling_cpu_ms_per_event else None)
    print(f"  {'    CPU ratio (c)/(a)':44s}{'n/a' if cpu_ratio is None else f'{cpu_ratio:.2f}':>14s}")
    print(f"  {'(a) broker CPU per event, ms':44s}{_ms(result.broker_cpu_ms_per_event):>14s}")
    print(f"  {'(c) broker CPU per event, ms':44s}{_ms(result.ceiling_broker_cpu_ms_per_event):>14s}")
    if result.floor is not None:
        print(f"  {'(e) I/O floor, no detector, events/s':44s}{result.floor.events_per_s:>14,.0f}")
        print(f"  {'    loop CPU per event, ms':44s}{_ms(result.floor.cpu_ms_per_event):>14s}")
        print(f"  {'    broker CPU per event, ms':44s}{_ms(result.floor.broker_cpu_ms_per_event):>14s}")
    print(f"  {'(d) two workers, events/s':44s}{result.two_worker_events_per_s:>14,.0f}")
    print(f"  {'    one worker started the same way':44s}{result.one_worker_assigned_first_per_s:>14,.0f}")
    print(f"  {'    speedup':44s}{result.two_worker_speedup:>14.2f}")
    _print_latency(f"(b) latency at {rate:,.0f}/s offered", (result.p50_ms, result.p95_ms, result.p99_ms),
                   result.latency_cpu_ms_per_event, result.latency_thread_busy,
                   ("events measured", result.latency_events))
    if result.labelled is not None:
        labelled = result.labelled
        _print_latency(f"(b'') the same with {labelled.labels:,d} labels",
                       tuple(_percentile(labelled.ms, q) for q in (0.5, 0.95, 0.99)), labelled.cpu_ms_per_event,
                       labelled.scoring_thread_busy, ("labels joined into training examples", labelled.examples))
    _print_latency(f"(b') latency at {result.kept_up_rate:,.0f}/s offered", result.kept_up_ms,
                   result.kept_up_cpu_ms_per_event, result.kept_up_thread_busy)
    print(result.line())
    return result

