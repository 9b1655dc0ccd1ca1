"""Label join, models, rules, fusion, alert policy, reputation and model lifecycle."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import orjson
import pytest
from river import optim

from detectors.catalog import FEATURE_NAMES
from detectors.content import ContentModel, ngram_counts, text_inputs
from detectors.decisions import alert_id, score_id, severity
from detectors.features import encode_record, extract
from detectors.labels import on_label, on_score
from detectors.lifecycle import CheckpointError, ModelSet
from detectors.model import OnlineRiskModel, Standardiser
from detectors.pipeline import Detector, LocalStore, StaticRules
from detectors.reputation import add_label, reputation_features
from detectors.rules import RulesError, RulesWatcher, parse_rules
from streams.label_join import SCORE_REFERENCE, UNLABELLED_SCORE, ScoreJoin, pending_of, read_back_row

BAD = {"user_login_failures_1h": 8.0, "ip_new_for_user": 1.0, "login_failed": 1.0}
GOOD = {"user_login_failures_1h": 0.0, "ip_new_for_user": 0.0, "login_failed": 0.0}
T0 = 1_767_225_600_000


def _score(event_id: str, features: dict) -> dict:
    return {"event_id": event_id, "ts": T0, "features": features, "detectors": {"model": 0.5, "anomaly": 0.0,
            "rules": 0.0, "content": 0.0}, "entities": {"user": "u", "ip": "1.1.1.1"}}


def _label(event_id: str, label: str, ts: int = T0 + 1000, source: str = "moderator") -> dict:
    return {"event_id": event_id, "label": label, "ts": ts, "source": source, "schema_version": 1}


def test_score_then_label_yields_one_example():
    pending, example = on_score(None, _score("e", BAD))
    assert example is None
    pending, example = on_label(pending, _label("e", "abuse"))
    assert example["label"] == "abuse" and example["features"] == BAD and example["event_id"] == "e"
    assert on_label(pending, _label("e", "abuse"))[1] is None


def test_label_before_score_is_kept_until_the_score_arrives():
    pending, example = on_label(None, _label("e", "benign"))
    assert example is None
    assert on_score(pending, _score("e", GOOD))[1]["label"] == "benign"


def test_appeal_is_a_correction_example():
    pending, _ = on_score(None, _score("e", BAD))
    pending, _ = on_label(pending, _label("e", "abuse"))
    _, correction = on_label(pending, _label("e", "benign", source="appeal"))
    assert (correction["label"], correction["previous_label"], correction["source"]) == ("benign", "abuse", "appeal")


def _join_one_score_at_a_time(store: dict, partition: int, key: bytes, score: bytes) -> list:
    """The worker's label join before round 17: each score's row written before the next is read."""
    stored = store.get((partition, key))
    if stored is None:
        store[partition, key] = UNLABELLED_SCORE + score
        return []
    pending, example = on_score(pending_of(stored), orjson.loads(score))
    store[partition, key] = orjson.dumps(pending)
    return [(key, example)] if example else []


def test_a_read_of_scores_joins_as_one_score_after_the_other():
    store = {
        (0, b"labelled"): orjson.dumps(on_label(None, _label("labelled", "abuse"))[0]),
        (1, b"learned"): orjson.dumps(on_score(on_label(None, _label("learned", "benign"))[0],
                                               _score("learned", GOOD))[0]),
        (0, b"seen"): UNLABELLED_SCORE + orjson.dumps(_score("seen", GOOD)),
    }
    reads = [(0, b"new"), (1, b"new"), (0, b"labelled"), (0, b"new"), (0, b"labelled"), (1, b"learned"),
             (0, b"seen"), (1, b"other"), (0, b"new")]
    scores = [(p, key, orjson.dumps(_score(key.decode(), dict(BAD, n=float(i))))) for i, (p, key) in enumerate(reads)]

    one_at_a_time, expected_examples = dict(store), []
    for partition, key, score in scores:
        expected_examples += _join_one_score_at_a_time(one_at_a_time, partition, key, score)
    joined = ScoreJoin(lambda partition: lambda key: store.get((partition, key)))
    for offset, (partition, key, score) in enumerate(scores):
        joined.add(partition, key, score, offset)
    batched = dict(store)
    for partition, rows in joined.rows.items():
        batched.update({(partition, key): row for key, row in rows.items()})

    assert batched == one_at_a_time
    assert joined.examples == expected_examples
    assert [key for key, _ in joined.examples] == [b"labelled"]  # once, for the first of its two scores
    assert list(joined.rows[0]) == [b"new", b"labelled", b"seen"]  # each key once, in first-write order


def test_a_score_that_cannot_be_joined_raises_and_changes_no_row():
    store = {(0, b"labelled"): orjson.dumps(on_label(None, _label("labelled", "abuse"))[0])}
    joined = ScoreJoin(lambda partition: lambda key: store.get((partition, key)))
    joined.add(0, b"new", orjson.dumps(_score("new", BAD)), 0)
    with pytest.raises(orjson.JSONDecodeError):
        joined.add(0, b"labelled", b"{not json", 1)
    assert list(joined.rows[0]) == [b"new"] and joined.examples == []


def test_a_new_rows_changelog_record_is_where_its_score_is_and_a_joined_rows_is_the_row():
    store = {(0, b"labelled"): orjson.dumps(on_label(None, _label("labelled", "abuse"))[0])}
    joined = ScoreJoin(lambda partition: lambda key: store.get((partition, key)))
    new, labelled = orjson.dumps(_score("new", BAD)), orjson.dumps(_score("labelled", BAD))
    joined.add(0, b"new", new, 17)
    joined.add(0, b"labelled", labelled, 18)
    joined.add(2, b"later", orjson.dumps(_score("later", GOOD)), 5)
    assert joined.rows[0][b"new"] == UNLABELLED_SCORE + new  # the store keeps the score itself
    assert joined.logged == {0: {b"new": SCORE_REFERENCE + b"17"}, 2: {b"later": SCORE_REFERENCE + b"5"}}
    assert b"labelled" not in joined.logged[0]  # a joined row is logged as it is stored
    # A key read twice in one read (a redelivery) becomes a pending record: logged as it is stored.
    joined.add(2, b"later", orjson.dumps(_score("later", GOOD)), 6)
    assert joined.rows[2][b"later"][:1] != UNLABELLED_SCORE and b"later" not in joined.logged[2]


def test_a_recovered_reference_joins_a_label_as_the_score_it_refers_to_would():
    score = orjson.dumps(_score("e", BAD))
    topic = {40: (b"e", score), 41: (b"other", score)}
    label = _label("e", "abuse")
    _, direct = on_label(pending_of(UNLABELLED_SCORE + score), label)
    _, recovered = on_label(pending_of(read_back_row(b"e", topic.get(40))), label)
    assert recovered == direct and recovered["features"] == BAD
    # A score gone from the topic, or another key's at that offset: the label waits as one that came first.
    assert read_back_row(b"e", topic.get(39)) is None
    assert read_back_row(b"e", topic.get(41)) is None
    with pytest.raises(ValueError, match="must be resolved"):
        pending_of(SCORE_REFERENCE + b"40")
    # A score read again (a redelivery, a worker that re-scores after a crash) replaces the reference.
    joined = ScoreJoin(lambda partition: lambda key: SCORE_REFERENCE + b"40")
    joined.add(0, b"e", score, 52)
    assert joined.rows[0][b"e"] == UNLABELLED_SCORE + score and joined.logged[0][b"e"] == SCORE_REFERENCE + b"52"
    assert joined.examples == []


def test_model_needs_labels_of_both_classes_before_it_is_ready():
    model = OnlineRiskModel(min_labels_per_class=2)
    for _ in range(5):
        model.learn_one(BAD, True)
    assert not model.ready
    model.learn_one(GOOD, False)
    model.learn_one(GOOD, False)
    assert model.ready and model.version.endswith("+7")


def test_model_learns_a_separable_pattern_despite_imbalance():
    model = OnlineRiskModel(min_labels_per_class=1)
    for i in range(400):
        model.observe(GOOD)
        model.learn_one(GOOD, False)
        if i % 20 == 0:  # 1 positive per 20 negatives
            model.observe(BAD)
            model.learn_one(BAD, True)
    assert model.predict_proba_one(BAD) > 0.8
    assert model.predict_proba_one(GOOD) < 0.2
    reasons = model.explain_one(BAD)
    assert reasons and all(r["weight"] > 0 for r in reasons)


# -- reputation ------------------------------------------------------------
def test_reputation_counts_labels_only_from_their_decision_time():
    record = None
    record = add_label(record, label_ts=T0, delta=+1)
    before = reputation_features("ip", record, at_ts=T0 - 1)
    after = reputation_features("ip", record, at_ts=T0 + 1)
    assert before["ip_abuse_labels_28d"] == 0 and after["ip_abuse_labels_1d"] == 1
    record = add_label(record, label_ts=T0 + 3_600_000, delta=-1)  # appeal overturns it an hour later
    assert reputation_features("ip", record, at_ts=T0 + 2_000_000)["ip_abuse_labels_1d"] == 1
    assert reputation_features("ip", record, at_ts=T0 + 4_000_000)["ip_abuse_labels_1d"] == 0


def test_reputation_never_leaks_into_an_event_older_than_the_label():
    record = None
    for i in range(300):  # hot IP: many labels over three days, aggregated hourly after two hours
        record = add_label(record, label_ts=T0 + i * 900_000, delta=+1)
    for at in range(T0 - 1, T0 + 300 * 900_000, 1_234_567):
        truth = sum(1 for i in range(300) if at - 86_400_000 < T0 + i * 900_000 <= at)
        got = reputation_features("ip", record, at_ts=at)["ip_abuse_labels_1d"]
        assert got <= truth  # never more than what was decided by then
    latest = T0 + 299 * 900_000
    assert reputation_features("ip", record, at_ts=latest)["ip_abuse_labels_28d"] == 300
    assert len(orjson.dumps(record)) < 2048


def test_a_label_reaches_the_entities_of_its_event_through_the_store():
    detector, store = Detector(ModelSet.new(min_labels_per_class=1)), LocalStore()
    event = {"event_id": "e1", "type": "login", "ts": T0, "user_id": "u1", "ip": "9.9.9.9", "device_id": "d1", "success": False}
    scored = store.score(detector, event, now_ms=0)
    pending, _ = on_score(None, scored.risk_score)
    _, example = on_label(pending, _label("e1", "abuse", ts=T0 + 60_000))
    store.learn(detector, example, offset=0)
    later = store.score(detector, dict(event, event_id="e2", user_id="u2", ts=T0 + 120_000), now_ms=0)
    assert later.risk_score["features"]["ip_abuse_labels_1d"] == 1
    assert later.risk_score["features"]["device_abuse_labels_1d"] == 1
    assert "user_abuse_labels_1d" not in later.risk_score["features"]  # 0: a different account


# -- rules -----------------------------------------------------------------
RULES = '''
version = "t"
[policy]
threshold = 0.8
cooldown_minutes = 30
[[rule]]
name = "many_failures"
description = "many failed logins"
event_types = ["login"]
severity = "critical"
when = [{ feature = "user_login_failures_1h", op = ">=", value = 3 }]
'''


def test_rules_are_validated_with_every_problem_named():
    with pytest.raises(RulesError) as info:
        parse_rules(RULES.replace("user_login_failures_1h", "no_such_feature").replace('"critical"', '"urgent"'))
    assert "no_such_feature" in str(info.value) and "urgent" in str(info.value)
    with pytest.raises(RulesError, match="not valid TOML"):
        parse_rules("[[rule]\nname=")
    with pytest.raises(RulesError, match="must be a number"):
        parse_rules(RULES.replace("value = 3", 'value = "__import__(\'os\')"'))


def test_a_rule_set_matches_what_each_rule_matches():
    """RuleSet.matches (its conditions compiled per event type) against Rule.matches, for every
    operator, rules on one type or all, one to three conditions, values at, around and
    beyond each threshold (an int one included), a feature absent, and a type no rule names."""
    import random

    from detectors.catalog import ALL_TYPES
    from detectors.rules import OPERATORS

    rng = random.Random(18)
    features = ["user_login_failures_1h", "ip_events_1m", "payment_amount"]
    lines = ['version = "t"']
    for i in range(12):
        conditions = ", ".join(
            f'{{feature = "{rng.choice(features)}", op = "{rng.choice(list(OPERATORS))}", '
            f'value = {rng.choice(["3", "2.5", "0", "-1.0"])}}}' for _ in range(rng.choice((1, 2, 3))))
        types = f'event_types = ["{rng.choice(sorted(ALL_TYPES))}"]\n' if i % 3 == 0 else ""
        lines.append(f'[[rule]]\nname = "r{i}"\ndescription = "d"\nseverity = "low"\n{types}when = [{conditions}]')
    rules = parse_rules("\n".join(lines))
    for _ in range(2000):
        values = {f: rng.choice([0.0, -1.0, 2.5, 3.0, 3.5, 2.0, float("nan")]) for f in features if rng.random() < 0.8}
        kind = rng.choice(sorted(ALL_TYPES) + ["no_such_type"])
        assert rules.matches(values, kind) == [r for r in rules.rules if r.matches(values, kind)], (values, kind)


def test_rules_file_is_reloaded_and_a_broken_edit_keeps_the_last_good_rules(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    watcher = RulesWatcher(path)
    first = watcher.rules.version
    assert not watcher.poll()
    path.write_text(RULES.replace('version = "t"', 'version = "t2"'))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10))
    assert watcher.poll() and watcher.rules.version.startswith("t2#") and watcher.rules.version != first
    path.write_text("this is not toml [")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 20))
    assert not watcher.poll() and watcher.rules.version.startswith("t2#") and "not valid TOML" in watcher.error


# -- scoring, fusion and alert policy --------------------------------------
def _login(i: int, user: str = "victim", ts: int = T0) -> dict:
    return {"event_id": f"l{i}", "type": "login", "ts": ts + i * 1000, "user_id": user, "ip": "9.9.9.9", "success": False}


def test_a_matching_rule_alerts_once_per_cooldown_with_evidence():
    detector = Detector(ModelSet.new(), rules=StaticRules(parse_rules(RULES)))
    store = LocalStore()
    outs = [store.score(detector, _login(i), now_ms=0) for i in range(6)]
    alerts = [o.alert for o in outs if o.alert]
    assert len(alerts) == 1, "one alert per account per cooldown"
    alert = alerts[0]
    assert alert["event_id"] == "l2" and alert["alert_id"] == alert_id("l2")
    assert alert["severity"] == "critical" and alert["matched_rules"] == ["many_failures"]
    assert alert["reasons"][0]["code"] == "rule:many_failures"
    assert "user_login_failures_1h = 3 >= 3" in alert["reasons"][0]["text"]
    # after the cooldown the next hit alerts again, carrying how many were suppressed
    late = store.score(detector, _login(0, ts=T0 + 31 * 60_000), now_ms=0)
    assert late.alert is not None and late.alert["suppressed_before"] == 3


def test_redelivered_alerting_event_yields_the_same_alert():
    detector = Detector(ModelSet.new(), rules=StaticRules(parse_rules(RULES)))
    store = LocalStore()
    for i in range(2):
        store.score(detector, _login(i), now_ms=0)
    first = store.score(detector, _login(2), now_ms=0).alert
    again = store.score(detector, _login(2), now_ms=0).alert
    assert first is not None and again is not None and again["alert_id"] == first["alert_id"]


def test_an_accounts_alert_state_is_stored_only_while_it_holds_something():
    """Most accounts never score near a threshold: their user record carries no alert state.
    An alert's cooldown (or evidence kept) is stored; a quiet state stored by an older version
    is dropped at the account's next quiet event, and decides nothing differently."""
    detector = Detector(ModelSet.new(), rules=StaticRules(parse_rules(RULES)))
    store = LocalStore()
    user_record = lambda user: orjson.loads(store.records[("user", user)])  # noqa: E731
    quiet = store.score(detector, dict(_login(0, user="calm"), event_id="c0", success=True), now_ms=0)
    assert quiet.alert is None and "a" not in user_record("calm")
    outs = [store.score(detector, _login(i), now_ms=0) for i in range(3)]
    assert outs[2].alert is not None and user_record("victim")["a"]["id"] == alert_id("l2")
    stored_quiet = dict(user_record("calm"), a={"until": None, "id": None, "recent": [], "suppressed": 0})
    store.records[("user", "calm")] = encode_record(stored_quiet)
    again = store.score(detector, dict(_login(1, user="calm"), event_id="c1", success=True), now_ms=0)
    assert again.alert is None and "a" not in user_record("calm")


