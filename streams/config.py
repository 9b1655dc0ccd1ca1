"""The one place for configuration.

Every setting is read from an environment variable named ``ABUSE_<FIELD>``
(for example ``ABUSE_BOOTSTRAP_SERVERS``) and can be overridden by the CLI
flag of the same name (``--bootstrap-servers``). ``docker-compose.yml`` uses
the same variable names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "ABUSE_"


@dataclass(frozen=True)
class Settings:
    # Kafka connection and topics
    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata={"help": "Kafka bootstrap servers"})
    app_id: str = field(default="abuse-detector", metadata={"help": "Faust app id (consumer group, changelog prefix)"})
    partitions: int = field(default=4, metadata={"help": "partitions of every topic we create"})
    events_topic: str = field(default="events", metadata={"help": "input events (keyed by user_id)"})
    labels_topic: str = field(default="labels", metadata={"help": "input labels (keyed by event_id)"})
    scores_topic: str = field(default="risk-scores", metadata={"help": "output risk scores (keyed by event_id)"})
    alerts_topic: str = field(default="alerts", metadata={"help": "output alerts (keyed by user_id)"})
    dead_letter_topic: str = field(default="dead-letters", metadata={"help": "rejected input with the reason"})
    examples_topic: str = field(default="training-examples", metadata={"help": "labels joined to scoring-time inputs (1 partition, read by every worker)"})
    checkpoint_topic: str = field(default="model-checkpoints", metadata={"help": "compacted topic of model checkpoints"})
    rules_file: str = field(default="", metadata={"help": "rules and alert policy TOML (empty: the built-in rules); reloaded on change"})
    warm_start: str = field(default="", metadata={"help": "models from `abuse-detector bootstrap`, used when no checkpoint exists yet"})
    # Worker
    data_dir: str = field(default=".abuse/worker", metadata={"help": "RocksDB table data of the worker"})
    web_port: int = field(default=6066, metadata={"help": "Faust web server port of the worker"})
    log_level: str = field(default="warning", metadata={"help": "worker log level"})
    min_labels_per_class: int = field(default=20, metadata={"help": "labels of each class a model needs before its score is trusted"})
    batch_max_events: int = field(default=1000, metadata={"help": "most events the worker scores per batch (a batch is what has arrived, scored in event-time order)"})
    batch_wait_s: float = field(default=0.005, metadata={"help": "how often an idle worker looks for new events (adds at most this latency)"})
    batch_interval_s: float = field(default=0.01, metadata={"help": "while events keep coming, the shortest time from one batch's start to the next's: each batch gathers what arrives meanwhile (fewer, larger batches cost less per event; an event may wait up to this long for its batch); 0: the next batch as soon as the last ends"})
    fetch_wait_ms: int = field(default=5, metadata={"help": "longest the broker holds a fetch of events to fill 64 KB: longer makes fewer, larger fetches under load (less CPU for the broker and the worker), shorter answers sooner at low load"})
    fetch_bytes: int = field(default=64 * 1024, metadata={"help": "bytes the worker fetches per partition at a time: smaller keeps a lagging worker's partitions closer in event time, larger is faster"})
    max_event_bytes: int = field(default=65536, metadata={"help": "larger input records are dead-lettered"})
    state_write_interval_s: float = field(default=0.5, metadata={"help": "longest a changed entity record waits, encoded in memory, for its store and changelog write (longer coalesces more writes of busy entities; other workers read shards this much later); written in rounds every 0.1 s"})
    sweep_every_events: int = field(default=500, metadata={"help": "events per partition between two idle-state expiry sweeps"})
    label_ttl_s: int = field(default=30 * 86400, metadata={"help": "seconds (wall clock) scoring-time features wait for their label"})
    checkpoint_interval_s: float = field(default=30.0, metadata={"help": "seconds between two checkpoints of the models, while they learn (each pickles every model in the learner process: ~80 ms for a text model whose n-grams fill 200,000 buckets, which hold up its handoffs); a restart replays the training examples since the last"})
    state_memtable_mb: int = field(default=0, metadata={"help": "MB of memtables all of the worker's RocksDB stores may hold together, and as many its label join's: past it the store written to flushes its memtable (0: no budget, each store's own 64 MB, Faust's)"})
    heap_keep_mb: int = field(default=256, metadata={"help": "MB of freed memory the worker's process keeps for its next batches instead of handing it back to the OS (glibc only; 0: glibc's defaults, which made each batch fault its pages in again)"})
    label_join_write_mb_s: int = field(default=48, metadata={"help": "MB/s each partition's label-join store may write in its flushes and compactions (0: no cap): spreads each flush over a few tenths of a second instead of taking a core in a burst"})
    # Local Kafka
    home: str = field(default=".abuse", metadata={"help": "cache and state folder (Kafka jars, broker data, logs)"})
    kafka_port: int = field(default=9092, metadata={"help": "port of the local broker"})
    kafka_controller_port: int = field(default=9093, metadata={"help": "controller port of the local broker"})

    @property
    def label_ttl_ms(self) -> int:
        """How long the label join's rows, and the risk scores they refer to, must be kept."""
        return self.label_ttl_s * 1000

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _coerce(kind: type, raw: str) -> Any:
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``ABUSE_*`` environment variables, then ``overrides`` (CLI flags).

    >>> load_settings({"ABUSE_PARTITIONS": "8"}).partitions
    8
    >>> load_settings({"ABUSE_PARTITIONS": "8"}, partitions=2).partitions
    2
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        kind = type(f.default)
        env_name = ENV_PREFIX + f.name.upper()
        if env_name in environ:
            try:
                values[f.name] = _coerce(kind, environ[env_name])
            except ValueError:
                raise SystemExit(f"{env_name}={environ[env_name]!r} is not a valid {kind.__name__}") from None
        if overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
    if "bootstrap_servers" not in values and "kafka_port" in values:
        values["bootstrap_servers"] = f"127.0.0.1:{values['kafka_port']}"
    return Settings(**values)


def add_settings_arguments(parser: Any, names: list[str]) -> None:
    """Adds ``--flag`` overrides for the named settings to an argparse parser."""
    by_name = {f.name: f for f in fields(Settings)}
    for name in names:
        f = by_name[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=type(f.default),
            default=None,
            help=f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{name.upper()}, default {f.default!r})",
        )


def quiet_library_loggers(level: str) -> None:
    """Sets Faust's, mode's and aiokafka's loggers to ``level``. A Faust worker's logging setup
    filters at its handlers and leaves them at DEBUG: they then build a log record for every
    message sent or restored only for the handler to drop it (~9% of a loaded worker's CPU in a
    profile, and most of a label join's standby replica's in round 42)."""
    for name in ("aiokafka", "faust", "mode"):
        logging.getLogger(name).setLevel(level.upper())
