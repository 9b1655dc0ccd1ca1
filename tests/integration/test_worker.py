"""The whole path on a real Apache Kafka broker: events in, scores/alerts/dead letters out,
labels train the model, per-user state survives restarts."""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.request

import orjson
import pytest

import schemas
from detectors.rules import load_rules
from tests.integration.helpers import T0, as_record, benign_post, event, moderator_label, stuffing_login

pytestmark = pytest.mark.integration

THRESHOLD = load_rules(None).policy.threshold
MINUTE = 60_000


def test_events_in_scores_and_alerts_out(settings, worker, reader, produce):
    scores = reader(settings.scores_topic)
    alerts = reader(settings.alerts_topic)
    # Teach the model the difference first: scored events, then their labels.
    train = [stuffing_login(i, f"victim-{i}") for i in range(30)] + [benign_post(i, f"user-{i % 5}") for i in range(30)]
    produce(settings.events_topic, [as_record(e) for e in train])
    scores.wait_for(lambda r: len(r) >= 60, worker=worker)
    labels = [moderator_label(e, e["ts"] + MINUTE) for e in train]
    produce(settings.labels_topic, labels)

    # The worker learns from labels asynchronously; keep sending attacks until one alerts.
    sent = 0
    def alerted(records: list) -> bool:
        return len(records) > 0
    for round_ in range(20):
        batch = [stuffing_login(1000 + round_ * 10 + i, f"victim2-{round_}-{i}") for i in range(10)]
        produce(settings.events_topic, [as_record(e) for e in batch])
        sent += len(batch)
        try:
            alerts.wait_for(alerted, timeout=3, worker=worker)
            break
        except AssertionError:
            continue
    assert alerts.records, f"no alert after {sent} attack events:\n{worker.log()[-3000:]}"

    all_scores = scores.wait_for(lambda r: len(r) >= 60 + sent, worker=worker)
    for key, record, _, _ in all_scores:
        schemas.check("risk_score", record)
        assert key == record["event_id"].encode()
        assert 0.0 <= record["score"] <= 1.0
    for key, record, _, _ in alerts.records:
        schemas.check("alert", record)
        assert key == record["user_id"].encode()
        assert record["score"] >= THRESHOLD
        assert record["event_id"].startswith("bad-")
        assert record["reasons"], "an alert must say why"
    # Benign posts scored after learning stay low.
    produce(settings.events_topic, [as_record(benign_post(5000, "user-1"))])
    late = scores.wait_for(lambda r: any(x[1]["event_id"] == "good-5000" for x in r), worker=worker)
    benign = next(x[1] for x in late if x[1]["event_id"] == "good-5000")
    assert benign["score"] < THRESHOLD


def test_malformed_events_go_to_dead_letters_with_reason(settings, worker, reader, produce):
    dead = reader(settings.dead_letter_topic)
    scores = reader(settings.scores_topic)
    good = event("ok-1", "login", T0, "u1", success=True)
    missing = dict(good, event_id="m-1")
    del missing["user_id"]
    cases = {
        b"{not json": "not_json",
        orjson.dumps([good]): "not_an_object",
        orjson.dumps(dict(good, event_id="t-1", ts="yesterday")): "invalid_field",
        orjson.dumps(missing): "missing_field",
        orjson.dumps(dict(good, event_id="u-1", type="teleport")): "unknown_type",
        orjson.dumps(dict(good, event_id="v-1", schema_version=9)): "unsupported_schema_version",
        orjson.dumps(dict(good, event_id="o-1", type="post", text="x" * (settings.max_event_bytes + 10))): "oversized",
        orjson.dumps(dict(good, event_id="p-1", type="payment", amount=-3, currency="USD", merchant_id="m")): "invalid_field",
        orjson.dumps(dict(good, event_id="q-1", type="payment", amount=3, currency="USD")): "missing_field",
    }
    produce(settings.events_topic, [(b"k", raw) for raw in cases] + [as_record(good)])
    produce(settings.labels_topic, [(b"x", b'{"event_id": "x", "label": "maybe"}')])
    records = dead.wait_for(lambda r: len(r) >= len(cases) + 1, worker=worker)
    by_value = {base64.b64decode(r["value_b64"]): r for _, r, _, _ in records}
    for raw, reason in cases.items():
        assert raw in by_value, f"{raw[:60]!r} was not dead-lettered"
        letter = by_value[raw]
        schemas.check("dead_letter", letter)
        assert letter["reason"] == reason, (raw[:60], letter)
        assert letter["source_topic"] == settings.events_topic
        assert letter["error"]
        assert letter["offset"] >= 0 and letter["partition"] in range(settings.partitions)
    label_letter = by_value[b'{"event_id": "x", "label": "maybe"}']
    assert label_letter["source_topic"] == settings.labels_topic
    # The valid event in the same batch was scored; nothing valid was dead-lettered.
    scores.wait_for(lambda r: any(x[1]["event_id"] == "ok-1" for x in r), worker=worker)
    assert len(dead.records) == len(cases) + 1
    assert worker.alive()