def test_risk_score_carries_every_detector_and_the_shadow():
    detector = Detector(ModelSet.new(min_labels_per_class=1))
    event = {"event_id": "p1", "type": "post", "ts": T0, "user_id": "u", "text": "hello http://x.example"}
    score = LocalStore().score(detector, event, now_ms=0).risk_score
    assert set(score["detectors"]) == {"model", "anomaly", "rules", "content"}
    assert score["shadow"]["model_version"] != score["model_version"]
    assert score["inputs"]["text"] and score["features"]["text_links"] == 1.0
    # only the features that are not 0, in catalogue order
    assert list(score["features"]) == [name for name in FEATURE_NAMES if name in score["features"]]
    assert score["features"] == {name: value for name, value in extract(event, {}).features.items() if value}
    assert score["score_id"] == score_id("p1")


def test_a_score_keeps_its_text_as_counts_and_its_example_learns_their_shares():
    detector = Detector(ModelSet.new(min_labels_per_class=1))
    text = "Get a FREE phone now!!! free phone, free phone: visit http://x.example"
    event = {"event_id": "p1", "type": "post", "ts": T0, "user_id": "u", "text": text}
    score = orjson.loads(orjson.dumps(LocalStore().score(detector, event, now_ms=0).risk_score))  # as the join reads it
    counts = score["inputs"]["text"]
    assert counts == ngram_counts(text) and max(counts.values()) > 1 and all(type(n) is int for n in counts.values())
    pending, _ = on_score(None, score)
    _, example = on_label(pending, {"event_id": "p1", "label": "abuse", "ts": T0 + 1, "source": "moderator"})
    assert example["text"] == text_inputs(text)  # the very doubles the content model scored
    assert list(example["text"]) == list(counts)
    # a score written when scores carried the shares themselves learns the same shares
    shares = dict(score, inputs={"text": text_inputs(text)})
    assert on_score(None, shares)[0]["x"] == pytest.approx(text_inputs(text), rel=1e-15)


