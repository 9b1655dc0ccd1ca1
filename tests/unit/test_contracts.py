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
    (orjson.dumps(BASE | {"type": "payment", "amount": 1, "currency": "USD\n", "merchant_id": "m"}), "invalid_field", "currency"),
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


# JSON values a producer might send in any field: the types, bounds and lengths the contracts test
PALETTE = (None, True, False, 0, 1, -1, 1.0, 1.5, -0.0, 2 ** 63, 253402300799999, 253402300799999.0,
           253402300800000, "", "a", "x" * 8, "x" * 9, "x" * 64, "x" * 65, "x" * 128, "x" * 129, "é" * 128,
           "é" * 129, "USD", "usd", "USD\n", "US", "approved", "spam", "login", "signup", [], ["a"], {}, {"a": 1})


def _mutations(record: dict) -> list:
    """``record`` with each of its fields and every field its contracts name dropped, or set to each
    value of ``PALETTE``."""
    names = set(record)
    for kind in schemas.EVENT_TYPES + ("envelope", "label"):
        names |= set(schemas.load(kind).get("properties", {}))
    out = [{k: v for k, v in record.items() if k != name} for name in record]
    out += [record | {name: value} for name in sorted(names) for value in PALETTE]
    return out


def _fast_validators_agree_with_the_reference(records: list, contract_of) -> int:
    from detectors.contracts import acceptor

    checked = 0
    for record in records:
        kind = contract_of(record)
        reference = schemas.validator(kind).is_valid(record)
        assert acceptor(kind)(record) == reference, (kind, record)
        assert schemas.fast_acceptor(kind)(record) == reference, (kind, record)
        checked += 1
    return checked


def test_fast_validators_agree_with_the_reference_validator():
    """The check trees (``detectors.contracts``) and fastjsonschema's code must accept and reject
    exactly what the draft 2020-12 reference validator does: simulated events, and each of them
    with every field dropped or set to a value of every JSON type, at and beyond its bounds."""
    bases = [BASE | r for r in (
        {"type": "signup"}, {"type": "login", "success": True},
        {"type": "payment", "amount": 1, "currency": "USD", "merchant_id": "m"},
        {"type": "payment", "amount": 1.25, "currency": "USD", "terminal_id": "t", "status": None},
        {"type": "post", "text": "x"}, {"type": "comment", "text": "x", "target_id": "p"},
        {"type": "message", "text": "x", "recipient_id": "r"}, {"type": "follow", "target_user_id": "x"},
        {"type": "like", "target_id": "t"}, {"type": "report", "target_id": "t", "reason": "spam"},
    )]
    simulated = [orjson.loads(rec.value) for rec in simulate(SMALL) if rec.kind == "event"]
    records = simulated + [m for base in bases for m in _mutations(base)]

    def contract_of(record: dict) -> str:
        return record["type"] if record.get("type") in schemas.EVENT_TYPES else "envelope"

    assert _fast_validators_agree_with_the_reference(records, contract_of) > 10_000
    accepted = sum(schemas.validator(contract_of(r)).is_valid(r) for r in records)
    assert 0.2 * len(records) < accepted < 0.9 * len(records), accepted  # both answers well exercised


def test_fast_label_validators_agree_with_the_reference_validator():
    base = {"event_id": "e1", "label": "abuse", "source": "chargeback", "ts": 5, "schema_version": 1,
            "user_id": "u1", "category": "spam"}
    assert _fast_validators_agree_with_the_reference(_mutations(base), lambda _: "label") > 1_000


@pytest.mark.parametrize("schema, value, valid", [
    ({"const": 1}, True, False), ({"const": 1}, 1.0, True), ({"const": True}, 1, False),
    ({"enum": ["a", None]}, None, True), ({"enum": ["a", None]}, False, False), ({"enum": [0]}, False, False),
    ({"type": "integer"}, 2.0, True), ({"type": "integer"}, 2.5, False), ({"type": "integer"}, True, False),
    ({"type": "number"}, True, False), ({"type": ["string", "null"], "maxLength": 2}, "abc", False),
    ({"maxLength": 2}, 12345, True), ({"minimum": 0}, "a", True), ({"minimum": 0}, -0.5, False),
    ({"maximum": 10}, 10.0, True), ({"pattern": "^[A-Z]{3}$"}, "ABC\n", False), ({"pattern": "B"}, "ABC", True),
    ({"required": ["a"]}, [], True), ({"required": ["a"]}, {"b": 1}, False),
    ({"properties": {"a": {"type": "string"}}}, {"a": None}, False), ({"properties": {"a": False}}, {}, True),
    ({"anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, {"b": 1}, True),
    ({"anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, {"c": 1}, False),
    ({"allOf": [{"minLength": 1}, {"maxLength": 1}]}, "ab", False), ({"title": "t", "format": "email"}, "x", True),
])
def test_a_check_tree_means_what_its_schema_means(schema, value, valid):
    from detectors.contracts import compile_schema

    assert schemas.Reference(schema).is_valid(value) == valid  # the reference's meaning...
    assert compile_schema(schema).accepts(value) == valid  # ...is the tree's


def test_a_contract_the_tree_cannot_compile_is_checked_by_fastjsonschema():
    from detectors.contracts import UnsupportedSchema, acceptor, compile_schema

    for schema in ({"type": "string", "contentEncoding": "base64"}, {"properties": {"a": {"uniqueItems": True}}},
                   {"enum": [[1]]}, {"type": "decimal"}, {"$ref": "#/x"}):
        with pytest.raises(UnsupportedSchema):
            compile_schema(schema)
    acceptor.cache_clear()
    try:
        schemas._fast("label")  # compiled before the contract is "changed" below
        original = schemas.bundled

        def with_an_unknown_keyword(name, version=1):
            return original(name, version) | {"uniqueItems": True}

        schemas.bundled = with_an_unknown_keyword
        accepts = acceptor("label")
        assert accepts.__qualname__.startswith("fast_acceptor")
        assert accepts({"event_id": "e1", "label": "abuse", "source": "qa_sample", "ts": 1, "schema_version": 1})
        assert not accepts({"event_id": "e1", "label": "maybe", "source": "qa_sample", "ts": 1, "schema_version": 1})
    finally:
        schemas.bundled = original
        acceptor.cache_clear()


def test_the_reference_is_the_final_word_when_a_fast_check_rejects(caplog):
    """A fast check (the check tree, or fastjsonschema) that rejects a record the reference
    accepts is overruled, with a warning to report it; a record the reference rejects too is
    refused with the reference's reason."""
    label = {"event_id": "e1", "label": "abuse", "source": "qa_sample", "ts": 1, "schema_version": 1}
    with caplog.at_level("WARNING", logger="schemas"):
        schemas.check("label", label, accepts=lambda record: False)
    assert "label contract's fast check rejected a record its reference validator accepts" in caplog.text
    with pytest.raises(ContractViolation, match="'maybe' is not one of"):
        schemas.check("label", dict(label, label="maybe"), accepts=lambda record: False)
