"""`abuse-detector replay`: re-run a range of a topic through the detector, isolated from live.

A replay reads exactly the asked range of every partition and scores it with
the live ``Detector`` code, then writes to ``<scores>.replay.<run-id>`` and
``<alerts>.replay.<run-id>`` (and ``<dead-letters>.replay.<run-id>``) only:
it never produces to a live topic. Everything it keeps is namespaced by the
run id: its consumer group ``<app-id>.replay.<run-id>`` and its state, a
RocksDB under ``<home>/replay/<run-id>``.

It is deterministic. The partitions are merged in event-time order (ties by
partition, then offset), never in fetch order; models are frozen at the
checkpoint or file given (``--model``), rules at the file given; every output
is stamped with its event's time instead of the wall clock; reputation
features come from the training examples that existed when the run started,
each revealed once the replay's event time passes its label time. The same
range with the same model and rules gives byte-identical records.

It is resumable. Every few thousand events it flushes its outputs, then
writes its entity state, the detector and the next offset per partition in one
RocksDB write batch. An interrupted run started again with the same arguments
continues from there; records produced after the last checkpoint are produced
again, identical, with the same ids.

One process holds all of a replay's state (no Faust tables, no changelogs): a
replay is a bounded job, and one ordered reader is what makes it deterministic.
"""

from __future__ import annotations

import heapq
import pickle
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import orjson
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from rocksdict import Rdict, WriteBatch

from detectors.events import dead_letter, decode_event
from detectors.features import EntityState, entity_keys, extract
from detectors.lifecycle import ModelSet
from detectors.pipeline import Detector, Extracted, StaticRules
from detectors.reputation import add_label_stored
from detectors.rules import load_rules
from schemas import ContractViolation
from streams.config import Settings
from streams.kafka.io import delete_topics, make_producer, read_topic

RUN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CHECKPOINT_EVERY = 5000
FORMAT = 2  # 2: the detector's anomaly model is array-based (round 5); a format-1 run is not resumed
BATCH_EVENTS = 1000  # scored together, like the worker's batches

_PROGRESS = b"\x00progress"
_MANIFEST = b"\x00manifest"
_DETECTOR = b"\x00detector"


class ReplayError(Exception):
    """A replay that must not run (or continue) as asked; the message says what to do."""


@dataclass(frozen=True)
class Position:
    kind: str  # "offset" or "time"
    value: int

    @staticmethod
    def parse(text: str) -> "Position":
        """An offset (``12345``) or a time (ISO 8601, e.g. ``2026-01-01T06:00:00Z``).

        >>> Position.parse("1500")
        Position(kind='offset', value=1500)
        >>> Position.parse("2026-01-01T00:00:00Z")
        Position(kind='time', value=1767225600000)
        """
        text = text.strip()
        if text.isdigit():
            return Position("offset", int(text))
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ReplayError(f"{text!r} is neither an offset (digits) nor an ISO 8601 time "
                              "(e.g. 2026-01-01T06:00:00Z)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return Position("time", int(moment.timestamp() * 1000))


@dataclass(frozen=True)
class ReplayTopics:
    scores: str
    alerts: str
    dead_letters: str

    @classmethod
    def of(cls, settings: Settings, run_id: str) -> "ReplayTopics":
        check_run_id(run_id)
        suffix = f".replay.{run_id}"
        topics = cls(settings.scores_topic + suffix, settings.alerts_topic + suffix,
                     settings.dead_letter_topic + suffix)
        live = {settings.events_topic, settings.labels_topic, settings.scores_topic, settings.alerts_topic,
                settings.dead_letter_topic, settings.examples_topic, settings.checkpoint_topic}
        clash = live & {topics.scores, topics.alerts, topics.dead_letters}
        if clash:
            raise ReplayError(f"a replay never writes to live topics, and {sorted(clash)} is one: "
                              "choose another run id")
        return topics

    def all(self) -> list[str]:
        return [self.scores, self.alerts, self.dead_letters]


def check_run_id(run_id: str) -> None:
    if not RUN_ID.match(run_id):
        raise ReplayError(f"run id {run_id!r}: use 1-63 lowercase letters, digits, '-' or '_'")


def state_dir(settings: Settings, run_id: str) -> Path:
    return settings.home_path / "replay" / run_id


def consumer_group(settings: Settings, run_id: str) -> str:
    return f"{settings.app_id}.replay.{run_id}"


# -- range ---------------------------------------------------------------
def resolve_range(consumer: Consumer, topic: str, start: Position, end: Position) -> dict[int, tuple[int, int]]:
    """Partition -> [first, last) offsets. Times use the records' Kafka timestamps."""
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error:
        raise ReplayError(f"topic {topic!r} does not exist on this cluster")
    partitions = sorted(metadata.partitions)
    watermarks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}

    def offsets(position: Position) -> dict[int, int]:
        if position.kind == "offset":
            return {p: min(max(position.value, watermarks[p][0]), watermarks[p][1]) for p in partitions}
        found = consumer.offsets_for_times([TopicPartition(topic, p, position.value) for p in partitions], timeout=10)
        return {tp.partition: tp.offset if tp.offset >= 0 else watermarks[tp.partition][1] for tp in found}

    first, last = offsets(start), offsets(end)
    return {p: (first[p], max(first[p], last[p])) for p in partitions}