def test_fusion_learns_to_beat_its_inputs_when_they_disagree():
    models = ModelSet.new(min_labels_per_class=1)
    # The model is confidently wrong on abuse the rules catch; fusion learns to trust rules.
    for i in range(2000):
        abuse = i % 4 == 0
        detectors = {"model": 0.2, "anomaly": 0.1, "rules": 0.85 if abuse else 0.0, "content": 0.0}
        models.fusion.learn_one(detectors, False, abuse)
    assert models.fusion.ready
    hit = models.fusion.fuse({"model": 0.2, "anomaly": 0.1, "rules": 0.85, "content": 0.0}, True, False)
    miss = models.fusion.fuse({"model": 0.2, "anomaly": 0.1, "rules": 0.0, "content": 0.0}, True, False)
    assert hit > 0.8 > 0.2 > miss


@pytest.mark.parametrize("score, expected", [(0.8, "medium"), (0.87, "high"), (0.94, "critical"), (1.0, "critical")])
def test_severity_bands(score, expected):
    assert severity(score, threshold=0.8) == expected


# -- lifecycle ---------------------------------------------------------------
def _example(features: dict, label: str, offset_text: str | None = None) -> dict:
    return {"event_id": "x", "label": label, "previous_label": None, "label_ts": T0, "source": "moderator",
            "event_ts": T0, "features": features, "detectors": {"model": 0.5, "anomaly": 0.0, "rules": 0.0, "content": 0.5},
            "text": None, "entities": {}}


