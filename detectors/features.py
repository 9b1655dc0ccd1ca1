"""Per-user windowed features on event time, in one compact record per user.

The record keeps two rings of time buckets (10 s buckets for the last minute,
5 min buckets for the last hour), small recency maps of IPs, devices and
merchants, and recent text signatures. One event is one read and one write of
that record, never one write per window.

Windows end at the user's *watermark*, the largest event time seen for them.
An out-of-order event still inside a ring is counted in its own bucket; one
older than the ring only updates lifetime fields. A window therefore covers
between W and W + one bucket width of event time (bucket resolution).

>>> state, f = update_user(None, {"type": "login", "ts": 0, "user_id": "u",
...                               "ip": "1.2.3.4", "success": False})
>>> f["login_fail_1h"], f["ip_new_for_user"]
(1.0, 1.0)
>>> state, f = update_user(state, {"type": "login", "ts": 30_000, "user_id": "u",
...                                "ip": "1.2.3.4", "success": True})
>>> f["logins_1h"], f["login_fail_ratio_1h"], f["ip_new_for_user"]
(2.0, 0.5, 0.0)
"""

from __future__ import annotations

import hashlib
from typing import Any

from detectors.text import signature, url_count

FINE_WIDTH_MS = 10_000
FINE_BUCKETS = 6  # 1 minute
COARSE_WIDTH_MS = 300_000
COARSE_BUCKETS = 12  # 1 hour
RECENT_KEYS = 16  # IPs / devices / merchants remembered per user
RECENT_TEXTS = 24
IP_MEMORY_MS = 30 * 86_400_000
TEXT_MEMORY_MS = 3_600_000
SMALL_PAYMENT = 5.0

CHANNELS = (
    "events", "logins", "login_failures", "signups", "content", "follows",
    "likes", "reports", "payments", "payments_small", "payments_declined", "payment_cents",
)
_CH = {name: i for i, name in enumerate(CHANNELS)}
CONTENT_TYPES = frozenset(("post", "comment", "message"))

# name -> human description; the order is the model's feature order.
FEATURES: dict[str, str] = {
    "events_1m": "events by this account in the last minute",
    "events_1h": "events by this account in the last hour",
    "logins_1h": "login attempts in the last hour",
    "login_fail_1m": "failed logins in the last minute",
    "login_fail_1h": "failed logins in the last hour",
    "login_fail_ratio_1h": "share of failed logins in the last hour",
    "login_failed": "this login failed",
    "ip_new_for_user": "IP never seen for this account (30 days)",
    "device_new_for_user": "device never seen for this account (30 days)",
    "distinct_ips_1h": "distinct IPs in the last hour",
    "distinct_devices_1h": "distinct devices in the last hour",
    "account_age_h": "hours since the account was first seen",
    "secs_since_last_event": "seconds since this account's previous event",
    "content_1m": "posts/comments/messages in the last minute",
    "content_1h": "posts/comments/messages in the last hour",
    "follows_1m": "follows in the last minute",
    "follows_1h": "follows in the last hour",
    "likes_1h": "likes in the last hour",
    "reports_1h": "reports filed in the last hour",
    "text_len": "text length (characters)",
    "text_urls": "links in the text",
    "text_dup_1h": "near-duplicate texts posted in the last hour",
    "payments_1h": "payments in the last hour",
    "payments_small_1h": f"payments under {SMALL_PAYMENT:g} in the last hour",
    "payments_declined_1h": "declined payments in the last hour",
    "payment_amount": "amount of this payment",
    "payment_amount_1h": "total paid in the last hour",
    "distinct_merchants_1h": "distinct merchants/terminals paid in the last hour",
    "is_signup": "event is a signup",
    "is_login": "event is a login",
    "is_content": "event is a post/comment/message",
    "is_follow": "event is a follow",
    "is_like": "event is a like",
    "is_report": "event is a report",
    "is_payment": "event is a payment",
}
FEATURE_NAMES = tuple(FEATURES)


def _short_hash(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=5).hexdigest()


def _add_to_ring(ring: list[list[int]], ts: int, watermark: int, width: int, n: int, deltas: list[tuple[int, int]]) -> list[list[int]]:
    """Adds channel deltas at ``ts`` and drops buckets outside the ring ending at ``watermark``."""
    newest = watermark // width
    oldest = newest - n + 1
    ring = [b for b in ring if b[0] >= oldest]
    idx = ts // width
    if idx < oldest:
        return ring
    for bucket in ring:
        if bucket[0] == idx:
            break
    else:
        bucket = [idx] + [0] * len(CHANNELS)
        ring.append(bucket)
        ring.sort(key=lambda b: b[0])
    for ch, delta in deltas:
        bucket[1 + ch] += delta
    return ring


def _ring_sums(ring: list[list[int]]) -> list[int]:
    sums = [0] * len(CHANNELS)
    for bucket in ring:
        for i in range(len(CHANNELS)):
            sums[i] += bucket[1 + i]
    return sums


def _touch(recent: dict[str, int], key: str, ts: int, keep: int) -> bool:
    """Records ``key`` at ``ts``; returns True if it was not remembered before."""
    is_new = key not in recent
    recent[key] = max(ts, recent.get(key, ts))
    if len(recent) > keep:
        for old in sorted(recent, key=recent.__getitem__)[: len(recent) - keep]:
            del recent[old]
    return is_new


def _count_since(recent: dict[str, int], since: int) -> int:
    return sum(1 for t in recent.values() if t > since)