# -- state ---------------------------------------------------------------
class ReplayState:
    """Entity records, reputations, the detector and the progress of one run, in one RocksDB.
    Changes wait in memory until ``checkpoint`` writes them in one batch with the progress."""

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path / "state"))
        self.dirty: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        value = self.dirty.get(key)
        return value if value is not None else self.db.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.dirty[key] = value

    def meta(self, key: bytes) -> Any:
        raw = self.db.get(key)
        return None if raw is None else (pickle.loads(raw) if key == _DETECTOR else orjson.loads(raw))

    def checkpoint(self, progress: dict[str, Any], detector: Detector) -> None:
        batch = WriteBatch()
        for key, value in self.dirty.items():
            batch.put(key, value)
        batch.put(_PROGRESS, orjson.dumps(progress))
        batch.put(_DETECTOR, pickle.dumps(detector))  # our own file, written and read by this code only
        self.db.write(batch)
        self.dirty.clear()

    def close(self) -> None:
        self.db.close()


def _record_key(entity: str, key: str) -> bytes:
    return b"r|%s|%s" % (entity.encode(), key.encode())


def _reputation_key(entity: str, key: str) -> bytes:
    return b"p|%s|%s" % (entity.encode(), key.encode())


# -- reading, in event-time order ------------------------------------------
def _ordered(consumer: Consumer, topic: str, ranges: dict[int, tuple[int, int]]) -> Iterator[Any]:
    """The messages of every partition's range, merged by (event time, partition, offset)
    whatever order the fetches return them in. Messages that are not valid events have no
    event time; they go first among what is buffered (they touch no state)."""
    todo = {p: (lo, hi) for p, (lo, hi) in ranges.items() if hi > lo}
    consumer.assign([TopicPartition(topic, p, lo) for p, (lo, _) in todo.items()])
    buffers: dict[int, deque] = {p: deque() for p in todo}
    remaining = {p: hi - lo for p, (lo, hi) in todo.items()}

    def event_time(msg: Any) -> int:
        try:
            ts = orjson.loads(msg.value()).get("ts")
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return -1
        return ts if isinstance(ts, int) else -1

    def fill() -> None:
        idle_since = time.monotonic()
        while any(remaining[p] and not buffers[p] for p in remaining):
            batch = consumer.consume(1000, timeout=1.0)
            for msg in batch:
                if msg.error():
                    continue
                p = msg.partition()
                if remaining.get(p, 0) <= 0 or msg.offset() >= todo[p][1]:
                    continue
                buffers[p].append((event_time(msg), msg))
                remaining[p] -= 1
                if remaining[p] == 0:
                    consumer.pause([TopicPartition(topic, p)])
            if batch:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 60:
                missing = {p: n for p, n in remaining.items() if n}
                raise ReplayError(f"no records from {topic} for 60s; still expected {missing} (partition: records). "
                                  "Were they deleted by retention meanwhile?")

    heads: list[tuple[int, int, int]] = []
    fill()
    for p, buffer in buffers.items():
        if buffer:
            heads.append((buffer[0][0], p, buffer[0][1].offset()))
    heapq.heapify(heads)
    while heads:
        _, p, _ = heapq.heappop(heads)
        yield buffers[p].popleft()[1]
        if not buffers[p] and remaining[p]:
            fill()
        if buffers[p]:
            ts, msg = buffers[p][0]
            heapq.heappush(heads, (ts, p, msg.offset()))