def test_label_after_score_changes_the_model(settings, worker, reader, produce):
    scores = reader(settings.scores_topic)
    probe = stuffing_login(0, "probe-user")
    produce(settings.events_topic, [as_record(probe)])
    before = scores.wait_for(lambda r: len(r) >= 1, worker=worker)[0][1]
    assert before["model_version"].endswith("+0")

    train = [stuffing_login(i, f"v-{i}") for i in range(1, 6)] + [benign_post(i, f"g-{i}") for i in range(1, 6)]
    produce(settings.events_topic, [as_record(e) for e in train])
    scores.wait_for(lambda r: len(r) >= 11, worker=worker)
    produce(settings.labels_topic, [moderator_label(e, T0 + 10 * MINUTE) for e in train])

    # Same features as the probe, new id: scored by the updated model.
    for attempt in range(30):
        # A fresh user and IP, so every entity's features equal the first probe's.
        again = dict(probe, event_id=f"probe-again-{attempt}", user_id=f"probe-user-{attempt}", ip=f"198.51.100.{attempt}")
        produce(settings.events_topic, [as_record(again)])
        after = scores.wait_for(lambda r: any(x[1]["event_id"] == again["event_id"] for x in r), worker=worker)
        rescored = next(x[1] for x in after if x[1]["event_id"] == again["event_id"])
        if rescored["model_version"].endswith("+10"):
            break
    assert rescored["model_version"] == before["model_version"].replace("+0", "+10")
    assert rescored["features"] == before["features"]
    assert rescored["score"] > before["score"] + 0.05, (before["score"], rescored["score"])
    assert rescored["model_ready"] and not before["model_ready"]


@pytest.mark.parametrize("restart", ["stop", "wipe", "crash"], ids=["rocksdb", "changelog-recovery", "crash"])
def test_restart_keeps_per_user_state(settings, worker, reader, produce, restart):
    scores = reader(settings.scores_topic)
    first = [benign_post(i, "steady-user") for i in range(5)]
    produce(settings.events_topic, [as_record(e) for e in first])
    scores.wait_for(lambda r: len(r) >= 5, worker=worker)
    assert max(r[1]["features"]["user_events_1h"] for r in scores.records) == 5

    if restart == "crash":
        # The stores skip RocksDB's write-ahead log (the changelog is theirs): what a
        # crash loses from memory must come back from the changelog, counted once.
        time.sleep(2)  # the changelog records delivered, the input offsets maybe not committed
        worker.kill()
    else:
        worker.stop()
    if restart == "wipe":
        shutil.rmtree(settings.data_dir)  # state must come back from the changelog topic
    worker.start()
    after = _score_of_sixth_post(settings, worker, scores, produce, "steady-user")
    assert after["features"]["user_events_1h"] == 6
    assert after["features"]["user_age_h"] == pytest.approx(5 / 3600)


