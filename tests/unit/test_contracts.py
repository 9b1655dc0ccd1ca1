"""Contracts: every schema is valid draft 2020-12, every record we emit honours its schema,
every malformed input is rejected with the right reason."""

from __future__ import annotations

import json
from importlib import resources

import orjson
import pytest
from jsonschema import Draft202012Validator

import schemas
from detectors.events import decode_event, decode_label, dead_letter
from detectors.lifecycle import ModelSet
from detectors.pipeline import Detector, LocalStore
from schemas import ContractViolation
from streams.simulator import SimulationConfig, simulate

SMALL = SimulationConfig(seed=3, users=150, days=0.25, malformed_share=0.01,
                         stuffing_per_day=8, fake_signup_bursts_per_day=8, spam_bursts_per_day=8, card_testing_per_day=8)


def test_every_contract_is_a_valid_2020_12_schema():
    files = [p for p in resources.files("schemas").joinpath("v1").iterdir() if p.name.endswith(".json")]
    assert len(files) >= 15
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert doc["$id"] == schemas.urn(path.name.removesuffix(".json"))
        Draft202012Validator.check_schema(doc)


def test_every_event_type_has_a_contract():
    for kind in schemas.EVENT_TYPES:
        assert schemas.load(kind)["properties"]["type"] == {"const": kind}


BASE = {"event_id": "e1", "schema_version": 1, "ts": 1_700_000_000_000, "user_id": "u1"}


@pytest.mark.parametrize("record", [
    {"type": "signup", "ip": None, "device_id": None},
    {"type": "signup"},  # ip and device may be absent
    {"type": "login", "success": False, "failure_reason": "bad_password"},
    {"type": "post", "text": "hello"},
    {"type": "comment", "text": "hi", "parent_id": "p1"},
    {"type": "message", "text": "hi", "recipient_id": "u2"},
    {"type": "follow", "target_user_id": "u2"},
    {"type": "like", "target_id": "p1"},
    {"type": "report", "target_id": "p1", "reason": "spam"},
    {"type": "payment", "amount": 1.5, "currency": "EUR", "terminal_id": "t1"},
    {"type": "payment", "amount": 10, "currency": "USD", "merchant_id": "m1", "status": "declined"},
    {"type": "post", "text": "hi", "some_future_field": {"x": 1}},  # forward compatible
])
def test_valid_events_decode(record):
    event = decode_event(orjson.dumps(BASE | record), max_bytes=65536)
    assert event["type"] == record["type"]


@pytest.mark.parametrize("raw, reason, mentions", [
    (b"", "not_json", ""),
    (b"\x00\x01binary", "not_json", ""),
    (b"[1,2]", "not_an_object", "list"),
    (b'"a string"', "not_an_object", "str"),
    (orjson.dumps(BASE | {"type": "teleport"}), "unknown_type", "teleport"),
    (orjson.dumps(BASE | {"type": "login", "schema_version": 2, "success": True}), "unsupported_schema_version", "2"),
    (orjson.dumps({k: v for k, v in BASE.items() if k != "user_id"} | {"type": "signup"}), "missing_field", "user_id"),
    (orjson.dumps({k: v for k, v in BASE.items() if k != "event_id"}), "missing_field", "event_id"),
    (orjson.dumps(BASE | {"type": "login"}), "missing_field", "success"),
    (orjson.dumps(BASE | {"type": "login", "success": "yes"}), "invalid_field", "success"),
    (orjson.dumps(BASE | {"type": "signup", "ts": "yesterday"}), "invalid_field", "ts"),
    (orjson.dumps(BASE | {"type": "signup", "ts": -5}), "invalid_field", "ts"),
    # beyond year 9999: such a time would become its entities' watermark (docs/performance.md, round 31)
    (orjson.dumps(BASE | {"type": "signup", "ts": 253402300800000}), "invalid_field", "ts"),
    (orjson.dumps(BASE | {"type": "signup", "ts": 2 ** 64 - 1}), "invalid_field", "ts"),
    (orjson.dumps(BASE | {"type": "signup", "user_id": ""}), "invalid_field", "user_id"),
    (orjson.dumps(BASE | {"type": "signup", "ip": 1234}), "invalid_field", "ip"),
    (orjson.dumps(BASE | {"type": "payment", "amount": -1, "currency": "USD", "merchant_id": "m"}), "invalid_field", "amount"),
    (orjson.dumps(BASE | {"type": "payment", "amount": 1, "currency": "usd", "merchant_id": "m"}), "invalid_field", "currency"),
    (orjson.dumps(BASE | {"type": "payment", "amount": 1, "currency": "USD"}), "missing_field", "merchant_id"),
    (orjson.dumps(BASE | {"type": "report", "target_id": "x", "reason": "meh"}), "invalid_field", "reason"),
    (orjson.dumps(BASE | {"type": "post", "text": "x" * 70_000}), "oversized", "65536"),
])
def test_malformed_events_are_rejected_with_reason(raw, reason, mentions):
    with pytest.raises(ContractViolation) as info:
        decode_event(raw, max_bytes=65536)
    assert info.value.reason == reason
    assert mentions in info.value.detail