def _examples_by_label_time(settings: Settings, limit: int | None) -> tuple[list[tuple[int, int, dict]], int]:
    """The training examples among the first ``limit`` records of their topic (all if None),
    as a heap by label time, and how many records were read."""
    heap = []
    read = 0
    for key, value in read_topic(settings, settings.examples_topic):
        if limit is not None and read >= limit:
            break
        read += 1
        if key == b"control" or value is None:
            continue
        example = orjson.loads(value)
        heap.append((example["label_ts"], read, example))
    heapq.heapify(heap)
    return heap, read


# -- the run ---------------------------------------------------------------
def _initial_models(settings: Settings, model_file: Path | None) -> tuple[ModelSet, str]:
    if model_file is not None:
        return ModelSet.from_bytes(model_file.read_bytes()), str(model_file)
    from streams.learning import latest_checkpoint

    raw = latest_checkpoint(settings.bootstrap_servers, settings.checkpoint_topic, settings.app_id.encode())
    if raw is None:
        raise ReplayError(f"no model checkpoint in {settings.checkpoint_topic}: give --model "
                          "(a file from `abuse-detector bootstrap`)")
    return ModelSet.from_bytes(raw), f"topic {settings.checkpoint_topic}"


def run_replay(settings: Settings, topic: str, start: str, end: str, run_id: str,
               model_file: Path | None = None, rules_file: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Replays [start, end) of ``topic``; returns the run's summary."""
    outputs = ReplayTopics.of(settings, run_id)
    directory = state_dir(settings, run_id)
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": consumer_group(settings, run_id),
                         "enable.auto.commit": False, "auto.offset.reset": "earliest", "log_level": 3})
    state = ReplayState(directory)
    producer = None
    try:
        asked = {"topic": topic, "from": start, "to": end, "model": str(model_file) if model_file else None,
                 "rules": str(rules_file) if rules_file else None}
        manifest = state.meta(_MANIFEST)
        if manifest is None:
            ranges = resolve_range(consumer, topic, Position.parse(start), Position.parse(end))
            models, model_source = _initial_models(settings, model_file)
            rules = load_rules(rules_file)
            detector = Detector(models, rules=StaticRules(rules))
            examples, examples_known = _examples_by_label_time(settings, None)
            manifest = {"format": FORMAT, "asked": asked, "ranges": {str(p): r for p, r in ranges.items()},
                        "model_source": model_source, "model_version": models.champion.version,
                        "rules_version": rules.version, "examples_known": examples_known,
                        "outputs": outputs.all(), "started_at": int(time.time() * 1000), "complete": False}
            state.db.put(_MANIFEST, orjson.dumps(manifest))
            progress = {"next": {str(p): lo for p, (lo, _) in ranges.items()}, "events": 0, "rejected": 0,
                        "alerts": 0, "examples_applied": 0}
        else:
            if manifest.get("format") != FORMAT:
                raise ReplayError(f"run {run_id!r} was written by another version (state format "
                                  f"{manifest.get('format')}, this one reads {FORMAT}): "
                                  f"`abuse-detector replay clean --run-id {run_id}` and start it again")
            if manifest["asked"] != asked:
                raise ReplayError(f"run {run_id!r} exists with other arguments {manifest['asked']}; "
                                  f"resume it with those, or `abuse-detector replay clean --run-id {run_id}`")
            progress = state.meta(_PROGRESS)
            detector = state.meta(_DETECTOR)
            if manifest["complete"]:
                return {**manifest, **progress, "resumed": True}
            examples, _ = _examples_by_label_time(settings, manifest["examples_known"])
        _create_outputs(settings, topic, outputs)
        ranges = {int(p): (progress["next"][p], hi) for p, (_, hi) in manifest["ranges"].items()}
        total = sum(hi - lo for lo, hi in (tuple(r) for r in manifest["ranges"].values()))
        done_before = total - sum(hi - lo for lo, hi in ranges.values())
        for _ in range(progress["examples_applied"]):  # already in the stored reputations
            heapq.heappop(examples)
        producer = make_producer(settings)
        started, shown, since_checkpoint, processed = time.monotonic(), 0.0, 0, 0

        def checkpoint() -> None:
            if producer.flush(60):
                raise ReplayError("Kafka did not acknowledge the replay's outputs within 60s; run it again to resume")
            state.checkpoint(progress, detector)
            consumer.commit(offsets=[TopicPartition(topic, int(p), o) for p, o in progress["next"].items()],
                            asynchronous=False)

        batch: list[Extracted] = []

        def score_batch() -> None:
            for scored in detector.score_many(batch, now_ms=None, with_json=True):  # stamped with event time
                for name, raw in scored.updates.items():
                    state.put(_record_key(name, scored.keys[name]), raw)
                risk_score = scored.risk_score
                producer.produce(outputs.scores, key=risk_score["event_id"].encode(), value=scored.risk_score_json)
                if scored.alert is not None:
                    producer.produce(outputs.alerts, key=risk_score["user_id"].encode(), value=scored.alert_json)
                    progress["alerts"] += 1
                progress["events"] += 1
                producer.poll(0)
            batch.clear()

        for msg in _ordered(consumer, topic, ranges):
            extracted = _extract_one(msg, detector, state, producer, outputs, examples, progress,
                                     settings.max_event_bytes)
            if extracted is not None:
                batch.append(extracted)
            progress["next"][str(msg.partition())] = msg.offset() + 1
            since_checkpoint += 1
            processed += 1
            if len(batch) >= BATCH_EVENTS or since_checkpoint >= CHECKPOINT_EVERY:
                score_batch()
            if since_checkpoint >= CHECKPOINT_EVERY:
                checkpoint()
                since_checkpoint = 0
            now = time.monotonic()
            if not quiet and now - shown >= 1.0:
                shown = now
                _show_progress(done_before + processed, total, processed, now - started)
        score_batch()
        checkpoint()
        if not quiet:
            _show_progress(done_before + processed, total, processed, time.monotonic() - started)
            print(file=sys.stderr)
        manifest["complete"] = True
        state.db.put(_MANIFEST, orjson.dumps(manifest))
        return {**manifest, **progress, "resumed": done_before > 0}
    finally:
        if producer is not None:
            producer.flush(10)  # what it scored since the last checkpoint is produced again on resume anyway
        state.close()
        consumer.close()


