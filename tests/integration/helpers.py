"""Builders for test records."""

from __future__ import annotations

import orjson


def event(event_id: str, kind: str, ts: int, user_id: str, **fields: object) -> dict:
    return {"event_id": event_id, "type": kind, "schema_version": 1, "ts": ts, "user_id": user_id,
            "ip": fields.pop("ip", "100.64.1.1"), "device_id": fields.pop("device_id", "d-1"), **fields}


def as_record(e: dict) -> tuple[bytes, bytes]:
    return e["user_id"].encode(), orjson.dumps(e)



T0 = 1_767_225_600_000


def stuffing_login(i: int, user: str) -> dict:
    """A failed login from a rotating attacker IP: labelled abuse by ``moderator_label``."""
    return event(f"bad-{i}", "login", T0 + i * 1000, user, ip=f"203.0.113.{i % 250}", device_id=None,
                 success=False, failure_reason="bad_password")


def benign_post(i: int, user: str) -> dict:
    return event(f"good-{i}", "post", T0 + i * 1000, user, text=f"lovely walk in the park number {i}")


def moderator_label(e: dict, ts: int) -> tuple[bytes, bytes]:
    """The label record (keyed by event id) for an event built above: ``bad-*`` is abuse."""
    return e["event_id"].encode(), orjson.dumps({
        "event_id": e["event_id"], "label": "abuse" if e["event_id"].startswith("bad") else "benign",
        "source": "moderator", "ts": ts, "schema_version": 1})


def bootstrap_model_file(path) -> tuple[object, dict]:
    """A warm-start model file fitted (by the real bootstrap) on stuffing logins and benign posts."""
    from detectors.bootstrap import bootstrap

    history = sorted([stuffing_login(i, f"victim-{i}") for i in range(40)]
                     + [benign_post(i, f"user-{i % 5}") for i in range(40)], key=lambda e: e["ts"])
    labels = {e["event_id"]: orjson.loads(moderator_label(e, e["ts"] + 60_000)[1]) for e in history}
    models, report = bootstrap([orjson.dumps(e) for e in history], labels, holdout=0.25)
    path.write_bytes(models.to_bytes())
    return models, report
