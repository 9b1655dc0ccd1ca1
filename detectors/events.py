"""Decoding and validating input records: bytes in, a valid dict or a reason out.

Cheap structural checks run first so the common failures (not JSON, unknown
type, oversized) never reach the schema validator. A record is then checked by
its contract's check tree (``detectors.contracts``); one it rejects is explained
by the reference validator, and the versioned JSON Schema contract in
``schemas/`` is the final word.

>>> decode_event(b'{"type": "login"}', max_bytes=1000)
Traceback (most recent call last):
...
schemas.ContractViolation: missing_field: (record): 'event_id' is a required property
>>> decode_event(b"[1, 2", max_bytes=1000)
Traceback (most recent call last):
...
schemas.ContractViolation: not_json: unexpected end of data: line 1 column 6 (char 5)
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

import schemas
from detectors.contracts import acceptor
from schemas import ContractViolation

CONTRACT_VERSION = schemas.CURRENT_VERSION
_KNOWN_TYPES = frozenset(schemas.EVENT_TYPES)


def _load_object(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    if raw is None:
        raise ContractViolation("not_json", "record has no value (null)")
    if len(raw) > max_bytes:
        raise ContractViolation("oversized", f"record is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContractViolation("not_json", str(exc)) from None
    if not isinstance(record, dict):
        raise ContractViolation("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    return record


def _check_version(record: dict[str, Any]) -> None:
    version = record.get("schema_version", CONTRACT_VERSION)
    if version != CONTRACT_VERSION:
        raise ContractViolation(
            "unsupported_schema_version",
            f"schema_version {version!r}; this worker reads version {CONTRACT_VERSION}",
        )


def decode_event(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    """The event in ``raw`` if it honours its contract; else raises ContractViolation."""
    record = _load_object(raw, max_bytes)
    kind = record.get("type")
    if kind is not None and kind not in _KNOWN_TYPES:
        raise ContractViolation("unknown_type", f"type {kind!r} is not one of {sorted(_KNOWN_TYPES)}")
    _check_version(record)
    contract = kind if kind is not None else "envelope"
    _check(contract, record)
    return record


def decode_label(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    record = _load_object(raw, max_bytes)
    _check_version(record)
    _check("label", record)
    return record


def _check(contract: str, record: dict[str, Any]) -> None:
    """``schemas.check`` with the contract's check tree, called only for a record the tree
    rejects: most records pass, and a Python call of ``schemas.check`` each was 1.5% of a
    worker's scoring thread (docs/performance.md, round 41)."""
    accepts = acceptor(contract)
    if not accepts(record):
        schemas.check(contract, record, accepts=accepts)


def dead_letter(
    violation: ContractViolation,
    *,
    value: bytes | None,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    now_ms: int,
) -> dict[str, Any]:
    """The ``dead_letter`` record for a rejected input: original bytes, reason, origin."""
    return {
        "schema_version": CONTRACT_VERSION,
        "reason": violation.reason,
        "error": violation.detail[:2000],
        "source_topic": topic,
        "partition": partition,
        "offset": offset,
        "key_b64": base64.b64encode(key).decode() if key is not None else None,
        "value_b64": base64.b64encode(value or b"").decode(),
        "received_at": now_ms,
    }