def test_checkpoint_roundtrip_keeps_every_model_exactly():
    models = ModelSet.new(min_labels_per_class=1)
    for i in range(50):
        models.champion.observe(BAD)
        models.champion.observe(GOOD)
        models.learn(_example(BAD, "abuse"), offset=2 * i)
        models.learn(_example(GOOD, "benign"), offset=2 * i + 1)
    restored = ModelSet.from_bytes(models.to_bytes())
    assert restored.offset == 99 and restored.examples == 100
    assert restored.champion.predict_proba_one(BAD) == models.champion.predict_proba_one(BAD)
    assert restored.challenger.version == models.challenger.version
    assert restored.report()["champion"]["roc_auc"] == models.report()["champion"]["roc_auc"]


def test_checkpoint_from_another_river_version_is_refused(monkeypatch):
    raw = ModelSet.new().to_bytes()
    import river
    monkeypatch.setattr(river, "__version__", "0.0.1")
    with pytest.raises(CheckpointError, match="not portable"):
        ModelSet.from_bytes(raw)


def test_promotion_swaps_roles_and_rollback_swaps_back():
    models = ModelSet.new()
    champion, challenger = models.champion.name, models.challenger.name
    assert models.promote() == challenger and models.challenger.name == champion
    assert models.promote() == champion and models.promotions == [challenger, champion]


