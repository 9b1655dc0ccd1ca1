"""The feature catalogue: every entity, channel, window and feature, declared in one place.

An *entity* is a key an event carries (user, IP, device, merchant/terminal,
card). A *channel* is a per-event quantity (a count of matching events, or a
value such as a payment amount) kept in time buckets on event time. A
*feature* names one aggregation of channels or sketches over a window.

``abuse-detector features`` prints this catalogue; ``entities.py`` maintains
the state it implies and computes the features.

>>> [w for w in WINDOWS]
['1m', '10m', '1h', '24h', '7d']
>>> FEATURE_BY_NAME["ip_distinct_users_1h"].describe()
'distinct accounts seen on this IP in the last 1h'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from detectors.reputation import WINDOWS as LABEL_WINDOWS
from detectors.reputation import feature_name

Event = dict[str, Any]

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR

# window name -> (bucket width ms, buckets). A window answers with bucket
# resolution: it covers between W and W + one bucket of event time.
WINDOWS: dict[str, tuple[int, int]] = {
    "1m": (10_000, 6),
    "10m": (MINUTE, 10),
    "1h": (5 * MINUTE, 12),
    "24h": (HOUR, 24),
    "7d": (DAY, 7),
}
WINDOW_MS = {name: width * n for name, (width, n) in WINDOWS.items()}
CONTENT_TYPES = frozenset(("post", "comment", "message"))
ALL_TYPES = frozenset(("signup", "login", "post", "comment", "message", "follow", "like", "report", "payment"))
SMALL_PAYMENT = 5.0


@dataclass(frozen=True)
class Channel:
    """A quantity added to the current time bucket by each matching event."""
    name: str
    types: frozenset[str]
    description: str
    where: Callable[[Event], bool] | None = None
    value: Callable[[Event], float] | None = None  # None: counts events

    def amount(self, event: Event) -> float:
        if event["type"] not in self.types or (self.where is not None and not self.where(event)):
            return 0.0
        return 1.0 if self.value is None else float(self.value(event))


def _failed_login(e: Event) -> bool:
    return not e["success"]


def _small(e: Event) -> bool:
    return e["amount"] < SMALL_PAYMENT


def _declined(e: Event) -> bool:
    return e.get("status") == "declined"


CHANNELS: dict[str, Channel] = {c.name: c for c in (
    Channel("events", ALL_TYPES, "events"),
    Channel("logins", frozenset({"login"}), "login attempts"),
    Channel("login_failures", frozenset({"login"}), "failed logins", where=_failed_login),
    Channel("signups", frozenset({"signup"}), "signups"),
    Channel("content", CONTENT_TYPES, "posts, comments and messages"),
    Channel("messages", frozenset({"message"}), "direct messages"),
    Channel("follows", frozenset({"follow"}), "follows"),
    Channel("likes", frozenset({"like"}), "likes"),
    Channel("reports", frozenset({"report"}), "reports filed"),
    Channel("payments", frozenset({"payment"}), "payments"),
    Channel("payments_small", frozenset({"payment"}), f"payments under {SMALL_PAYMENT:g}", where=_small),
    Channel("payments_declined", frozenset({"payment"}), "declined payments", where=_declined),
    Channel("payment_amount", frozenset({"payment"}), "amount paid", value=lambda e: e["amount"]),
)}


# -- feature kinds ---------------------------------------------------------
@dataclass(frozen=True)
class Feature:
    entity: str
    window: str | None

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def aggregation(self) -> str:
        return type(self).__name__.lower()

    def describe(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass(frozen=True)
class Count(Feature):
    channel: str = ""

    @property
    def name(self) -> str:
        return f"{self.entity}_{self.channel}_{self.window}"

    def describe(self) -> str:
        return f"{CHANNELS[self.channel].description} on this {ENTITY_NOUN[self.entity]} in the last {self.window}"


@dataclass(frozen=True)
class Sum(Count):
    @property
    def name(self) -> str:
        return f"{self.entity}_{self.channel}_sum_{self.window}"

    def describe(self) -> str:
        return f"total {CHANNELS[self.channel].description} on this {ENTITY_NOUN[self.entity]} in the last {self.window}"


@dataclass(frozen=True)
class Mean(Feature):
    channel: str = ""
    per: str = ""

    @property
    def name(self) -> str:
        return f"{self.entity}_{self.channel}_mean_{self.window}"

    def describe(self) -> str:
        return (f"mean {CHANNELS[self.channel].description} per {CHANNELS[self.per].description[:-1]} "
                f"on this {ENTITY_NOUN[self.entity]} in the last {self.window}")


@dataclass(frozen=True)
class Ratio(Feature):
    numerator: str = ""
    denominator: str = ""
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.entity}_{self.label}_{self.window}"

    def describe(self) -> str:
        return (f"share of {CHANNELS[self.denominator].description} that were {CHANNELS[self.numerator].description} "
                f"on this {ENTITY_NOUN[self.entity]} in the last {self.window}")


@dataclass(frozen=True)
class RateOfChange(Feature):
    """(count in the last hour + 1) / (mean hourly count over the 24 hours before it + 1)."""
    channel: str = ""

    @property
    def name(self) -> str:
        return f"{self.entity}_{self.channel}_hour_vs_day"

    def describe(self) -> str:
        return (f"{CHANNELS[self.channel].description} in the last hour relative to the hourly mean of the day "
                f"before, on this {ENTITY_NOUN[self.entity]}")


@dataclass(frozen=True)
class Distinct(Feature):
    sketch: str = ""

    @property
    def name(self) -> str:
        return f"{self.entity}_distinct_{self.sketch}_{self.window}"

    def describe(self) -> str:
        return f"distinct {SKETCH_NOUN[self.sketch]} seen on this {ENTITY_NOUN[self.entity]} in the last {self.window}"


@dataclass(frozen=True)
class SinceFirstSeen(Feature):
    @property
    def name(self) -> str:
        return f"{self.entity}_age_h"

    def describe(self) -> str:
        return f"hours since this {ENTITY_NOUN[self.entity]} was first seen"


@dataclass(frozen=True)
class SinceLastSeen(Feature):
    @property
    def name(self) -> str:
        return f"{self.entity}_secs_since_last"

    def describe(self) -> str:
        return f"seconds since this {ENTITY_NOUN[self.entity]}'s previous event (capped at one day)"


@dataclass(frozen=True)
class NearDuplicates(Feature):
    @property
    def name(self) -> str:
        return f"{self.entity}_near_duplicate_texts_{self.window}"

    def describe(self) -> str:
        return f"earlier texts from this {ENTITY_NOUN[self.entity]} in the last {self.window} that nearly duplicate this one"


@dataclass(frozen=True)
class IsNew(Feature):
    """1 if the event's value was never seen for this entity within the sketch's memory."""
    sketch: str = ""

    @property
    def name(self) -> str:
        return f"{SKETCH_NOUN[self.sketch][:-1]}_new_for_{self.entity}"

    def describe(self) -> str:
        return f"this {SKETCH_NOUN[self.sketch][:-1]} was never seen for this {ENTITY_NOUN[self.entity]} before"


# -- entities --------------------------------------------------------------
def _merchant(e: Event) -> str | None:
    return (e.get("merchant_id") or e.get("terminal_id")) if e["type"] == "payment" else None


@dataclass(frozen=True)
class Sketch:
    """A sliding distinct-count sketch of one event field, kept for ``memory_ms``."""
    name: str
    field: Callable[[Event], str | None]
    memory_ms: int


@dataclass(frozen=True)
class Entity:
    name: str
    key: Callable[[Event], str | None]
    # Users are the key of the events topic, so one worker owns each user.
    # Other entities appear on every partition: each partition keeps a shard
    # and readers merge the shards (see docs/partitioning.md).
    sharded: bool
    features: tuple[Feature, ...]
    sketches: tuple[Sketch, ...] = ()
    track_texts: bool = False
    # idle state is deleted this long after the entity's last event (event time)
    idle_expiry_ms: int = 8 * DAY
    ring_layout: dict[int, tuple[str, ...]] = field(default_factory=dict)  # bucket width -> channels
    ring_lengths: dict[int, int] = field(default_factory=dict)  # bucket width -> buckets kept


ENTITY_NOUN = {"user": "account", "ip": "IP", "device": "device", "merchant": "merchant", "card": "card"}
SKETCH_NOUN = {"users": "accounts", "ips": "IPs", "devices": "devices", "merchants": "merchants", "cards": "cards"}

_IPS = Sketch("ips", lambda e: e.get("ip"), 30 * DAY)
_DEVICES = Sketch("devices", lambda e: e.get("device_id"), 30 * DAY)
_USERS = Sketch("users", lambda e: e["user_id"], 7 * DAY)
_MERCHANTS = Sketch("merchants", _merchant, DAY)
_CARDS = Sketch("cards", lambda e: e.get("card_fingerprint") if e["type"] == "payment" else None, DAY)


def _entity(name: str, key: Callable[[Event], str | None], sharded: bool, features: list[Feature],
            sketches: tuple[Sketch, ...] = (), track_texts: bool = False) -> Entity:
    return Entity(name, key, sharded, tuple(features), sketches, track_texts)


USER = _entity("user", lambda e: e["user_id"], False, [
    Count("user", "1m", channel="events"), Count("user", "1h", channel="events"), Count("user", "24h", channel="events"),
    RateOfChange("user", None, channel="events"),
    Count("user", "1h", channel="logins"),
    Count("user", "1m", channel="login_failures"), Count("user", "1h", channel="login_failures"),
    Count("user", "24h", channel="login_failures"),
    Ratio("user", "1h", numerator="login_failures", denominator="logins", label="login_fail_ratio"),
    Count("user", "1m", channel="content"), Count("user", "1h", channel="content"),
    Count("user", "1h", channel="messages"),
    Count("user", "1m", channel="follows"), Count("user", "1h", channel="follows"),
    Count("user", "1h", channel="likes"), Count("user", "24h", channel="reports"),
    Count("user", "1h", channel="payments"), Count("user", "1h", channel="payments_small"),
    Count("user", "1h", channel="payments_declined"),
    Sum("user", "24h", channel="payment_amount"),
    Mean("user", "24h", channel="payment_amount", per="payments"),
    Distinct("user", "1h", sketch="ips"), Distinct("user", "24h", sketch="ips"),
    Distinct("user", "24h", sketch="devices"), Distinct("user", "1h", sketch="merchants"),
    IsNew("user", None, sketch="ips"), IsNew("user", None, sketch="devices"),
    NearDuplicates("user", "1h"),
    SinceFirstSeen("user", None), SinceLastSeen("user", None),
], sketches=(_IPS, _DEVICES, _MERCHANTS), track_texts=True)

IP = _entity("ip", lambda e: e.get("ip"), True, [
    Count("ip", "1m", channel="events"), Count("ip", "1h", channel="events"),
    RateOfChange("ip", None, channel="events"),
    Count("ip", "10m", channel="logins"), Count("ip", "10m", channel="login_failures"),
    Count("ip", "1h", channel="login_failures"), Count("ip", "24h", channel="login_failures"),
    Ratio("ip", "1h", numerator="login_failures", denominator="logins", label="login_fail_ratio"),
    Count("ip", "1h", channel="signups"), Count("ip", "24h", channel="signups"),
    Count("ip", "1h", channel="content"), Count("ip", "1h", channel="payments_declined"),
    Distinct("ip", "10m", sketch="users"), Distinct("ip", "1h", sketch="users"), Distinct("ip", "24h", sketch="users"),
    Distinct("ip", "1h", sketch="devices"),
    SinceFirstSeen("ip", None),
], sketches=(_USERS, _DEVICES))

DEVICE = _entity("device", lambda e: e.get("device_id"), True, [
    Count("device", "1h", channel="events"),
    Count("device", "10m", channel="signups"), Count("device", "24h", channel="signups"),
    Count("device", "7d", channel="signups"),
    Count("device", "1h", channel="login_failures"), Count("device", "1h", channel="payments"),
    Distinct("device", "1h", sketch="users"), Distinct("device", "24h", sketch="users"),
    Distinct("device", "7d", sketch="users"), Distinct("device", "24h", sketch="ips"),
    SinceFirstSeen("device", None),
], sketches=(_USERS, _IPS))

MERCHANT = _entity("merchant", _merchant, True, [
    Count("merchant", "10m", channel="payments"), Count("merchant", "1h", channel="payments"),
    RateOfChange("merchant", None, channel="payments"),
    Count("merchant", "1h", channel="payments_small"), Count("merchant", "1h", channel="payments_declined"),
    Mean("merchant", "24h", channel="payment_amount", per="payments"),
    Distinct("merchant", "1h", sketch="users"), Distinct("merchant", "1h", sketch="cards"),
], sketches=(_USERS, _CARDS))

CARD = _entity("card", _CARDS.field, True, [
    Count("card", "1h", channel="payments"), Count("card", "1h", channel="payments_declined"),
    Distinct("card", "24h", sketch="users"), Distinct("card", "1h", sketch="merchants"),
], sketches=(_USERS, _MERCHANTS))

ENTITIES: dict[str, Entity] = {e.name: e for e in (USER, IP, DEVICE, MERCHANT, CARD)}


@dataclass(frozen=True)
class EventFeature:
    """A feature of the event itself (no state). ``of_type`` marks the one-hot of an event
    type (1.0 for events of that type, as ``compute`` says): ``extract`` sets it by the type."""
    name: str
    description: str
    compute: Callable[[Event], float]
    entity: str = "event"
    window: str | None = None
    aggregation: str = "event"
    of_type: str | None = None

    def describe(self) -> str:
        return self.description


def _text(e: Event) -> str:
    return e.get("text") or "" if e["type"] in CONTENT_TYPES else ""


EVENT_FEATURES: tuple[EventFeature, ...] = tuple(
    [EventFeature(f"is_{kind}", f"event is a {kind}", lambda e, k=kind: float(e["type"] == k), of_type=kind)
     for kind in sorted(ALL_TYPES)]
    + [
        EventFeature("login_failed", "this login failed", lambda e: float(e["type"] == "login" and not e["success"])),
        EventFeature("payment_amount", "amount of this payment", lambda e: float(e["amount"]) if e["type"] == "payment" else 0.0),
        EventFeature("payment_declined", "this payment was declined", lambda e: float(e["type"] == "payment" and e.get("status") == "declined")),
        EventFeature("text_length", "characters in this text", lambda e: float(len(_text(e)))),
        EventFeature("text_links", "links in this text", lambda e: float(_text(e).lower().count("http"))),
        EventFeature("has_ip", "the event carries an IP", lambda e: float(bool(e.get("ip")))),
        EventFeature("has_device", "the event carries a device id", lambda e: float(bool(e.get("device_id")))),
    ]
)

@dataclass(frozen=True)
class LabelCount:
    """Confirmed-abusive events involving this entity, counted from each label's decision time
    (see ``detectors/reputation.py``)."""
    entity: str
    window: str
    aggregation: str = "labels"

    @property
    def name(self) -> str:
        return feature_name(self.entity, self.window)

    def describe(self) -> str:
        return f"events confirmed abusive on this {ENTITY_NOUN[self.entity]} in the last {self.window} (by label time)"


LABEL_FEATURES: tuple[LabelCount, ...] = tuple(LabelCount(e, w) for e in ENTITIES for w in LABEL_WINDOWS)

ALL_FEATURES: tuple[Feature | EventFeature | LabelCount, ...] = (
    EVENT_FEATURES + tuple(f for e in ENTITIES.values() for f in e.features) + LABEL_FEATURES
)
FEATURE_BY_NAME = {f.name: f for f in ALL_FEATURES}
FEATURE_NAMES = tuple(FEATURE_BY_NAME)
assert len(FEATURE_NAMES) == len(ALL_FEATURES), "feature names must be unique"


_DESCRIPTIONS = {name: feature.describe() for name, feature in FEATURE_BY_NAME.items()}


def describe(name: str) -> str:
    """Human words for a feature name (or the name itself if it is not in the catalogue)."""
    return _DESCRIPTIONS.get(name, name)


def _layout(entity: Entity) -> dict[int, tuple[str, ...]]:
    """Which channels each bucket width must keep for this entity's features."""
    need: dict[str, set[str]] = {}
    for f in entity.features:
        if isinstance(f, (Count, Sum)):
            need.setdefault(f.window, set()).add(f.channel)  # type: ignore[arg-type]
        elif isinstance(f, Mean):
            need.setdefault(f.window, set()).update((f.channel, f.per))  # type: ignore[arg-type]
        elif isinstance(f, Ratio):
            need.setdefault(f.window, set()).update((f.numerator, f.denominator))  # type: ignore[arg-type]
        elif isinstance(f, RateOfChange):
            need.setdefault("1h", set()).add(f.channel)
            need.setdefault("24h", set()).add(f.channel)
    return {WINDOWS[w][0]: tuple(sorted(chs)) for w, chs in need.items()}


def _lengths(entity: Entity) -> dict[int, int]:
    lengths = {width: n for width, n in WINDOWS.values() if width in entity.ring_layout}
    if any(isinstance(f, RateOfChange) for f in entity.features):
        lengths[HOUR] = 25  # the current hour plus the 24 before it
    return lengths


for _entity_decl in ENTITIES.values():
    object.__setattr__(_entity_decl, "ring_layout", _layout(_entity_decl))
    object.__setattr__(_entity_decl, "ring_lengths", _lengths(_entity_decl))


def catalogue_rows() -> list[dict[str, str]]:
    """The catalogue as rows for printing: name, entity, window, aggregation, description."""
    return [{"name": f.name, "entity": f.entity, "window": f.window or "-", "aggregation": f.aggregation,
             "description": f.describe()} for f in ALL_FEATURES]