def _extract_one(msg: Any, detector: Detector, state: ReplayState, producer: Any, outputs: ReplayTopics,
                 examples: list, progress: dict[str, Any], max_event_bytes: int) -> Extracted | None:
    """An event's features over the state so far (its records stored at once, for the next
    events); the models score it with its batch. An invalid event goes to dead letters."""
    try:
        event = decode_event(msg.value(), max_event_bytes)  # the live worker's bound
    except ContractViolation as violation:
        record = dead_letter(violation, value=msg.value(), key=msg.key(), topic=msg.topic(),
                             partition=msg.partition(), offset=msg.offset(), now_ms=msg.timestamp()[1])
        producer.produce(outputs.dead_letters, key=msg.key(), value=orjson.dumps(record))
        progress["rejected"] += 1
        return None
    # Labels change only reputations, which only extraction reads: revealing them here, in
    # event-time order, is exact although the batch is scored later.
    while examples and examples[0][0] <= event["ts"]:
        _, _, example = heapq.heappop(examples)
        for d in detector.reputation_deltas(example):
            key = _reputation_key(d.entity, d.key)
            state.put(key, add_label_stored(state.get(key), d.label_ts, d.delta))
        progress["examples_applied"] += 1
    keys = entity_keys(event)
    states = {name: EntityState(state.get(_record_key(name, key)), reputation=state.get(_reputation_key(name, key)))
              for name, key in keys.items()}
    extraction = extract(event, states)
    for name, raw in extraction.updates.items():
        state.put(_record_key(name, keys[name]), raw)
    return event, states, extraction


