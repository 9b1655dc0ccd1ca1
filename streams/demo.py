"""`abuse-detector demo`: local Kafka, topics, a worker, a minute of traffic, a summary."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from detectors.catalog import ENTITIES
from streams.app import table_name
from streams.config import ENV_PREFIX, Settings
from streams.join_app import STOP_TIMEOUT_S as JOIN_STOP_TIMEOUT_S
from streams.kafka.io import create_topics, make_producer, read_topic, topic_size
from streams.kafka.local import LocalKafka
from streams.simulator import SimulationConfig, SimulationReport, run_simulation


@dataclass(frozen=True)
class DemoSummary:
    events: int
    scored: int
    dead_letters: int
    malformed_injected: int
    alerts: int
    alert_precision: float
    alert_recall: float
    labels: int
    abusive_events: int
    state: dict[str, tuple[int, int]]  # entity type -> (entities, bytes)

    @property
    def state_bytes_per_entity(self) -> int:
        entities = sum(n for n, _ in self.state.values())
        return round(sum(b for _, b in self.state.values()) / entities) if entities else 0

    def line(self) -> str:
        return (f"SUMMARY events={self.events} scored={self.scored} dead_letters={self.dead_letters} "
                f"alerts={self.alerts} alert_precision={self.alert_precision:.3f} alert_recall={self.alert_recall:.3f} "
                f"state_bytes_per_entity={self.state_bytes_per_entity}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands ``settings`` to a child process."""
    env = dict(os.environ)
    for f in dataclasses.fields(Settings):
        env[ENV_PREFIX + f.name.upper()] = str(getattr(settings, f.name))
    return env