def test_labels_join_the_scores_of_a_label_join_recovered_from_its_changelog(settings, worker, reader, produce):
    """The label join's changelog keeps where each waiting score is, not the score
    (streams/label_join.py): a worker whose store comes back from the changelog reads the
    scores back from the risk-scores topic when their labels come."""
    scores = reader(settings.scores_topic)
    examples = reader(settings.examples_topic)
    sent = [stuffing_login(i, f"victim-{i}") for i in range(6)] + [benign_post(i, f"user-{i}") for i in range(6)]
    produce(settings.events_topic, [as_record(e) for e in sent])
    scored = {x[1]["event_id"]: x[1] for x in scores.wait_for(lambda r: len(r) >= len(sent), worker=worker)}
    time.sleep(2)  # the join has read the scores back and written their rows
    worker.stop()
    shutil.rmtree(settings.data_dir)  # the label join's rows come back from the changelog only
    worker.start()
    # Each label's score is read back on a thread of its own; an appeal right behind the
    # first label of its event waits for it, and corrects it.
    appealed = sent[0]
    appeal = orjson.dumps({"event_id": appealed["event_id"], "label": "benign", "source": "appeal",
                           "ts": appealed["ts"] + 2 * MINUTE, "schema_version": 1})
    produce(settings.labels_topic, [moderator_label(e, e["ts"] + MINUTE) for e in sent]
            + [(appealed["event_id"].encode(), appeal)])
    learned = examples.wait_for(lambda r: len(r) >= len(sent) + 1, timeout=90, worker=worker)
    assert sorted(x[1]["event_id"] for x in learned) == sorted([*scored, appealed["event_id"]])
    for _, example, _, _ in learned:
        score = scored[example["event_id"]]
        assert (example["features"], example["detectors"]) == (score["features"], score["detectors"])
    of_appealed = [(x[1]["label"], x[1]["previous_label"]) for x in learned if x[1]["event_id"] == appealed["event_id"]]
    assert of_appealed == [("abuse", None), ("benign", "abuse")]
    assert all(x[1]["label"] == ("abuse" if x[1]["event_id"].startswith("bad") else "benign")
               for x in learned if x[1]["event_id"] != appealed["event_id"])
    # Every label joined: their positions commit to the end (a label still read back holds them).
    # The page shows what the join's process last reported (every 0.5 s, streams/join_app.py).
    deadline = time.monotonic() + 20
    while True:
        joined = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/replica/",
                                                   timeout=10).read())["label_join"]
        offsets = joined.get("labels_partitions", {}).get("offsets", {}).values()
        if sum(o["committed"] or 0 for o in offsets) == len(sent) + 1:
            break
        assert time.monotonic() < deadline, joined
        time.sleep(0.5)
    assert joined["alive"] and joined["ready"]
    assert (joined["recovered_scores_read"], joined["recovered_scores_gone"], joined["recovered_scores_waiting"]) \
        == (len(sent), 0, 0)


def _score_of_sixth_post(settings, worker, scores, produce, user: str) -> dict:
    """The risk score of ``user``'s post good-5, produced now (after good-0..4 and a restart)."""
    produce(settings.events_topic, [as_record(benign_post(5, user))])
    records = scores.wait_for(lambda r: any(x[1]["event_id"] == "good-5" for x in r), timeout=90, worker=worker)
    return next(x[1] for x in records if x[1]["event_id"] == "good-5")


def test_events_positions_are_committed_to_the_group_and_a_restart_resumes_there(settings, worker, reader, produce):
    """The events are read outside Faust (streams/follower.py): their positions still reach the
    worker's consumer group (operators watch its lag), and a restarted worker scores no event twice."""
    from streams.kafka.io import PartitionReader

    scores = reader(settings.scores_topic)
    sent = [benign_post(i, f"user-{i % 7}") for i in range(40)]
    produce(settings.events_topic, [as_record(e) for e in sent])
    scores.wait_for(lambda r: len(r) >= 40, worker=worker)
    group = PartitionReader(settings, settings.events_topic, group_id=settings.app_id)
    try:
        partitions = list(range(settings.partitions))
        ends = group.end_offsets(partitions)
        deadline = time.monotonic() + 20
        while group.start_offsets(partitions) != ends:
            assert time.monotonic() < deadline, (group.start_offsets(partitions), ends, worker.log()[-3000:])
            time.sleep(0.5)
    finally:
        group.close()

    worker.stop()
    worker.start()
    produce(settings.events_topic, [as_record(benign_post(40, "user-0"))])
    records = scores.wait_for(lambda r: any(x[1]["event_id"] == "good-40" for x in r), timeout=90, worker=worker)
    time.sleep(2)  # anything re-read would be scored by now
    ids = [x[1]["event_id"] for x in scores.records]
    assert len(ids) == len(set(ids)) == 41, sorted(i for i in ids if ids.count(i) > 1)
    assert records


