"""`abuse-detector soak` (`make soak`): one worker under a steady load for minutes, window by window.

`make bench` times 30 s of load on a worker that starts with no state. A worker in production
runs for days, and three things only show after minutes: its entities' records grow as their
history fills (the cost per event grows until the state holds about a week of traffic,
docs/performance.md round 30), its label join's store flushes and compacts (a third of a core
for seconds at a time from about two minutes in at 5,000 events/s, round 31; in the join's own
process since round 42), and its learner
keeps learning and checkpointing. The soak offers the simulator's traffic, its labels among
the events as in the bench's (b''), at a fixed rate for as long as asked, and prints per
window:

* the events scored of those produced in the window, and their latency (p50, p99, max): the
  risk score's Kafka timestamp minus the event's, as the bench measures it;
* the share of the window the worker's scoring thread was on a CPU (near 1, events queue);
* the CPU of the worker's other threads (RocksDB's flushes and compactions, librdkafka's),
  its label join's process and its learner's, the local broker and the soak's own process (the load and the score
  reader), in cores.

It ends with one line, the whole run's figures and how many windows broke the latency target:

    SOAK rate=<r> seconds=<s> p50_ms=<n> p99_ms=<n> worst_window_p99_ms=<n> windows_over_target=<k>/<n> busy=<b>

The load is generated as it is sent and each event's timestamp is kept only until its score
comes, so a soak of hours needs no more memory than one of seconds; what the process holds
when the load starts is kept out of its garbage collector's scans (``bench.steady_load``),
which otherwise paused the load and made it produce in bursts.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from confluent_kafka import Consumer

from streams.bench import (
    LOAD_LINGER_MS, LOAD_PACING_S, _measurement, _percentile, _ScoreWatcher, _stat_ticks, on_local_broker, steady_load,
)
from streams.config import Settings
from streams.demo import start_worker, stop_worker
from streams.join_app import PROCESS_NAME
from streams.kafka.io import make_producer
from streams.simulator import SimulationConfig, simulate

WINDOW_S = 10.0
TARGET_P99_MS = 50.0
EVENTS_PER_SIMULATED_DAY = 25_000  # fewer than the simulator's ~37,000: generate more days than needed
DRAIN_S = 120.0  # after the load: how long the scores still missing may take
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    """One window of the load: the latencies of its events (by when each was produced) and the
    CPU seconds each part of the system spent in it."""
    latencies_ms: array = field(default_factory=lambda: array("l"))
    cpu_s: dict[str, float] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        return _percentile(sorted(self.latencies_ms), q)


@dataclass
class Soak:
    rate: float
    seconds: float
    window_s: float
    windows: list[Window]
    produced: int
    labels: int
    unscored: int  # events whose score did not come within DRAIN_S of the load's end

    def all_latencies(self) -> list[int]:
        return sorted(ms for window in self.windows for ms in window.latencies_ms)

    def windows_over(self, target_ms: float) -> int:
        return sum(1 for w in self.windows if w.latencies_ms and w.percentile(0.99) > target_ms)

    def busy(self) -> float:
        spent = sum(w.cpu_s.get("scoring thread", 0.0) for w in self.windows)
        return spent / (len(self.windows) * self.window_s) if self.windows else float("nan")

    def line(self) -> str:
        every = self.all_latencies()
        worst = max((w.percentile(0.99) for w in self.windows if w.latencies_ms), default=float("nan"))
        return (f"SOAK rate={self.rate:.0f} seconds={self.seconds:.0f} p50_ms={_percentile(every, 0.5):.0f} "
                f"p99_ms={_percentile(every, 0.99):.0f} worst_window_p99_ms={worst:.0f} "
                f"windows_over_target={self.windows_over(TARGET_P99_MS)}/{len(self.windows)} busy={self.busy():.2f}")


def _cpu_by_part(worker_pid: int, broker_pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the worker's scoring (main) thread, its other threads by kind, its
    label join's process and its learner's (the processes it runs), the broker, and this process
    (which generates and sends the load and reads the scores, on the same cores). Parts whose
    files are gone count nothing."""
    parts: dict[str, float] = {}

    def add(part: str, stat: Path) -> None:
        try:
            ticks = _stat_ticks(stat)
        except OSError:
            return  # ended meanwhile
        parts[part] = parts.get(part, 0.0) + ticks * _TICK_S

    for task in Path(f"/proc/{worker_pid}/task").glob("*"):
        if task.name == str(worker_pid):
            part = "scoring thread"
        else:
            try:
                name = (task / "comm").read_text().strip()
            except OSError:
                continue
            part = "rocksdb" if name.startswith("rocksdb") else "librdkafka" if name.startswith("rdk:") else "other threads"
        add(part, task / "stat")
        try:
            children = (task / "children").read_text().split()
        except OSError:
            children = []
        for child in children:
            try:
                name = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            for child_task in Path(f"/proc/{child}/task").glob("*"):
                add("label join" if name == PROCESS_NAME.decode() else "learner", child_task / "stat")
    if broker_pid is not None:
        add("broker", Path(f"/proc/{broker_pid}/stat"))
    add("load", Path("/proc/self/stat"))
    return parts


