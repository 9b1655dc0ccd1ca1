"""Operator replay on the real broker, while the live worker runs: outputs only on the
run's own topics, identical across runs, nothing on the live alert topic; compare shows
what a rule change adds; clean removes the run."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from streams.demo import settings_env
from streams.kafka.io import read_topic, topic_size
from streams.replay import ReplayError, ReplayTopics, run_replay
from tests.integration.conftest import Worker
from tests.integration.helpers import as_record, benign_post, bootstrap_model_file, stuffing_login

pytestmark = pytest.mark.integration

EVENTS = [stuffing_login(i, f"victim-{i}") for i in range(30)] + [benign_post(i, f"user-{i % 5}") for i in range(30)]
RULE_CHANGE = """
version = "test-rule-change"
[policy]
threshold = 0.8
[[rule]]
name = "any_text_post"
description = "every post with text (a deliberately bad rule)"
event_types = ["post"]
severity = "critical"
when = [{ feature = "text_length", op = ">=", value = 1 }]
"""


def _records(settings, topic: str) -> dict[str, bytes]:
    return {orjson.loads(v)["event_id"]: v for _, v in read_topic(settings, topic)}


def _cli(settings, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "streams.cli", "replay", *args], env=settings_env(settings),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_replay_is_isolated_deterministic_and_comparable(settings, reader, produce, tmp_path):
    settings = settings.replace(home=str(tmp_path / "home"))
    model_file = tmp_path / "warm.models"
    bootstrap_model_file(model_file)
    live = Worker(settings.replace(warm_start=str(model_file)), tmp_path / "logs").start()
    try:
        scores = reader(settings.scores_topic)
        produce(settings.events_topic, [as_record(e) for e in EVENTS] + [(b"x", b"{not json")])
        scores.wait_for(lambda r: len({x[1]["event_id"] for x in r}) >= len(EVENTS), timeout=120, worker=live)
        live_alerts, live_scores = topic_size(settings, settings.alerts_topic), topic_size(settings, settings.scores_topic)
        assert live_alerts > 0

        runs = {}
        for run_id in ("run-a", "run-b"):
            summary = run_replay(settings, settings.events_topic, "0", "999999", run_id, model_file=model_file,
                                 quiet=True)
            assert summary["events"] == len(EVENTS) and summary["rejected"] == 1 and summary["complete"]
            topics = ReplayTopics.of(settings, run_id)
            runs[run_id] = (_records(settings, topics.scores), _records(settings, topics.alerts))
        (scores_a, alerts_a), (scores_b, alerts_b) = runs["run-a"], runs["run-b"]
        assert set(scores_a) == {e["event_id"] for e in EVENTS}
        assert scores_a == scores_b and alerts_a == alerts_b  # byte for byte
        assert alerts_a and all(orjson.loads(a)["event_id"].startswith("bad") for a in alerts_a.values())
        # the live topics received nothing from either run, while the live worker kept running
        assert topic_size(settings, settings.alerts_topic) == live_alerts
        assert topic_size(settings, settings.scores_topic) == live_scores
        assert live.alive()

        # running a finished run again changes nothing; other arguments under its id are refused
        again = run_replay(settings, settings.events_topic, "0", "999999", "run-a", model_file=model_file, quiet=True)
        assert again["resumed"] and topic_size(settings, ReplayTopics.of(settings, "run-a").scores) == len(EVENTS)
        with pytest.raises(ReplayError, match="other arguments"):
            run_replay(settings, settings.events_topic, "0", "10", "run-a", model_file=model_file, quiet=True)

        # a rule change, replayed and compared: the alerts it adds, per rule
        rules = tmp_path / "rules.toml"
        rules.write_text(RULE_CHANGE)
        _cli(settings, "--run-id", "rule-change", "--from", "0", "--to", "999999", "--model", str(model_file),
             "--rules", str(rules))
        table = _cli(settings, "compare", "--run-id", "rule-change")
        print(table)
        assert "rule any_text_post" in table
        from streams.replay import compare_replay

        report = compare_replay(settings, "rule-change")
        assert report["compared_with_live"] == len(EVENTS)
        assert report["rules"]["any_text_post"] == {"live": 0, "replay": 30, "added": 30, "removed": 0}
        assert report["alerts"]["added"] > 0
        assert all(e.startswith("good") for e in report["alerts"]["added_examples"])
        assert (tmp_path / "home" / "replay" / "rule-change" / "compare.png").stat().st_size > 0

        removed = _cli(settings, "clean", "--run-id", "rule-change")
        assert "risk-scores" in removed or settings.scores_topic in removed
        assert not (tmp_path / "home" / "replay" / "rule-change").exists()
        assert topic_size(settings, ReplayTopics.of(settings, "rule-change").scores) == 0
    finally:
        live.stop()


def test_a_replay_never_writes_to_a_live_topic(settings):
    clash = settings.replace(scores_topic=f"{settings.alerts_topic}.replay.x")
    with pytest.raises(ReplayError, match="never writes to live topics"):
        ReplayTopics.of(clash, "x")
    with pytest.raises(ReplayError, match="run id"):
        ReplayTopics.of(settings, "../../etc")


def test_an_interrupted_replay_resumes_where_it_stopped(settings, produce, tmp_path, monkeypatch):
    import streams.replay as replay

    settings = settings.replace(home=str(tmp_path / "home"))
    model_file = tmp_path / "warm.models"
    bootstrap_model_file(model_file)
    produce(settings.events_topic, [as_record(e) for e in EVENTS])
    whole = run_replay(settings, settings.events_topic, "0", "999999", "whole", model_file=model_file, quiet=True)
    assert whole["events"] == len(EVENTS)

    monkeypatch.setattr(replay, "CHECKPOINT_EVERY", 10)
    real_extract_one, calls = replay._extract_one, []

    def crash_at_35(*args, **kwargs):
        calls.append(1)
        if len(calls) == 35:
            raise KeyboardInterrupt  # an operator's Ctrl-C mid-run
        return real_extract_one(*args, **kwargs)

    monkeypatch.setattr(replay, "_extract_one", crash_at_35)
    with pytest.raises(KeyboardInterrupt):
        run_replay(settings, settings.events_topic, "0", "999999", "cut", model_file=model_file, quiet=True)
    monkeypatch.setattr(replay, "_extract_one", real_extract_one)
    resumed = run_replay(settings, settings.events_topic, "0", "999999", "cut", model_file=model_file, quiet=True)
    assert resumed["resumed"] and resumed["events"] == len(EVENTS)
    cut_topic, whole_topic = ReplayTopics.of(settings, "cut").scores, ReplayTopics.of(settings, "whole").scores
    assert _records(settings, cut_topic) == _records(settings, whole_topic)
    assert len(EVENTS) <= topic_size(settings, cut_topic) <= len(EVENTS) + 10  # at most one checkpoint's worth again


def test_a_run_written_by_another_version_is_not_resumed(settings, produce, tmp_path):
    from streams.replay import _MANIFEST, ReplayState, state_dir

    settings = settings.replace(home=str(tmp_path / "home"))
    model_file = tmp_path / "warm.models"
    bootstrap_model_file(model_file)
    produce(settings.events_topic, [as_record(e) for e in EVENTS[:5]])
    run_replay(settings, settings.events_topic, "0", "999999", "old", model_file=model_file, quiet=True)
    state = ReplayState(state_dir(settings, "old"))
    manifest = state.meta(_MANIFEST)
    state.db.put(_MANIFEST, orjson.dumps({**manifest, "format": 1}))  # as the version before round 5 wrote it
    state.close()
    with pytest.raises(ReplayError, match="another version.*replay clean --run-id old"):
        run_replay(settings, settings.events_topic, "0", "999999", "old", model_file=model_file, quiet=True)
