"""Integration fixtures: a real Apache Kafka broker started by the test session,
and Faust workers run as real subprocesses against it."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pytest
from confluent_kafka import Consumer

from streams.config import Settings, load_settings
from streams.demo import free_port, start_worker, stop_worker, wait_for_worker_group
from streams.kafka.io import create_topics, make_producer
from streams.kafka.local import LocalKafka

REPO = Path(__file__).resolve().parents[2]
TEST_KAFKA_PORT = int(os.environ.get("ABUSE_TEST_KAFKA_PORT", "19092"))

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    home = Path(os.environ.get("ABUSE_HOME", REPO / ".abuse"))
    broker = LocalKafka(home, TEST_KAFKA_PORT, TEST_KAFKA_PORT + 1)
    if not broker.status().running and broker.answers(timeout=1.0):
        # another checkout's broker holds the port: run our own on free ports
        port, controller = free_port(), free_port()
        broker = LocalKafka(home, port, controller)
    already_running = broker.status().running
    broker.up(wait_s=120)
    yield broker
    if not already_running:
        broker.down()


@pytest.fixture
def settings(kafka: LocalKafka, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings with topics and app id unique to one test, so tests never see each other's data.
    ``@pytest.mark.partitions(n)`` sets the partition count (default 2)."""
    marker = request.node.get_closest_marker("partitions")
    run = uuid.uuid4().hex[:8]
    s = load_settings(
        {},
        bootstrap_servers=kafka.bootstrap,
        app_id=f"it-{run}",
        partitions=marker.args[0] if marker else 2,
        events_topic=f"events-{run}",
        labels_topic=f"labels-{run}",
        scores_topic=f"scores-{run}",
        alerts_topic=f"alerts-{run}",
        dead_letter_topic=f"dlq-{run}",
        examples_topic=f"examples-{run}",
        checkpoint_topic=f"checkpoints-{run}",
        data_dir=str(tmp_path / "worker"),
        web_port=free_port(),
        log_level="info",
        min_labels_per_class=3,
        checkpoint_interval_s=10.0,  # the tests that restart a worker wait for one periodic checkpoint
    )
    create_topics(s)
    return s


class Worker:
    """A worker subprocess; ``restart`` keeps or wipes its RocksDB data dir."""

    def __init__(self, settings: Settings, log_dir: Path):
        self.settings = settings
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"worker-{self.starts}.log"

    def start(self) -> "Worker":
        self.starts += 1
        self.proc = start_worker(self.settings, self.log_file)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_worker(self.proc)
            self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown, nothing flushed. Returns once the worker's label join
        and learner, which end on their own when their worker dies, have ended too: until then
        they may still write to the data dir (a join closing its store, say)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            wait_for_worker_group(self.proc)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(settings, tmp_path).start()
    yield w
    w.stop()


class TopicReader:
    """Reads a topic from the start, remembering what it has seen."""

    def __init__(self, settings: Settings, topic: str):
        self.consumer = Consumer({
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        self.consumer.subscribe([topic])
        self.records: list[tuple[bytes | None, dict, int, int]] = []

    def wait_for(self, predicate: Callable[[list], bool], timeout: float = 60.0, worker: Worker | None = None,
                 describe: Callable[[list], str] | None = None) -> list:
        """``describe`` says what is missing when the wait times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(500, timeout=0.5):
                if msg.error():
                    continue
                self.records.append((msg.key(), orjson.loads(msg.value()), msg.partition(), msg.offset()))
            if predicate(self.records):
                return self.records
            if worker is not None and not worker.alive():
                raise AssertionError(f"worker died:\n{worker.log()[-5000:]}")
        raise AssertionError(f"timed out after {timeout}s with {len(self.records)} records"
                             + (f"; {describe(self.records)}" if describe else "")
                             + (f"\nworker log tail:\n{worker.log()[-3000:]}" if worker else ""))

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def reader(settings: Settings) -> Iterator[Callable[[str], TopicReader]]:
    readers: list[TopicReader] = []

    def make(topic: str) -> TopicReader:
        r = TopicReader(settings, topic)
        readers.append(r)
        return r

    yield make
    for r in readers:
        r.close()


@pytest.fixture
def produce(settings: Settings) -> Callable[..., None]:
    producer = make_producer(settings)

    def send(topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
        for key, value in records:
            producer.produce(topic, key=key, value=value)
        assert producer.flush(30) == 0

    return send
