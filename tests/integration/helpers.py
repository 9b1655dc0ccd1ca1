"""Builders for test records."""

from __future__ import annotations

import orjson


def event(event_id: str, kind: str, ts: int, user_id: str, **fields: object) -> dict:
    return {"event_id": event_id, "type": kind, "schema_version": 1, "ts": ts, "user_id": user_id,
            "ip": fields.pop("ip", "100.64.1.1"), "device_id": fields.pop("device_id", "d-1"), **fields}


def as_record(e: dict) -> tuple[bytes, bytes]:
    return e["user_id"].encode(), orjson.dumps(e)