def test_standardiser_saved_under_an_older_catalogue_is_aligned_on_load():
    saved = Standardiser()
    for v in (1.0, 2.0, 5.0):
        saved.learn_one({"user_events_1m": v, "ip_events_1m": 4.0})
    # as an older catalogue would have saved it: no ip_events_1m yet, plus a feature since retired
    state = saved.__getstate__()
    kept = [i for i, name in enumerate(FEATURE_NAMES) if name != "ip_events_1m"]
    older = {"names": tuple(FEATURE_NAMES[i] for i in kept) + ("retired_feature",),
             **{stat: np.append(state[stat][kept], 3.0) for stat in ("counts", "means", "variances")}}
    loaded = Standardiser.__new__(Standardiser)
    loaded.__setstate__(older)
    assert loaded.names == FEATURE_NAMES
    event = {"user_events_1m": 9.0, "ip_events_1m": 4.0}
    assert loaded.transform_one(event)["user_events_1m"] == saved.transform_one(event)["user_events_1m"]
    assert loaded.transform_one(event)["ip_events_1m"] == 0.0  # new to it: no statistics yet
    assert pickle.loads(pickle.dumps(loaded)).transform_one(event) == loaded.transform_one(event)


def test_a_content_model_checkpointed_with_adam_continues_with_adagrad():
    old = ContentModel(min_labels_per_class=1)
    old.classifier.optimizer = optim.Adam(0.05)  # as text-logreg/1 learned
    old.learn_one(text_inputs("free phone now visit"), True)
    restored = pickle.loads(pickle.dumps(old))
    assert isinstance(restored.classifier.optimizer, optim.AdaGrad)
    assert dict(restored.classifier._weights) == dict(old.classifier._weights)
    restored.learn_one(text_inputs("lovely quiet walk"), False)


