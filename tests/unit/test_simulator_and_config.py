"""Simulator reproducibility and campaign content; configuration precedence."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import fields
from pathlib import Path

import orjson
import pytest

from streams.cli import _parser
from streams.config import ENV_PREFIX, Settings, load_settings
from streams.simulator import SimulationConfig, run_simulation, simulate

CONFIG = SimulationConfig(seed=11, users=200, days=0.5, stuffing_per_day=6, fake_signup_bursts_per_day=6,
                          spam_bursts_per_day=6, card_testing_per_day=6, malformed_share=0.005)


def test_same_seed_same_stream_other_seed_other_stream():
    first = [(r.kind, r.key, r.value) for r in simulate(CONFIG)]
    again = [(r.kind, r.key, r.value) for r in simulate(CONFIG)]
    other = [(r.kind, r.key, r.value) for r in simulate(SimulationConfig(**{**CONFIG.__dict__, "seed": 12}))]
    assert first == again
    assert first != other


def test_stream_has_every_campaign_labels_after_their_events_and_daily_rhythm():
    records = list(simulate(CONFIG))
    campaigns = Counter(r.campaign for r in records if r.kind == "event")
    assert {"benign", "credential_stuffing", "fake_account", "spam", "card_testing"} <= set(campaigns)
    event_ts = {r.event_id: r.ts for r in records if r.kind == "event"}
    labels = [orjson.loads(r.value) for r in records if r.kind == "label"]
    assert labels and all(label["ts"] > event_ts[label["event_id"]] for label in labels)
    assert {label["source"] for label in labels} >= {"moderator", "qa_sample"}
    # Records come in event-time order (labels at their decision time).
    times = [r.ts for r in records if r.kind != "malformed"]
    assert times == sorted(times)


def test_benign_traffic_has_a_daily_rhythm():
    day = SimulationConfig(seed=5, users=400, days=1.0)
    per_hour = Counter((r.ts // 3_600_000) % 24 for r in simulate(day) if r.kind == "event" and r.campaign == "benign")
    assert len(per_hour) == 24
    assert max(per_hour.values()) > 1.5 * min(per_hour.values())


def test_credential_stuffing_uses_few_ips_for_many_accounts():
    events = [orjson.loads(r.value) for r in simulate(CONFIG) if r.kind == "event" and r.campaign == "credential_stuffing"]
    ips = Counter(e["ip"] for e in events)
    accounts = {e["user_id"] for e in events}
    assert len(accounts) > 10 * len(ips) / 5
    assert sum(not e["success"] for e in events) / len(events) > 0.8


def test_files_written_match_the_stream(tmp_path):
    report = run_simulation(CONFIG, out_dir=tmp_path, keep_truth=True)
    events = (tmp_path / "events.jsonl").read_bytes().splitlines()
    assert len(events) == report.events + report.malformed
    assert len((tmp_path / "labels.jsonl").read_bytes().splitlines()) == report.labels
    truth = [orjson.loads(line) for line in (tmp_path / "truth.jsonl").read_bytes().splitlines()]
    assert sum(t["is_abuse"] for t in truth) == report.abusive_events == sum(report.truth.values())


def test_settings_come_from_env_and_flags_win():
    env = {"ABUSE_LABEL_TTL_S": "90", "ABUSE_EVENTS_TOPIC": "ev", "ABUSE_KAFKA_PORT": "19999"}
    s = load_settings(env)
    assert (s.label_ttl_s, s.events_topic, s.bootstrap_servers) == (90, "ev", "127.0.0.1:19999")
    assert load_settings(env, label_ttl_s=5).label_ttl_s == 5


def test_bad_setting_value_says_which_variable():
    with pytest.raises(SystemExit, match="ABUSE_PARTITIONS"):
        load_settings({"ABUSE_PARTITIONS": "four"})


def test_the_readme_lists_every_setting_with_a_flag_the_cli_takes():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(ABUSE_[A-Z_]+)` \| `(--[a-z-]+)` \|", readme, re.MULTILINE))
    assert set(rows) == {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    commands = _parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
    taken = {flag for command in commands for flag in command._option_string_actions}
    assert sorted(flag for flag in rows.values() if flag not in taken) == []
