"""Per-user features against brute-force references on random, out-of-order streams."""

from __future__ import annotations

import random

import orjson
import pytest

from detectors.features import (
    COARSE_BUCKETS, COARSE_WIDTH_MS, FEATURE_NAMES, FEATURES, FINE_BUCKETS, FINE_WIDTH_MS, update_user,
)

KINDS = ("login", "post", "follow", "like", "payment", "signup", "report", "message")


def _random_event(rng: random.Random, ts: int) -> dict:
    kind = rng.choice(KINDS)
    e = {"event_id": f"e{rng.getrandbits(32)}", "type": kind, "ts": ts, "user_id": "u",
         "ip": rng.choice(("1.1.1.1", "2.2.2.2", "3.3.3.3", None)), "device_id": rng.choice(("d1", "d2", None))}
    if kind == "login":
        e["success"] = rng.random() < 0.6
    elif kind in ("post", "message"):
        e["text"] = rng.choice(("hello world", "Hello,   WORLD 7", "buy http://x.example now", "something else"))
    elif kind == "payment":
        e.update(amount=rng.choice((0.5, 3.0, 25.0)), currency="USD", merchant_id=rng.choice(("m1", "m2")),
                 status=rng.choice(("approved", "declined")))
    return e


def _in_window(ts: int, watermark: int, width: int, buckets: int) -> bool:
    return watermark // width - buckets < ts // width <= watermark // width


def _reference(seen: list[dict], width: int, buckets: int) -> dict[str, float]:
    watermark = max(e["ts"] for e in seen)
    window = [e for e in seen if _in_window(e["ts"], watermark, width, buckets)]
    logins = [e for e in window if e["type"] == "login"]
    failed = [e for e in logins if not e["success"]]
    payments = [e for e in window if e["type"] == "payment"]
    return {
        "events": len(window),
        "logins": len(logins),
        "failures": len(failed),
        "ratio": len(failed) / len(logins) if logins else 0.0,
        "content": sum(e["type"] in ("post", "comment", "message") for e in window),
        "follows": sum(e["type"] == "follow" for e in window),
        "payments": len(payments),
        "small": sum(e["amount"] < 5 for e in payments),
        "declined": sum(e["status"] == "declined" for e in payments),
        "amount": round(sum(e["amount"] for e in payments), 2),
    }


@pytest.mark.parametrize("seed", range(12))
def test_windows_match_brute_force_on_out_of_order_streams(seed):
    rng = random.Random(seed)
    state = None
    seen: list[dict] = []
    ts = 1_000_000_000
    for _ in range(400):
        # Mostly forward in time with gaps crossing bucket and window boundaries, sometimes late.
        step = rng.choice((0, 500, 3_000, 9_999, 10_000, 61_000, 299_999, 300_000, 3_700_000))
        ts += step
        event_ts = ts - (rng.randrange(0, 700_000) if rng.random() < 0.2 else 0)
        event = _random_event(rng, event_ts)
        # State goes through bytes like in the worker.
        state, features = update_user(orjson.loads(orjson.dumps(state)) if state else None, event)
        seen.append(event)
        minute = _reference(seen, FINE_WIDTH_MS, FINE_BUCKETS)
        hour = _reference(seen, COARSE_WIDTH_MS, COARSE_BUCKETS)
        assert features["events_1m"] == minute["events"]
        assert features["events_1h"] == hour["events"]
        assert features["logins_1h"] == hour["logins"]
        assert features["login_fail_1m"] == minute["failures"]
        assert features["login_fail_1h"] == hour["failures"]
        assert features["login_fail_ratio_1h"] == pytest.approx(hour["ratio"])
        assert features["content_1m"] == minute["content"]
        assert features["content_1h"] == hour["content"]
        assert features["follows_1m"] == minute["follows"]
        assert features["payments_1h"] == hour["payments"]
        assert features["payments_small_1h"] == hour["small"]
        assert features["payments_declined_1h"] == hour["declined"]
        assert features["payment_amount_1h"] == pytest.approx(hour["amount"])
        assert features["account_age_h"] == pytest.approx((max(e["ts"] for e in seen) - min(e["ts"] for e in seen)) / 3.6e6)


def test_every_feature_is_described_and_emitted_in_order():
    _, features = update_user(None, {"type": "signup", "ts": 0, "user_id": "u"})
    assert tuple(features) == FEATURE_NAMES
    assert all(FEATURES[name] for name in FEATURE_NAMES)


def test_new_ip_and_device_are_remembered_per_user():
    state, f = update_user(None, {"type": "login", "ts": 0, "user_id": "u", "ip": "1.1.1.1", "device_id": "d", "success": True})
    assert f["ip_new_for_user"] == f["device_new_for_user"] == 1.0
    state, f = update_user(state, {"type": "login", "ts": 1000, "user_id": "u", "ip": "1.1.1.1", "device_id": "d", "success": True})
    assert f["ip_new_for_user"] == f["device_new_for_user"] == 0.0
    state, f = update_user(state, {"type": "login", "ts": 2000, "user_id": "u", "ip": None, "device_id": None, "success": False})
    assert f["ip_new_for_user"] == 0.0 and f["distinct_ips_1h"] == 1.0
    # Forgotten after 30 days of event time.
    state, f = update_user(state, {"type": "login", "ts": 31 * 86_400_000, "user_id": "u", "ip": "1.1.1.1", "success": True})
    assert f["ip_new_for_user"] == 1.0


def test_near_duplicate_texts_are_counted_within_the_hour():
    state = None
    texts = ["FREE phone!!! http://a.example/1 code 11", "free PHONE http://a.example/2 code 98", "Free phone... http://a.example/3 CODE 5"]
    for i, text in enumerate(texts):
        state, f = update_user(state, {"type": "post", "ts": i * 60_000, "user_id": "u", "text": text})
    assert f["text_dup_1h"] == 2 and f["text_urls"] == 1
    state, f = update_user(state, {"type": "post", "ts": 2 * 3_600_000, "user_id": "u", "text": texts[0]})
    assert f["text_dup_1h"] == 0


def test_state_is_compact():
    state = None
    rng = random.Random(1)
    for i in range(5000):
        state, _ = update_user(state, _random_event(rng, i * 7_000))
    assert len(orjson.dumps(state)) < 2048