class CountingStore:
    """A store with its reads counted."""

    def __init__(self, store):
        self.store, self.reads = store, 0

    def get(self, key):
        self.reads += 1
        return self.store.get(key)

    def __getattr__(self, name):
        return getattr(self.store, name)


def _labelled(event_id: str, ip: str, label: str = "abuse", previous: str | None = None, ts: int = 60_000) -> dict:
    return {"event_id": event_id, "label": label, "previous_label": previous, "label_ts": ts,
            "entities": {"ip": ip, "user": "u1"}}


def test_reputations_are_read_once_and_a_change_is_seen_once_the_learner_says_so(tmp_path, monkeypatch):
    from streams import learning

    monkeypatch.setattr(learning, "REPUTATIONS_KEPT", 2)
    writer = learning.Reputations(tmp_path)  # the learner's
    reader = learning.ReputationReader(tmp_path)  # the scoring thread's
    store = reader.store = CountingStore(reader.store)
    try:
        assert reader.reputation_of("ip", "1.2.3.4") is None
        assert reader.reputation_of("ip", "1.2.3.4") is None and store.reads == 1  # its absence was kept
        writer.apply(_labelled("e1", "1.2.3.4"), offset=0)
        writer.commit()
        changed = writer.take_changed()
        assert sorted(changed) == [("ip", "1.2.3.4"), ("user", "u1")] and writer.take_changed() == []
        reader.refresh(changed)
        reads = store.reads
        stored = reader.reputation_of("ip", "1.2.3.4")
        assert stored is not None and reputation_features("ip", orjson.loads(stored), 60_000)["ip_abuse_labels_1d"] == 1
        assert reader.reputation_of("ip", "1.2.3.4") == stored and store.reads == reads + 1
        assert reader.offset == 0

        for key in ("a", "b", "c"):  # the second forgets all that was kept, ip's reputation too
            reader.reputation_of("device", key)
        reads = store.reads
        reader.reputation_of("ip", "1.2.3.4")
        assert store.reads == reads + 1
    finally:
        reader.close()
        writer.close()