def start_worker(settings: Settings, log_file: Path) -> subprocess.Popen:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "worker"],
        env=settings_env(settings), stdout=open(log_file, "ab"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, SIGKILL after ``timeout``; returns once its label join and learner have ended too."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    wait_for_worker_group(proc)


def wait_for_worker_group(proc: subprocess.Popen, timeout: float = JOIN_STOP_TIMEOUT_S + 15) -> None:
    """A worker's children end on their own when it dies, even by SIGKILL (streams/join_app.py),
    but not at once: a label join still closes its store. Until they end they hold the data dir
    and a core, which the next worker, run or test must not share. ``start_worker`` gives each
    worker a session of its own, so its children share its process group."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of worker {proc.pid}'s group outlived it by {timeout:.0f}s: "
                               f"see them with `ps -g {proc.pid}`")
        time.sleep(0.2)


def entity_state_sizes(settings: Settings) -> dict[str, tuple[int, int]]:
    """Per entity type: entities holding state and their bytes (all shards), read
    from the tables' changelogs (latest value per key), i.e. what every worker
    together stores."""
    sizes = {}
    for name, entity in ENTITIES.items():
        latest: dict[bytes, int] = {}
        for key, value in read_topic(settings, f"{settings.app_id}-{table_name(name)}-changelog"):
            if key is None:
                continue
            if value is None:
                latest.pop(key, None)
            else:
                latest[key] = len(value)
        per_entity: dict[bytes, int] = {}
        for key, size in latest.items():
            entity_key = key.partition(b"|")[2] if entity.sharded else key
            per_entity[entity_key] = per_entity.get(entity_key, 0) + size
        sizes[name] = (len(per_entity), sum(per_entity.values()))
    return sizes


def summarise(settings: Settings, report: SimulationReport) -> DemoSummary:
    alerted: set[str] = set()
    for _, value in read_topic(settings, settings.alerts_topic):
        alerted.add(orjson.loads(value)["event_id"])  # one alert id per event: dedupe redeliveries
    true_alerts = sum(1 for event_id in alerted if report.truth.get(event_id))
    return DemoSummary(
        events=report.events,
        scored=topic_size(settings, settings.scores_topic),
        dead_letters=topic_size(settings, settings.dead_letter_topic),
        malformed_injected=report.malformed,
        alerts=len(alerted),
        alert_precision=true_alerts / len(alerted) if alerted else 0.0,
        alert_recall=true_alerts / report.abusive_events if report.abusive_events else 0.0,
        labels=report.labels,
        abusive_events=report.abusive_events,
        state=entity_state_sizes(settings),
    )


def _wait_for_outputs(settings: Settings, report: SimulationReport, worker: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scored = topic_size(settings, settings.scores_topic)
        dead = topic_size(settings, settings.dead_letter_topic)
        print(f"\r  worker progress: scored {scored}/{report.events}, dead letters {dead}/{report.malformed}   ",
              end="", flush=True)
        if scored >= report.events and dead >= report.malformed:
            print()
            return
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with code {worker.returncode}")
        time.sleep(1.0)
    print()
    print(f"  worker did not finish within {timeout:.0f}s; summarising what it emitted")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _bootstrap_from_history(settings: Settings, run_dir: Path, seed: int, days: float, live_start_ms: int) -> Settings:
    """Simulates the platform's labelled past (another seed, the days before the live
    stream), fits the warm-start model on it and hands it to the worker."""
    from detectors.bootstrap import bootstrap
    from streams.offline import load_labels

    history = SimulationConfig(seed=seed + 1000, days=days, start_ms=live_start_ms - int(days * 86_400_000),
                               labels_after_end=True)
    out = run_dir / "history"
    run_simulation(history, out_dir=out)
    with open(out / "events.jsonl", "rb") as f:
        models, report = bootstrap(f, load_labels(out / "labels.jsonl"), min_labels_per_class=settings.min_labels_per_class)
    model_file = run_dir / "warm-start.models"
    model_file.write_bytes(models.to_bytes())
    held_out = report["held_out"]
    print(f"      {report['history_events']} history events, {report['labelled_events']} labelled; held-out "
          f"PR AUC: scikit-learn model {held_out['sklearn_model'].get('pr_auc')}, "
          f"stacked fusion {held_out['stacked_fusion'].get('pr_auc')}; model file {model_file}")
    return settings.replace(warm_start=str(model_file))


def run_demo(settings: Settings, seconds: float = 60.0, rate: float = 1000.0, seed: int = 7,
             history_days: float = 1.0) -> DemoSummary:
    run_id = time.strftime("%Y%m%d-%H%M%S")
    home = settings.home_path
    run_dir = home / "demo" / run_id
    settings = settings.replace(
        app_id=f"abuse-demo-{run_id}",
        data_dir=str(run_dir / "worker"),
        web_port=free_port(),
    )
    kafka = LocalKafka(home, settings.kafka_port, settings.kafka_controller_port)
    we_started_kafka = False
    worker: subprocess.Popen | None = None
    # SIGTERM (e.g. from make or CI) cleans up like Ctrl-C does.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"[1/6] local Apache Kafka on {kafka.bootstrap}")
        we_started_kafka = kafka.status().running is False
        status = kafka.up()
        print(f"      {status.detail}; log: {status.log_file}")
        settings = settings.replace(bootstrap_servers=kafka.bootstrap)
        print(f"[2/6] topics ({settings.partitions} partitions each), recreated for a clean run")
        create_topics(settings, recreate=True)
        # ~37k input records per simulated day at these settings; size the day count to the time asked for.
        config = SimulationConfig(seed=seed, days=max(0.25, seconds * rate / 37_000))
        if history_days > 0:
            print(f"[3/6] warm start: {history_days:g} labelled days of history through the live feature code, "
                  "fitted with scikit-learn")
            settings = _bootstrap_from_history(settings, run_dir, seed, history_days, config.start_ms)
        else:
            print("[3/6] no history: the models start cold and learn from the live labels")
        log_file = run_dir / "worker.log"
        print(f"[4/6] worker {settings.app_id}; log: {log_file}")
        worker = start_worker(settings, log_file)
        print(f"[5/6] simulating {config.days:.2f} days of a {config.users}-user platform at {rate:.0f} records/s (seed {seed})")
        report = run_simulation(config, producer=make_producer(settings), events_topic=settings.events_topic,
                                labels_topic=settings.labels_topic, rate=rate, keep_truth=True,
                                should_stop=lambda: worker is not None and worker.poll() is not None)
        print(f"      produced {report.events} events ({report.abusive_events} abusive), {report.labels} labels, "
              f"{report.malformed} malformed records")
        print("[6/6] waiting for the worker to drain")
        _wait_for_outputs(settings, report, worker, timeout=max(120.0, seconds * 2))
        summary = summarise(settings, report)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if worker is not None:
            stop_worker(worker)
        if we_started_kafka:
            kafka.down()
    print()
    print("Demo summary")
    print(f"  events produced        {summary.events}  (abusive {summary.abusive_events})")
    print(f"  risk scores emitted    {summary.scored}")
    print(f"  dead letters           {summary.dead_letters}  (malformed injected {summary.malformed_injected})")
    print(f"  labels produced        {summary.labels}")
    print(f"  alerts                 {summary.alerts}")
    print(f"  alert precision        {summary.alert_precision:.3f}  (alerts on injected abuse / all alerts)")
    print(f"  alert recall           {summary.alert_recall:.3f}  (abusive events alerted / abusive events)")
    for name, (entities, size) in summary.state.items():
        print(f"  {name + ' state':22s} {entities} entities, {size / max(1, entities):.0f} bytes each")
    print(f"  state per entity       {summary.state_bytes_per_entity} bytes on average")
    print(summary.line())
    return summary