def _show_progress(done: int, total: int, processed: int, elapsed: float) -> None:
    rate = processed / max(elapsed, 1e-9)
    eta = (total - done) / rate if rate else 0.0
    print(f"\r  {done / max(total, 1):6.1%}  {done:,}/{total:,} records  {rate:,.0f} events/s  ETA {eta:,.0f}s   ",
          end="", file=sys.stderr)


def _create_outputs(settings: Settings, topic: str, outputs: ReplayTopics) -> None:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    existing = admin.list_topics(timeout=10).topics
    partitions = len(existing[topic].partitions)
    wanted = [NewTopic(name, partitions, 1) for name in outputs.all() if name not in existing]
    if not wanted:
        return
    for future in admin.create_topics(wanted, operation_timeout=30).values():
        future.result()


# -- compare ---------------------------------------------------------------
def compare_replay(settings: Settings, run_id: str, chart: Path | None = None) -> dict[str, Any]:
    """What the replay would have changed against what live emitted for the same events."""
    outputs = ReplayTopics.of(settings, run_id)
    replayed = {}
    for _, value in read_topic(settings, outputs.scores):
        score = orjson.loads(value)
        replayed[score["event_id"]] = score
    if not replayed:
        raise ReplayError(f"no replay outputs in {outputs.scores}: run `abuse-detector replay ... --run-id {run_id}` first")
    live = {}
    for _, value in read_topic(settings, settings.scores_topic):
        score = orjson.loads(value)
        if score["event_id"] in replayed:
            live[score["event_id"]] = score
    live_alerts = {a["event_id"]: a for a in map(orjson.loads, (v for _, v in read_topic(settings, settings.alerts_topic)))
                   if a["event_id"] in replayed}
    replay_alerts = {a["event_id"]: a for a in map(orjson.loads, (v for _, v in read_topic(settings, outputs.alerts)))}
    both = sorted(set(live) & set(replayed))
    shifts = [replayed[e]["score"] - live[e]["score"] for e in both]
    added = sorted(set(replay_alerts) - set(live_alerts))
    removed = sorted(set(live_alerts) - set(replay_alerts))
    rules: dict[str, dict[str, int]] = {}
    for e in both:
        before, after = set(live[e]["matched_rules"]), set(replayed[e]["matched_rules"])
        for name in before | after:
            row = rules.setdefault(name, {"live": 0, "replay": 0, "added": 0, "removed": 0})
            row["live"] += name in before
            row["replay"] += name in after
            row["added"] += name in after - before
            row["removed"] += name in before - after
    detectors = {}
    for name in ("model", "anomaly", "rules", "content"):
        deltas = [replayed[e]["detectors"][name] - live[e]["detectors"][name] for e in both]
        detectors[name] = {"mean_shift": round(sum(deltas) / len(deltas), 6) if deltas else 0.0,
                           "changed": sum(abs(d) > 1e-6 for d in deltas)}
    ordered = sorted(abs(s) for s in shifts)
    report = {
        "run_id": run_id,
        "replayed_events": len(replayed),
        "compared_with_live": len(both),
        "not_scored_live": len(replayed) - len(both),
        "alerts": {"live": len(live_alerts), "replay": len(replay_alerts), "added": len(added), "removed": len(removed),
                   "added_examples": added[:10], "removed_examples": removed[:10]},
        "score_shift": {"mean": round(sum(shifts) / len(shifts), 6) if shifts else 0.0,
                        "p95_abs": round(ordered[int(0.95 * (len(ordered) - 1))], 6) if ordered else 0.0,
                        "max_abs": round(ordered[-1], 6) if ordered else 0.0,
                        "changed": sum(s > 1e-6 for s in ordered)},
        "rules": rules,
        "detectors": detectors,
        "model_versions": {"live": sorted({live[e]["model_version"] for e in both})[:5],
                           "replay": sorted({replayed[e]["model_version"] for e in replayed})[:5]},
        "rules_versions": {"live": sorted({live[e]["rules_version"] for e in both}),
                           "replay": sorted({replayed[e]["rules_version"] for e in replayed})},
    }
    if chart is not None and both:
        _plot_compare([live[e]["score"] for e in both], [replayed[e]["score"] for e in both], shifts, chart)
        report["chart"] = str(chart)
    return report