def test_the_examples_of_one_commit_add_up_and_are_never_applied_twice(tmp_path):
    """One write batch per commit: an entity labelled twice in it counts both, and a learner
    restarted after the commit skips what it holds."""
    from streams import learning

    writer = learning.Reputations(tmp_path)
    writer.apply(_labelled("e1", "9.9.9.9"), offset=0)
    writer.apply(_labelled("e2", "9.9.9.9", ts=61_000), offset=1)
    writer.apply(_labelled("e3", "9.9.9.9", ts=62_000), offset=2)
    writer.apply(_labelled("e3", "9.9.9.9", label="benign", previous="abuse", ts=63_000), offset=3)  # overturned
    writer.apply({"kind": "control", "action": "promote"}, offset=4)
    assert writer.store.get(learning.reputation_key("ip", "9.9.9.9")) is None  # nothing before the commit
    writer.commit()
    writer.close()

    restarted = learning.Reputations(tmp_path)
    try:
        assert restarted.offset == 4
        restarted.apply(_labelled("e2", "9.9.9.9", ts=61_000), offset=1)  # read again after a restart
        restarted.commit()
        stored = orjson.loads(restarted.store.get(learning.reputation_key("ip", "9.9.9.9")))
        assert reputation_features("ip", stored, 70_000)["ip_abuse_labels_1d"] == 2
    finally:
        restarted.close()


def test_a_reader_told_of_a_new_learner_reads_what_it_wrote(tmp_path):
    from streams import learning

    first = learning.Reputations(tmp_path)
    first.apply(_labelled("e1", "5.5.5.5"), offset=0)
    first.commit()
    reader = learning.ReputationReader(tmp_path)
    try:
        assert reputation_features("ip", orjson.loads(reader.reputation_of("ip", "5.5.5.5")), 70_000)["ip_abuse_labels_1d"] == 1
        first.close()  # the learner dies; a new one goes on
        second = learning.Reputations(tmp_path)
        second.apply(_labelled("e2", "5.5.5.5", ts=61_000), offset=1)
        second.commit()
        second.close()
        reader.refresh(None)
        assert reputation_features("ip", orjson.loads(reader.reputation_of("ip", "5.5.5.5")), 70_000)["ip_abuse_labels_1d"] == 2
        assert reader.offset == 1
    finally:
        reader.close()


