"""A real, single-node Apache Kafka (broker + KRaft controller) on 127.0.0.1.

The jars come from Maven Central through ``mvn dependency:copy-dependencies``
into ``<home>/kafka/lib`` on first use; later starts reuse them.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from confluent_kafka.admin import AdminClient

KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


def new_cluster_id() -> str:
    """A random KRaft cluster id (base64 of a UUID). Like Kafka's own ``Uuid.randomUuid``, never
    one starting with "-", which the storage tool would take for an option (1 in 64 otherwise)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class LocalKafkaError(RuntimeError):
    pass


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    log_file: Path
    detail: str


class LocalKafka:
    def __init__(self, home: Path, port: int = 9092, controller_port: int = 9093, heap: str = "768m"):
        self.root = home / "kafka"
        self.lib_dir = self.root / "lib"
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        # One broker per port, so tests and the demo can run side by side.
        self.run_dir = self.root / f"broker-{port}"
        self.data_dir = self.run_dir / "data"
        self.config_file = self.run_dir / "server.properties"
        self.log_file = self.run_dir / "broker.log"
        self.pid_file = self.run_dir / "broker.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- jars -------------------------------------------------------------
    def ensure_jars(self) -> None:
        stamp = self.lib_dir / ".complete"
        if stamp.exists():
            return
        mvn = shutil.which("mvn")
        if not mvn or not shutil.which("java"):
            raise LocalKafkaError(
                "Local Kafka needs `java` (17+) and `mvn` on PATH to fetch the broker jars; "
                "install them (e.g. `apt-get install openjdk-17-jre-headless maven`) or point "
                "ABUSE_BOOTSTRAP_SERVERS at an existing Kafka."
            )
        self.root.mkdir(parents=True, exist_ok=True)
        pom = self.root / "pom.xml"
        pom.write_bytes(resources.files("streams.kafka").joinpath("pom.xml").read_bytes())
        print(f"fetching Apache Kafka jars into {self.lib_dir} (first run only) ...", flush=True)
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
             f"-DoutputDirectory={self.lib_dir}", "-DincludeScope=runtime"],
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not any(self.lib_dir.glob("kafka_2.13-*.jar")):
            raise LocalKafkaError(f"mvn could not fetch Kafka:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        stamp.touch()

    def kafka_version(self) -> str:
        jars = sorted(self.lib_dir.glob("kafka_2.13-*.jar"))
        return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar") if jars else "unknown"

    # -- lifecycle --------------------------------------------------------
    def _java_cmd(self, main: str, *args: str) -> list[str]:
        log4j = self.root / "log4j2.properties"
        if not log4j.exists():
            log4j.write_bytes(resources.files("streams.kafka").joinpath("log4j2.properties").read_bytes())
        return [
            "java", f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", "-cp", str(self.lib_dir / "*"), main, *args,
        ]

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            "\n".join([
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={self.data_dir}",
                "num.partitions=4",
                "auto.create.topics.enable=true",
                "delete.topic.enable=true",
                # Single node: internal topics cannot be replicated; small partition
                # counts keep start-up and group coordination fast.
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=8",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "log.retention.hours=168",
                "",
            ])
        )

    def _read_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        # Only a JVM running our config counts: a recycled pid must never be killed.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return None
        if KAFKA_MAIN.encode() in cmdline and str(self.config_file).encode() in cmdline:
            return pid
        return None

    def answers(self, timeout: float = 2.0) -> bool:
        try:
            AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": int(timeout * 1000), "log_level": 0}).list_topics(timeout=timeout)
            return True
        except Exception:
            return False

    def status(self) -> BrokerStatus:
        pid = self._read_pid()
        if pid is None:
            return BrokerStatus(False, None, self.bootstrap, self.log_file, "not running")
        ok = self.answers()
        return BrokerStatus(True, pid, self.bootstrap, self.log_file,
                            f"Apache Kafka {self.kafka_version()} pid {pid} " + ("answering" if ok else "not answering yet"))

    def up(self, wait_s: float = 60.0) -> BrokerStatus:
        """Starts the broker unless ours is already running; returns once it answers."""
        if self._read_pid() is not None:
            if not self.answers(timeout=wait_s):
                raise LocalKafkaError(f"local Kafka is running but not answering; see {self.log_file}")
            return self.status()
        if self.answers(timeout=1.0):
            raise LocalKafkaError(f"something else already listens on {self.bootstrap}; choose another --kafka-port")
        self.ensure_jars()
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            fmt = subprocess.run(self._java_cmd(STORAGE_TOOL, "format", "-t", new_cluster_id(), "-c", str(self.config_file)),
                                 capture_output=True, text=True)
            if fmt.returncode != 0:
                raise LocalKafkaError(f"formatting KRaft storage failed:\n{fmt.stdout}\n{fmt.stderr}")
        log = open(self.log_file, "ab")
        proc = subprocess.Popen(self._java_cmd(KAFKA_MAIN, str(self.config_file)), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.run_dir)
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalKafkaError(f"broker exited with code {proc.returncode}; see {self.log_file}")
            if self.answers(timeout=1.0):
                return self.status()
            time.sleep(0.3)
        self.down()
        raise LocalKafkaError(f"broker did not answer within {wait_s:.0f}s; see {self.log_file}")

    def down(self, wait_s: float = 30.0) -> bool:
        """Stops the broker this manager started; returns False if none was running."""
        pid = self._read_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            _reap(pid)
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def wipe(self) -> None:
        """Deletes the broker's data (topics, offsets); the jar cache stays."""
        if self._read_pid() is not None:
            raise LocalKafkaError("stop the broker before wiping its data")
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