def _deltas(event: dict[str, Any]) -> list[tuple[int, int]]:
    kind = event["type"]
    deltas = [(_CH["events"], 1)]
    if kind == "login":
        deltas.append((_CH["logins"], 1))
        if not event["success"]:
            deltas.append((_CH["login_failures"], 1))
    elif kind == "signup":
        deltas.append((_CH["signups"], 1))
    elif kind in CONTENT_TYPES:
        deltas.append((_CH["content"], 1))
    elif kind == "follow":
        deltas.append((_CH["follows"], 1))
    elif kind == "like":
        deltas.append((_CH["likes"], 1))
    elif kind == "report":
        deltas.append((_CH["reports"], 1))
    elif kind == "payment":
        amount = float(event["amount"])
        deltas.append((_CH["payments"], 1))
        deltas.append((_CH["payment_cents"], int(round(amount * 100))))
        if amount < SMALL_PAYMENT:
            deltas.append((_CH["payments_small"], 1))
        if event.get("status") == "declined":
            deltas.append((_CH["payments_declined"], 1))
    return deltas


def new_user_state() -> dict[str, Any]:
    return {"v": 1, "first": None, "last": None, "fine": [], "coarse": [], "ips": {}, "devs": {}, "mer": {}, "txt": []}


def update_user(state: dict[str, Any] | None, event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Folds one valid event into the user's record; returns the record and the
    feature values as of this event (the event itself included)."""
    if state is None:
        state = new_user_state()
    ts = int(event["ts"])
    kind = event["type"]
    previous = state["last"]
    watermark = ts if previous is None else max(previous, ts)
    if state["first"] is None or ts < state["first"]:
        state["first"] = ts
    state["last"] = watermark

    deltas = _deltas(event)
    state["fine"] = _add_to_ring(state["fine"], ts, watermark, FINE_WIDTH_MS, FINE_BUCKETS, deltas)
    state["coarse"] = _add_to_ring(state["coarse"], ts, watermark, COARSE_WIDTH_MS, COARSE_BUCKETS, deltas)
    m = _ring_sums(state["fine"])
    h = _ring_sums(state["coarse"])

    for recent in (state["ips"], state["devs"]):
        for key in [k for k, t in recent.items() if t < watermark - IP_MEMORY_MS]:
            del recent[key]
    ip_new = device_new = 0.0
    if event.get("ip"):
        ip_new = float(_touch(state["ips"], _short_hash(event["ip"]), ts, RECENT_KEYS))
    if event.get("device_id"):
        device_new = float(_touch(state["devs"], _short_hash(event["device_id"]), ts, RECENT_KEYS))
    hour_ago = watermark - 3_600_000

    text_len = text_urls = text_dup = 0.0
    if kind in CONTENT_TYPES:
        text = event["text"]
        sig = signature(text)
        texts = [t for t in state["txt"] if t[1] > watermark - TEXT_MEMORY_MS]
        text_dup = float(sum(1 for t in texts if t[0] == sig))
        texts.append([sig, ts])
        state["txt"] = texts[-RECENT_TEXTS:]
        text_len = float(len(text))
        text_urls = float(url_count(text))

    payment_amount = 0.0
    if kind == "payment":
        payment_amount = float(event["amount"])
        merchant = event.get("merchant_id") or event.get("terminal_id")
        if merchant:
            _touch(state["mer"], _short_hash(merchant), ts, RECENT_KEYS)
    state["mer"] = {k: t for k, t in state["mer"].items() if t > hour_ago}

    logins_h = h[_CH["logins"]]
    features = {
        "events_1m": float(m[_CH["events"]]),
        "events_1h": float(h[_CH["events"]]),
        "logins_1h": float(logins_h),
        "login_fail_1m": float(m[_CH["login_failures"]]),
        "login_fail_1h": float(h[_CH["login_failures"]]),
        "login_fail_ratio_1h": h[_CH["login_failures"]] / logins_h if logins_h else 0.0,
        "login_failed": 1.0 if kind == "login" and not event["success"] else 0.0,
        "ip_new_for_user": ip_new,
        "device_new_for_user": device_new,
        "distinct_ips_1h": float(_count_since(state["ips"], hour_ago)),
        "distinct_devices_1h": float(_count_since(state["devs"], hour_ago)),
        "account_age_h": (watermark - state["first"]) / 3_600_000,
        "secs_since_last_event": 86_400.0 if previous is None else min(86_400.0, max(0, ts - previous) / 1000),
        "content_1m": float(m[_CH["content"]]),
        "content_1h": float(h[_CH["content"]]),
        "follows_1m": float(m[_CH["follows"]]),
        "follows_1h": float(h[_CH["follows"]]),
        "likes_1h": float(h[_CH["likes"]]),
        "reports_1h": float(h[_CH["reports"]]),
        "text_len": text_len,
        "text_urls": text_urls,
        "text_dup_1h": text_dup,
        "payments_1h": float(h[_CH["payments"]]),
        "payments_small_1h": float(h[_CH["payments_small"]]),
        "payments_declined_1h": float(h[_CH["payments_declined"]]),
        "payment_amount": payment_amount,
        "payment_amount_1h": h[_CH["payment_cents"]] / 100,
        "distinct_merchants_1h": float(len(state["mer"])),
        "is_signup": float(kind == "signup"),
        "is_login": float(kind == "login"),
        "is_content": float(kind in CONTENT_TYPES),
        "is_follow": float(kind == "follow"),
        "is_like": float(kind == "like"),
        "is_report": float(kind == "report"),
        "is_payment": float(kind == "payment"),
    }
    return state, features