def test_idle_entities_expire_by_event_time_and_stay_deleted(settings, reader, produce, tmp_path):
    import json
    import urllib.error
    import urllib.request

    from tests.integration.conftest import Worker

    settings = settings.replace(sweep_every_events=5)
    worker = Worker(settings, tmp_path / "logs").start()
    scores = reader(settings.scores_topic)
    try:
        old = [event(f"old-{i}", "login", T0 + i, f"sleeper-{i}", ip="198.51.100.77", success=True) for i in range(3)]
        old.append(event("old-b", "login", T0 + 3, "sleeper-b", ip="198.51.100.78", success=True))
        produce(settings.events_topic, [as_record(e) for e in old])
        scores.wait_for(lambda r: len(r) >= 4, worker=worker)

        def ip_state(ip: str = "198.51.100.77") -> int:
            url = f"http://127.0.0.1:{settings.web_port}/entities/ip/{ip}/"
            try:
                return json.loads(urllib.request.urlopen(url, timeout=10).read())["shards"]
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
                return 0

        assert ip_state() >= 1
        view = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{settings.web_port}/entities/ip/198.51.100.77/", timeout=10).read())
        assert view["state"]["sketches"]["users"] == {"form": "exact", "distinct": 3}  # readable, not packed
        assert sum(b[1 + view["state"]["rings"]["300000"]["channels"].index("logins")]
                   for b in view["state"]["rings"]["300000"]["buckets"]) == 3
        # Nine days of event time later (idle expiry is eight), traffic on every partition.
        later = T0 + 9 * 86_400_000
        fresh = [event(f"new-{i}", "post", later + i, f"active-{i}", ip=f"100.64.9.{i}", text="hello") for i in range(60)]
        produce(settings.events_topic, [as_record(e) for e in fresh])
        scores.wait_for(lambda r: len(r) >= 64, worker=worker)
        deadline = time.monotonic() + 10
        while (ip_state() or ip_state("198.51.100.78")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ip_state() == 0 and ip_state("198.51.100.78") == 0, "the idle IPs were not expired"

        # An expired IP that comes back starts afresh: nothing the worker kept of its record
        # (the stored bytes it read or wrote) outlives the deletion.
        produce(settings.events_topic, [as_record(event("back", "login", later + 50, "sleeper-b",
                                                         ip="198.51.100.78", success=True))])
        back = scores.wait_for(lambda r: any(x[1]["event_id"] == "back" for x in r), worker=worker)
        features = next(x[1] for x in back if x[1]["event_id"] == "back")["features"]
        assert features.get("ip_age_h", 0.0) == 0.0, "the returning IP was read as it was before its expiry"
        assert ip_state("198.51.100.78") >= 1

        worker.stop()  # deleted means deleted, also after a restart that restores from the changelog
        shutil.rmtree(settings.data_dir)
        worker.start()
        produce(settings.events_topic, [as_record(event("after", "post", later + 100, "active-0", ip="100.64.9.0", text="x"))])
        scores.wait_for(lambda r: any(x[1]["event_id"] == "after" for x in r), timeout=90, worker=worker)
        time.sleep(1)
        assert ip_state() == 0
    finally:
        worker.stop()


def test_a_record_extraction_cannot_read_dead_letters_its_events_and_the_batch_goes_on(settings, reader, produce,
                                                                                       tmp_path):
    """A detector bug meets one user's stored record (here the record is corrupted in its
    changelog and restored from there): each of that user's events goes to the dead-letter topic
    as a processing error, every other event of the same batches is scored, and the worker
    keeps going."""
    from confluent_kafka import Consumer

    from streams.app import table_name
    from tests.integration.conftest import Worker

    worker = Worker(settings, tmp_path / "logs").start()
    scores = reader(settings.scores_topic)
    dead = reader(settings.dead_letter_topic)
    try:
        produce(settings.events_topic, [as_record(event("first", "login", T0, "broken", success=True))])
        scores.wait_for(lambda r: any(x[1]["event_id"] == "first" for x in r), worker=worker)
        worker.stop()

        changelog = f"{settings.app_id}-{table_name('user')}-changelog"
        stored = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"check-{settings.app_id}",
                           "auto.offset.reset": "earliest"})
        stored.subscribe([changelog])
        try:
            written = [m for m in stored.consume(50, timeout=10) if not m.error()]
        finally:
            stored.close()
        assert [m.key() for m in written] == [b"broken"], "the user's record is not where this test corrupts it"
        assert "l" in orjson.loads(written[0].value()), "the changelog holds the record as the worker stores it"
        produce(changelog, [(b"broken", b"{}")])  # valid JSON, but no record extraction can read
        shutil.rmtree(settings.data_dir)  # restored from the changelog on start
        worker.start()

        batch = [event(f"b-{i}", "login", T0 + 1_000 + i, "broken" if i % 3 == 0 else f"fine-{i}", success=True)
                 for i in range(12)]
        produce(settings.events_topic, [as_record(e) for e in batch])
        broken = {e["event_id"] for e in batch if e["user_id"] == "broken"}
        fine = {e["event_id"] for e in batch} - broken
        scores.wait_for(lambda r: fine <= {x[1]["event_id"] for x in r}, worker=worker)
        letters = dead.wait_for(lambda r: len(r) >= len(broken), worker=worker)
        by_event = {orjson.loads(base64.b64decode(r["value_b64"]))["event_id"]: r for _, r, _, _ in letters}
        assert set(by_event) == broken
        for letter in by_event.values():
            schemas.check("dead_letter", letter)
            assert letter["reason"] == "processing_error"
            assert "KeyError" in letter["error"], letter["error"]
            assert letter["source_topic"] == settings.events_topic
        assert not broken & {x[1]["event_id"] for x in scores.records}

        produce(settings.events_topic, [as_record(event("after", "login", T0 + 5_000, "fine-1", success=True))])
        scores.wait_for(lambda r: any(x[1]["event_id"] == "after" for x in r), worker=worker)
        assert len(dead.records) == len(broken)
        assert worker.alive()
    finally:
        worker.stop()


