"""Model lifecycle and rules on the real broker: a restarted worker (even on an empty
disk) keeps what it learned; a new worker starts from a bootstrap model; a rules file edit takes effect in a running worker
within seconds; promotion reaches the worker through the training feed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.conftest import Worker
from tests.integration.helpers import (T0, as_record, benign_post, bootstrap_model_file, event, moderator_label,
                                       stuffing_login)
from streams.demo import settings_env

pytestmark = pytest.mark.integration


def _attack(i: int) -> dict:
    return stuffing_login(i, f"victim-{i}")


def _benign(i: int) -> dict:
    return benign_post(i, f"user-{i % 5}")


def _models(worker: Worker) -> dict:
    deadline = time.monotonic() + 60
    while True:  # the web server comes up with the worker
        try:
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{worker.settings.web_port}/models/",
                                                     timeout=10).read())
        except OSError:
            if time.monotonic() > deadline or not worker.alive():
                raise
            time.sleep(0.5)


def _train(settings, worker, reader, produce, n: int = 30) -> None:
    scores = reader(settings.scores_topic)
    train = [_attack(i) for i in range(n)] + [_benign(i) for i in range(n)]
    produce(settings.events_topic, [as_record(e) for e in train])
    scores.wait_for(lambda r: len(r) >= 2 * n, worker=worker)
    produce(settings.labels_topic, [moderator_label(e, e["ts"] + 60_000) for e in train])
    deadline = time.monotonic() + 60
    while _models(worker)["examples"] < 2 * n:
        assert time.monotonic() < deadline, _models(worker)
        time.sleep(0.5)


def test_restart_on_an_empty_disk_keeps_the_learned_model(settings, worker, reader, produce):
    _train(settings, worker, reader, produce)
    before = _models(worker)
    assert before["champion"]["version"].endswith("+60")
    time.sleep(11)  # at least one periodic checkpoint (every 10 s) after the last example

    worker.stop()
    shutil.rmtree(settings.data_dir)  # no local checkpoint: it must come from the checkpoint topic
    worker.start()
    scores = reader(settings.scores_topic)
    probe = _attack(999)
    produce(settings.events_topic, [as_record(probe)])
    record = scores.wait_for(lambda r: any(x[1]["event_id"] == probe["event_id"] for x in r), timeout=90, worker=worker)
    rescored = next(x[1] for x in record if x[1]["event_id"] == probe["event_id"])
    after = _models(worker)
    assert after["restored_from"].startswith("topic"), after["restored_from"]
    assert after["champion"]["version"] == before["champion"]["version"]
    assert after["champion"]["roc_auc"] == before["champion"]["roc_auc"]
    assert rescored["model_version"] == before["champion"]["version"] and rescored["model_ready"]
    assert rescored["detectors"]["model"] > 0.8


def test_rules_file_change_takes_effect_within_seconds(settings, reader, produce, tmp_path):
    rules = tmp_path / "rules.toml"
    base = '''version = "v1"
[policy]
threshold = 0.8
cooldown_minutes = 0
'''
    rules.write_text(base)
    worker = Worker(settings.replace(rules_file=str(rules)), tmp_path / "logs").start()
    scores = reader(settings.scores_topic)
    alerts = reader(settings.alerts_topic)
    try:
        produce(settings.events_topic, [as_record(event("before", "signup", T0, "farm-0", device_id="farm"))])
        first = scores.wait_for(lambda r: len(r) >= 1, worker=worker)[0][1]
        assert first["matched_rules"] == [] and first["rules_version"].startswith("v1#")

        rules.write_text(base.replace('"v1"', '"v2"') + '''
[[rule]]
name = "farm_device"
description = "signups from a device farm"
event_types = ["signup"]
severity = "critical"
when = [{ feature = "device_signups_10m", op = ">=", value = 2 }]
''')
        changed = time.monotonic()
        i = 0
        while True:  # one signup a second until the new rule shows up in a score
            i += 1
            produce(settings.events_topic, [as_record(event(f"after-{i}", "signup", T0 + i * 1000, f"farm-{i}",
                                                            device_id="farm"))])
            records = scores.wait_for(lambda r: any(x[1]["event_id"] == f"after-{i}" for x in r), worker=worker)
            latest = next(x[1] for x in records if x[1]["event_id"] == f"after-{i}")
            if latest["rules_version"].startswith("v2#"):
                break
            assert time.monotonic() - changed < 10, "the rules change did not reach the worker within 10 s"
            time.sleep(1)
        assert latest["matched_rules"] == ["farm_device"] and latest["score"] >= 0.95
        alert = alerts.wait_for(lambda r: len(r) >= 1, worker=worker)[0][1]
        assert alert["severity"] == "critical" and alert["matched_rules"] == ["farm_device"]
        print(f"rules change visible after {time.monotonic() - changed:.1f}s")

        rules.write_text("this is [not toml")  # a broken edit keeps the last good rules
        time.sleep(2)
        assert _models(worker)["rules_version"].startswith("v2#") and "not valid TOML" in _models(worker)["rules_error"]
    finally:
        worker.stop()


def _scored(scores, event_id: str, worker: Worker) -> dict:
    records = scores.wait_for(lambda r: any(x[1]["event_id"] == event_id for x in r), timeout=90, worker=worker)
    return next(x[1] for x in records if x[1]["event_id"] == event_id)


def _probe_from_the_ip_of(e: dict, after_ms: int) -> dict:
    """Another user's event from ``e``'s IP, ``after_ms`` later."""
    return {**e, "event_id": f"probe-{e['event_id']}", "user_id": "someone-else", "ts": e["ts"] + after_ms}


def test_a_label_changes_the_reputation_the_next_event_is_scored_with(settings, worker, reader, produce):
    """The learner writes the reputation; the scoring thread, which read the IP's absence
    when it scored the labelled event, reads it again once the learner says it changed."""
    scores = reader(settings.scores_topic)
    first = _attack(7)
    produce(settings.events_topic, [as_record(first)])
    assert "ip_abuse_labels_1d" not in _scored(scores, first["event_id"], worker)["features"]
    produce(settings.labels_topic, [moderator_label(first, first["ts"] + 60_000)])
    deadline = time.monotonic() + 60
    while _models(worker)["learner"]["reputations_at_example"] < 0:  # as the scoring thread's reader sees it
        assert time.monotonic() < deadline, _models(worker)
        time.sleep(0.2)
    probe = _probe_from_the_ip_of(first, after_ms=120_000)
    produce(settings.events_topic, [as_record(probe)])
    features = _scored(scores, probe["event_id"], worker)["features"]
    assert features["ip_abuse_labels_1d"] == 1.0 and features["ip_abuse_labels_28d"] == 1.0


def test_a_learner_that_dies_is_started_again_and_the_worker_scores_meanwhile(settings, worker, reader, produce):
    _train(settings, worker, reader, produce, n=10)
    before = _models(worker)
    os.kill(before["learner"]["pid"], signal.SIGKILL)

    scores = reader(settings.scores_topic)
    more = [_attack(i) for i in range(100, 110)] + [_benign(i) for i in range(100, 110)]
    produce(settings.events_topic, [as_record(e) for e in more])
    scores.wait_for(lambda r: len(r) >= 20, worker=worker)  # scored while the learner was gone or starting
    produce(settings.labels_topic, [moderator_label(e, e["ts"] + 60_000) for e in more])
    deadline = time.monotonic() + 60
    while _models(worker)["examples"] < 40:
        assert time.monotonic() < deadline, _models(worker)
        time.sleep(0.5)
    after = _models(worker)
    assert after["learner"]["restarts"] == 1 and after["learner"]["alive"]
    assert after["learner"]["pid"] != before["learner"]["pid"]
    assert after["champion"]["version"].endswith("+40"), after["champion"]
    assert "learner process exited" in worker.log()
    # the new learner wrote the reputations of the labels after it; the worker reads them
    probe = _probe_from_the_ip_of(more[0], after_ms=120_000)
    produce(settings.events_topic, [as_record(probe)])
    assert _scored(scores, probe["event_id"], worker)["features"]["ip_abuse_labels_1d"] == 1.0


def test_promotion_reaches_the_worker_through_the_feed(settings, worker):
    before = _models(worker)
    env = settings_env(settings)
    result = subprocess.run([sys.executable, "-m", "streams.cli", "model", "promote"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 30
    while _models(worker)["champion"]["version"].split("/")[0] == before["champion"]["version"].split("/")[0]:
        assert time.monotonic() < deadline, _models(worker)
        time.sleep(0.5)
    after = _models(worker)
    assert after["champion"]["version"].split("+")[0] == before["challenger"]["version"].split("+")[0]
    assert after["promotions"] == [after["champion"]["version"].split("/")[0]]


def test_a_new_worker_starts_from_the_bootstrap_model(settings, reader, produce, tmp_path):
    model_file = tmp_path / "warm.models"
    models, report = bootstrap_model_file(model_file)

    worker = Worker(settings.replace(warm_start=str(model_file)), tmp_path / "logs").start()
    try:
        scores = reader(settings.scores_topic)
        probe = _attack(999)
        produce(settings.events_topic, [as_record(probe)])
        records = scores.wait_for(lambda r: any(x[1]["event_id"] == probe["event_id"] for x in r), timeout=90,
                                  worker=worker)
        scored = next(x[1] for x in records if x[1]["event_id"] == probe["event_id"])
        assert scored["model_ready"] and scored["model_version"] == models.champion.version  # no live label yet
        assert scored["detectors"]["model"] > 0.8
        status = _models(worker)
        assert status["restored_from"] == f"warm start {model_file}"
        assert status["bootstrap"]["held_out"] == report["held_out"]
    finally:
        worker.stop()


def test_an_unreadable_warm_start_stops_the_worker_with_advice(settings, tmp_path):
    worker = Worker(settings.replace(warm_start=str(tmp_path / "missing.models")), tmp_path / "logs").start()
    assert worker.proc is not None and worker.proc.wait(60) != 0
    assert "abuse-detector bootstrap" in worker.log()