class _Scores(threading.Thread):
    """Reads the risk scores as they come and files each event's latency under its window."""

    def __init__(self, settings: Settings, produced_ms: dict[str, int], started_ms: int, window_ms: int,
                 windows: list[Window]):
        super().__init__(name="soak-scores", daemon=True)
        self.settings, self.produced_ms, self.started_ms, self.window_ms = settings, produced_ms, started_ms, window_ms
        self.windows = windows
        self.consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"soak-{uuid.uuid4().hex}",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.consumer.subscribe([settings.scores_topic])
        self.stopping = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for msg in self.consumer.consume(2000, timeout=0.2):
                    if msg.error() or msg.key() is None:
                        continue
                    produced = self.produced_ms.pop(msg.key().decode(), None)  # None: a redelivered score
                    if produced is None:
                        continue
                    at = (produced - self.started_ms) // self.window_ms
                    if 0 <= at < len(self.windows):
                        self.windows[at].latencies_ms.append(msg.timestamp()[1] - produced)
        except Exception as exc:  # reported by stop(): a soak without its scores measures nothing
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.consumer.close()
        if self.error is not None:
            raise RuntimeError(f"reading the risk scores failed: {self.error}") from self.error


def soak(settings: Settings, rate: float, seconds: float, window_s: float = WINDOW_S, labels: bool = True,
         seed: int = 21, log_dir: Path | None = None, broker_pid: int | None = None,
         report: Callable[[str], None] = print) -> Soak:
    """Offers ``rate`` events/s (and the simulator's labels among them unless ``labels`` is
    False) to one worker for ``seconds``, on the broker of ``settings``, and reports each window."""
    log_dir = log_dir or settings.home_path / "soak"
    n_windows = max(1, round(seconds / window_s))
    windows = [Window() for _ in range(n_windows)]
    wanted = int(rate * n_windows * window_s)
    kinds = ("event", "label") if labels else ("event",)
    load = (r for r in simulate(SimulationConfig(seed=seed, days=wanted / EVENTS_PER_SIMULATED_DAY + 1))
            if r.kind in kinds)
    produced_ms: dict[str, int] = {}
    produced = offered_labels = 0
    worker = start_worker(settings, log_dir / f"{settings.app_id}.log")
    producer = make_producer(settings, **{"linger.ms": LOAD_LINGER_MS})
    scores: _Scores | None = None
    try:
        # One event scored before the clock starts: the worker has its partitions and its models.
        first = next(r for r in load if r.kind == "event")
        producer.produce(settings.events_topic, key=first.key, value=first.value)
        producer.flush(30)
        _wait_for_one_score(settings, worker, timeout_s=180.0)
        steady_load()  # before the clock: its full collection would otherwise be owed as a burst
        started = time.monotonic()
        started_ms = int(time.time() * 1000)
        scores = _Scores(settings, produced_ms, started_ms, int(window_s * 1000), windows)
        scores.start()
        cpu_before = _cpu_by_part(worker.pid, broker_pid)
        next_window = 1
        for r in load:
            if r.kind == "label":
                producer.produce(settings.labels_topic, key=r.key, value=r.value)
                offered_labels += 1
            else:
                if produced == wanted:
                    break
                now_ms = int(time.time() * 1000)
                produced_ms[r.event_id] = now_ms  # the event's Kafka timestamp, as produced
                producer.produce(settings.events_topic, key=r.key, value=r.value, timestamp=now_ms)
                produced += 1
            producer.poll(0)
            ahead = produced / rate - (time.monotonic() - started)
            if ahead > LOAD_PACING_S:
                time.sleep(ahead)
            if time.monotonic() - started >= next_window * window_s:
                cpu_before = _close_window(windows[next_window - 1], worker, broker_pid, cpu_before)
                next_window += 1
        producer.flush(60)
        while next_window <= n_windows:  # the last window's CPU, up to its end
            time.sleep(max(0.0, started + next_window * window_s - time.monotonic()))
            cpu_before = _close_window(windows[next_window - 1], worker, broker_pid, cpu_before)
            next_window += 1
        deadline = time.monotonic() + DRAIN_S
        while produced_ms and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
    finally:
        stop_worker(worker)
        if scores is not None:
            scores.stop()
    result = Soak(rate, n_windows * window_s, window_s, windows, produced, offered_labels, len(produced_ms))
    _report(result, report)
    return result