def _plot_compare(live: list[float], replay: list[float], shifts: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (scatter, hist) = plt.subplots(1, 2, figsize=(12, 5))
    scatter.scatter(live, replay, s=4, alpha=0.4)
    scatter.plot([0, 1], [0, 1], color="grey", linewidth=1)
    scatter.set(xlabel="live score", ylabel="replay score", title="Score per event: live vs replay",
                xlim=(0, 1), ylim=(0, 1))
    hist.hist(shifts, bins=50, log=True)
    hist.set(xlabel="replay score - live score", ylabel="events (log)", title="Score shifts")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_comparison(report: dict[str, Any]) -> None:
    alerts, shift = report["alerts"], report["score_shift"]
    print(f"replay {report['run_id']}: {report['replayed_events']} events replayed, "
          f"{report['compared_with_live']} compared with live ({report['not_scored_live']} never scored live)")
    print(f"  {'':24s}{'live':>10s}{'replay':>10s}{'added':>10s}{'removed':>10s}")
    print(f"  {'alerts':24s}{alerts['live']:>10d}{alerts['replay']:>10d}{alerts['added']:>10d}{alerts['removed']:>10d}")
    for name, row in sorted(report["rules"].items()):
        print(f"  {'rule ' + name:24s}{row['live']:>10d}{row['replay']:>10d}{row['added']:>10d}{row['removed']:>10d}")
    print(f"  score shift: mean {shift['mean']:+.4f}, p95 |shift| {shift['p95_abs']:.4f}, max {shift['max_abs']:.4f}, "
          f"{shift['changed']} events changed")
    for name, row in report["detectors"].items():
        print(f"  detector {name:10s} mean shift {row['mean_shift']:+.4f} on {row['changed']} events")
    print(f"  models live {report['model_versions']['live']} -> replay {report['model_versions']['replay']}")
    print(f"  rules live {report['rules_versions']['live']} -> replay {report['rules_versions']['replay']}")
    if report.get("chart"):
        print(f"  chart: {report['chart']}")


# -- clean -----------------------------------------------------------------
def clean_replay(settings: Settings, run_id: str) -> list[str]:
    """Deletes a run's topics, consumer group and state; returns what it removed."""
    outputs = ReplayTopics.of(settings, run_id)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    existing = set(admin.list_topics(timeout=10).topics)
    topics = [t for t in outputs.all() if t in existing]
    delete_topics(settings, topics)
    removed = list(topics)
    group = consumer_group(settings, run_id)
    try:
        for future in admin.delete_consumer_groups([group], request_timeout=10).values():
            future.result()
        removed.append(f"consumer group {group}")
    except Exception:  # a run interrupted before its first checkpoint has no group
        pass
    directory = state_dir(settings, run_id)
    if directory.exists():
        shutil.rmtree(directory)
        removed.append(str(directory))
    return removed