def test_labels_are_validated():
    good = {"event_id": "e1", "label": "abuse", "source": "chargeback", "ts": 5, "schema_version": 1}
    assert decode_label(orjson.dumps(good), 1000)["label"] == "abuse"
    with pytest.raises(ContractViolation, match="label"):
        decode_label(orjson.dumps(good | {"label": "maybe"}), 1000)
    with pytest.raises(ContractViolation) as info:
        decode_label(orjson.dumps({"event_id": "e1"}), 1000)
    assert info.value.reason == "missing_field"
    with pytest.raises(ContractViolation, match="ts"):
        decode_label(orjson.dumps(good | {"ts": 253402300800000}), 1000)


def test_the_last_event_time_a_contract_allows_is_scored():
    from detectors.features import extract

    event = decode_event(orjson.dumps(BASE | {"type": "login", "success": False, "ip": "1.2.3.4",
                                              "ts": 253402300799999}), max_bytes=65536)
    assert extract(event, {}).features["ip_distinct_users_10m"] == 1.0


def test_dead_letter_records_honour_their_contract():
    violation = ContractViolation("not_json", "unexpected character")
    record = dead_letter(violation, value=b"{oops", key=None, topic="events", partition=2, offset=41, now_ms=7)
    schemas.check("dead_letter", record)
    assert record["value_b64"] == "e29vcHM=" and record["key_b64"] is None


def test_simulated_stream_honours_contracts_and_outputs_do_too():
    detector = Detector(ModelSet.new(min_labels_per_class=1))
    store = LocalStore()
    kinds = {"event": 0, "label": 0, "malformed": 0}
    alerts = 0
    for rec in simulate(SMALL):
        kinds[rec.kind] += 1
        if rec.kind == "malformed":
            with pytest.raises(ContractViolation):
                decode_event(rec.value, 65536)
        elif rec.kind == "label":
            label = decode_label(rec.value, 65536)
            schemas.check("label", label)
        else:
            event = decode_event(rec.value, 65536)
            assert rec.key == event["user_id"].encode()
            out = store.score(detector, event, now_ms=1)
            schemas.check("risk_score", out.risk_score)
            if out.alert:
                alerts += 1
                schemas.check("alert", out.alert)
    assert all(kinds.values()), kinds
    assert alerts > 0


def test_fast_validator_agrees_with_the_reference_validator():
    """The compiled validator on the hot path must accept and reject exactly what
    the draft 2020-12 reference validator does."""
    from jsonschema import Draft202012Validator

    from detectors.events import _load_object

    cases = [orjson.dumps(BASE | r) for r in (
        {"type": "signup"}, {"type": "login", "success": True}, {"type": "login", "success": 1},
        {"type": "payment", "amount": 1, "currency": "USD"}, {"type": "payment", "amount": 1, "currency": "USD", "merchant_id": None},
        {"type": "payment", "amount": 1, "currency": "USD", "terminal_id": "t"}, {"type": "post", "text": 5},
        {"type": "comment", "text": "x"}, {"type": "message", "text": "x", "recipient_id": ""},
        {"type": "follow", "target_user_id": "x", "ip": None, "device_id": 7}, {"type": "report", "target_id": "t", "reason": "spam"},
    )] + [rec.value for rec in simulate(SMALL) if rec.kind != "label"]
    checked = 0
    for raw in cases:
        try:
            record = _load_object(raw, 65536)
        except ContractViolation:
            continue
        kind = record.get("type") if record.get("type") in schemas.EVENT_TYPES else "envelope"
        reference = Draft202012Validator(schemas.load(kind), registry=schemas._registry(1)).is_valid(record)
        try:
            schemas._fast(kind)(record)
            fast = True
        except Exception:
            fast = False
        assert fast == reference, raw[:200]
        checked += 1
    assert checked > 100