def test_the_learner_reads_the_feed_from_whichever_of_models_and_reputations_is_behind(tmp_path):
    from streams import learning

    models = ModelSet.new(5)
    models.offset = 5  # a checkpoint newer than the reputation store (a disk lost, the checkpoint from the topic)
    trainer = learning.ModelTrainer(models, learning.Reputations(tmp_path / "rep"), "127.0.0.1:1", "examples",
                                    "checkpoints", "w", tmp_path, checkpoint_interval_s=3600.0)
    example = {"schema_version": 1, "label": "abuse", "previous_label": None, "label_ts": 1, "source": "moderator",
               "event_ts": 0, "features": BAD, "detectors": {"rules": 0.9, "anomaly": 0.5}, "text": None,
               "entities": {"ip": "7.7.7.7"}}
    try:
        assert trainer.applied_offset() == -1
        trainer.consumer = _Feed([orjson.dumps({**example, "event_id": f"e{i}"}) for i in range(10)])
        assert trainer.poll(100) == 10
        assert models.examples == 4 and models.offset == 9  # offsets 6-9 only
        stored = orjson.loads(trainer.reputations.store.get(learning.reputation_key("ip", "7.7.7.7")))
        assert reputation_features("ip", stored, 10_000)["ip_abuse_labels_1d"] == 10 and trainer.applied_offset() == 9
    finally:
        trainer.producer.flush(0)
        trainer.reputations.close()


class _Feed:
    """Training examples as the feed's consumer hands them over."""

    def __init__(self, values: list[bytes]):
        self.values, self.offset = values, 0

    def consume(self, max_records, timeout):
        batch = [_Record(value, self.offset + i) for i, value in enumerate(self.values[:max_records])]
        self.values, self.offset = self.values[max_records:], self.offset + len(batch)
        return batch


class _Record:
    def __init__(self, value: bytes, offset: int):
        self._value, self._offset = value, offset

    def error(self):
        return None

    def value(self):
        return self._value

    def offset(self):
        return self._offset


def test_the_models_are_checkpointed_by_time_not_by_the_examples_they_learn(tmp_path, monkeypatch):
    """A checkpoint pickles every model (82 ms for a 200,000-bucket text model), holding up the
    handoffs: at most one per interval however fast labels come, and none without a new example."""
    from streams import learning

    clock = [1000.0]
    monkeypatch.setattr(learning.time, "monotonic", lambda: clock[0])
    feed = learning.ModelTrainer(ModelSet.new(5), learning.Reputations(tmp_path / "rep"), "127.0.0.1:1",
                                 "examples", "checkpoints", "w", tmp_path, checkpoint_interval_s=30.0)
    taken = []

    def checkpoint() -> None:  # what the real one does to the feed, without the pickle and the I/O
        taken.append(clock[0])
        feed.applied_since_checkpoint, feed.last_checkpoint = 0, clock[0]

    monkeypatch.setattr(feed, "checkpoint", checkpoint)
    example = orjson.dumps({"schema_version": 1, "event_id": "e", "label": "abuse", "previous_label": None,
                            "label_ts": 1, "source": "moderator", "event_ts": 0, "features": BAD,
                            "detectors": {"rules": 0.9, "anomaly": 0.5}, "text": None, "entities": {"user": "u"}})
    try:
        feed.consumer = _Feed([example] * 2000)
        for _ in range(4):  # 2,000 examples within 29 s: none
            assert feed.poll(500) == 500
            clock[0] += 7.25
        assert taken == [] and feed.applied_since_checkpoint == 2000
        clock[0] += 1.0
        feed.poll()  # nothing new, but 30 s since the last: the 2,000 examples are checkpointed
        assert taken == [1030.0]
        clock[0] += 60.0
        feed.poll()
        assert taken == [1030.0]  # nothing learned since: no checkpoint
    finally:
        feed.producer.flush(0)
        feed.reputations.close()