def _close_window(window: Window, worker: subprocess.Popen, broker_pid: int | None,
                  before: dict[str, float]) -> dict[str, float]:
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited ({worker.returncode}) during the soak; see its log")
    now = _cpu_by_part(worker.pid, broker_pid)
    window.cpu_s = {part: now[part] - before.get(part, 0.0) for part in now}
    return now


def _wait_for_one_score(settings: Settings, worker: subprocess.Popen, timeout_s: float) -> None:
    watcher = _ScoreWatcher(settings)
    try:
        scored = watcher.until(1, timeout_s, alive=lambda: worker.poll() is None)
    finally:
        watcher.close()
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited ({worker.returncode}) before scoring; see its log")
    if not scored:
        raise TimeoutError(f"no risk score within {timeout_s:.0f}s of the first event; see the worker's log")


def _report(result: Soak, report: Callable[[str], None]) -> None:
    parts = ("scoring thread", "rocksdb", "librdkafka", "other threads", "label join", "learner", "broker", "load")
    report(f"  {'from s':>6s} {'events':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>7s}  "
           + " ".join(f"{p:>14s}" for p in parts) + "   (CPU in cores)")
    for i, window in enumerate(result.windows):
        measured = sorted(window.latencies_ms)
        row = (f"  {i * result.window_s:6.0f} {len(measured):7d} {_percentile(measured, 0.5):7.0f} "
               f"{_percentile(measured, 0.99):7.0f} {measured[-1] if measured else float('nan'):7.0f}  ")
        report(row + " ".join(f"{window.cpu_s.get(p, 0.0) / result.window_s:14.2f}" for p in parts))
    report(f"  {result.produced:,d} events and {result.labels:,d} labels offered; "
           f"{result.unscored:,d} events not scored within {DRAIN_S:.0f}s of the load's end")
    report(result.line())


def run_soak(settings: Settings, rate: float, seconds: float, window_s: float = WINDOW_S, labels: bool = True) -> Soak:
    """The soak on the local broker, on fresh topics."""
    with on_local_broker(settings, "soak") as (settings, home, broker_pid):
        print(f"soak: {rate:,.0f} events/s{' with the simulator labels' if labels else ''} for {seconds:,.0f}s, "
              f"windows of {window_s:.0f}s; logs in {home}", flush=True)
        with _measurement(settings, "soak", home) as fresh:
            return soak(fresh, rate, seconds, window_s, labels, log_dir=home, broker_pid=broker_pid,
                        report=lambda line: print(line, flush=True))