@pytest.mark.parametrize("restart", ["stop", "crash"])
def test_records_held_between_writes_are_written_before_their_positions_commit(settings, reader, produce, tmp_path,
                                                                                restart):
    """A worker holds changed records for up to state_write_interval_s, here far longer than
    the commit interval. The periodic commits do not write them (round 24): they commit each
    partition only up to its first event whose changes are held. Only a shutdown (or a
    rebalance) writes them all before committing. Were it to commit past them, the restarted
    worker would resume after events whose state is lost: the user would count 1 event, not 6."""
    from streams.app import table_name
    from streams.kafka.io import PartitionReader
    from tests.integration.conftest import Worker

    settings = settings.replace(state_write_interval_s=600.0)
    worker = Worker(settings, tmp_path / "logs").start()
    scores = reader(settings.scores_topic)
    try:
        produce(settings.events_topic, [as_record(benign_post(i, "held-user")) for i in range(5)])
        scores.wait_for(lambda r: len(r) >= 5, worker=worker)
        if restart == "crash":
            time.sleep(3)  # past commits (every second)
            partitions = list(range(settings.partitions))
            changelog = PartitionReader(settings, f"{settings.app_id}-{table_name('user')}-changelog", group_id="unused")
            group = PartitionReader(settings, settings.events_topic, group_id=settings.app_id)
            try:
                assert sum(changelog.end_offsets(partitions).values()) == 0  # still held: not written
                committed = group.start_offsets(partitions)
            finally:
                changelog.close()
                group.close()
            partition = reader(settings.events_topic).wait_for(lambda r: len(r) == 5)[0][2]
            assert committed[partition] == 0, committed  # the first held change's offset, not past the 5
            worker.kill()
        else:
            worker.stop()  # most likely before a commit: the records are still held
            # Written while the stores were open (Faust closes them before on_before_shutdown),
            # and the positions committed: nothing left for a restart to score again.
            assert "committing the input positions at shutdown failed" not in worker.log()
            changelog = reader(f"{settings.app_id}-{table_name('user')}-changelog")
            changelog.wait_for(lambda r: any(key == b"held-user" for key, *_ in r), timeout=20)
        shutil.rmtree(settings.data_dir)  # the state must come back from the changelog
        worker.start()
        assert _score_of_sixth_post(settings, worker, scores, produce, "held-user")["features"]["user_events_1h"] == 6
    finally:
        worker.stop()


def test_a_starting_worker_answers_entity_views_with_503_until_its_partitions_are_restored(settings, tmp_path):
    """An entity view asked of a worker that has no partitions yet, or is restoring them, gets
    a 503 to retry, never a partial view, and never stops the worker (before the 503, the view
    waited for the shard replica, which has nothing to follow before the partitions come, for
    up to 300 s with the worker stopped)."""
    import json
    import urllib.error
    import urllib.request

    from tests.integration.conftest import Worker

    worker = Worker(settings, tmp_path / "logs").start()
    url = f"http://127.0.0.1:{settings.web_port}/entities/ip/192.0.2.1/"
    answers: list[object] = []
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=10)
                answers.append(200)
            except urllib.error.HTTPError as exc:
                answers.append((exc.code, json.loads(exc.read())["error"]))
                if exc.code != 503:
                    break
            except OSError:  # its web server is not up yet
                if answers:
                    answers.append("no answer")
                    break
            time.sleep(0.05)
    finally:
        worker.stop()
    assert answers and answers[-1] == (404, "no state for ip:192.0.2.1"), answers[-3:]
    assert all(a[0] == 503 and "retry" in a[1] for a in answers[:-1]), answers  # type: ignore[index]
