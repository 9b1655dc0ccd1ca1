"""The feature vector of one event: event features plus every entity's features.

``extract`` is the single function the live worker, offline tools and tests use
to turn an event and its entities' state into features and updated state.

>>> event = {"event_id": "e1", "type": "signup", "ts": 0, "user_id": "u1", "device_id": "d1"}
>>> result = extract(event, {})
>>> result.features["is_signup"], result.features["device_signups_10m"], result.features.get("is_login", 0.0)
(1.0, 1.0, 0.0)
>>> sorted(result.updates)
['device', 'user']
"""

from __future__ import annotations

from typing import Mapping

import cython
import orjson
from cython.cimports.libc.math import copysign

from detectors.catalog import ENTITIES, EVENT_FEATURES, CONTENT_TYPES, Entity, Event
from detectors.entities import Record, apply_event, channel_amounts, is_idle, shard_features
from detectors.reputation import reputation_features
from detectors.sketches import simhash


@cython.cclass
class EntityState:
    """What the store holds for one entity: the shard this event writes to
    (``own``) and, for sharded entities, the other shards as last replicated.

    A caller that keeps records decoded between events (the live worker, within a
    batch) passes the own shard as ``record`` instead: ``extract`` then updates that
    object in place, so an entity's record is decoded once and encoded once per
    batch, not per event. Other shards may be given decoded too (read only).
    """
    # An extension type when compiled (read-only fields, made without a Python frame:
    # the worker makes one per entity per event), a plain class from source.
    own = cython.declare(object, visibility="readonly")  # bytes | None
    others = cython.declare(tuple, visibility="readonly")  # tuple[bytes | Record, ...]
    reputation = cython.declare(object, visibility="readonly")  # label-derived record (detectors/reputation.py)
    record = cython.declare(object, visibility="readonly")  # Record | None

    def __init__(self, own: bytes | None = None, others: tuple[bytes | Record, ...] = (),
                 reputation: bytes | None = None, record: Record | None = None) -> None:
        self.own, self.others, self.reputation, self.record = own, others, reputation, record

    def __repr__(self) -> str:
        return f"EntityState(own={self.own!r}, others={self.others!r}, reputation={self.reputation!r}, " \
               f"record={self.record!r})"

    @cython.ccall  # a C call from extract
    def own_record(self) -> Record | None:
        """The own shard decoded: ``record`` as given, else ``own``'s bytes decoded (None if neither)."""
        if self.record is not None:
            return self.record
        return orjson.loads(self.own) if self.own else None


@cython.cclass
class Extraction:
    """One event's features and the records it changed (see ``extract``)."""
    # the features that are not 0 (-0.0 is kept: it prints as -0.0) in catalogue order; a
    # catalogue name absent is 0, as every reader of features takes it (see ``extract``)
    features = cython.declare(dict, visibility="readonly")
    records = cython.declare(dict, visibility="readonly")  # entity name -> its own shard's record, if changed
    keys = cython.declare(dict, visibility="readonly")  # entity name -> key in this event
    _updates = cython.declare(object)

    def __init__(self, features: dict[str, float], records: dict[str, Record],
                 keys: dict[str, str] | None = None) -> None:
        self.features, self.records, self.keys = features, records, {} if keys is None else keys
        self._updates = None

    @property
    def updates(self) -> dict[str, bytes]:
        """The changed records as the store keeps them (as they were extracted: read it before
        the next event updates a record kept decoded)."""
        if self._updates is None:
            self._updates = {name: encode_record(record) for name, record in self.records.items()}
        return self._updates


def encode_record(record: Record) -> bytes:
    """An entity record as the store and its changelog keep it."""
    return orjson.dumps(record)


def stored_is_idle(entity: Entity, raw: bytes, watermark_ms: int) -> bool:
    """``is_idle`` of a record as stored. The expiry sweep asks it of ~2 records per event: its
    last event time is read from the record's first bytes (orjson keeps the keys in the order
    ``new_record`` made them, first and last event time first), in C when compiled, where a
    regular expression took ~0.4 µs and decoding the record ~1.7 (docs/performance.md, round
    41). Bytes that do not start as ``encode_record`` writes them are decoded whole.

    >>> from detectors.catalog import IP
    >>> stored_is_idle(IP, b'{"f":5,"l":10,"r":{}}', 10 + IP.idle_expiry_ms + 1)
    True
    >>> stored_is_idle(IP, b'{"l":10,"f":5}', 10 + IP.idle_expiry_ms), stored_is_idle(IP, b'{"f":null,"l":null}', 10**15)
    (False, False)
    """
    last = _stored_last(raw)
    if last is _NOT_AS_ENCODED:
        return is_idle(entity, orjson.loads(raw), watermark_ms)
    return last is not None and last < watermark_ms - entity.idle_expiry_ms


_NOT_AS_ENCODED = object()
_FIRST, _LAST = b'{"f":', b',"l":'


@cython.locals(n=cython.Py_ssize_t, at=cython.Py_ssize_t, end=cython.Py_ssize_t, k=cython.Py_ssize_t,
               value=cython.longlong, negative=cython.bint)
def _stored_last(raw: bytes) -> object:
    """The last event time of a stored record that starts ``{"f":<int|null>,"l":<int|null>``
    followed by ``,`` or ``}``: an int, or None for null; ``_NOT_AS_ENCODED`` for other bytes."""
    n = len(raw)
    if n < 12 or not raw.startswith(_FIRST):
        return _NOT_AS_ENCODED
    at = _after_time(raw, 5, n)
    if at < 0 or not raw.startswith(_LAST, at):
        return _NOT_AS_ENCODED
    end = _after_time(raw, at + 5, n)
    if end < 0 or end >= n or (raw[end] != 44 and raw[end] != 125):  # "," or "}"
        return _NOT_AS_ENCODED
    if raw[at + 5] == 110:  # "n": null
        return None
    negative = raw[at + 5] == 45
    k = at + 5 + negative
    if end - k > 18:  # beyond a C long long
        return int(raw[at + 5:end])
    value = 0
    while k < end:
        value = value * 10 + (raw[k] - 48)
        k += 1
    return -value if negative else value


@cython.cfunc
@cython.locals(at=cython.Py_ssize_t, n=cython.Py_ssize_t, start=cython.Py_ssize_t)
def _after_time(raw: bytes, at, n) -> cython.Py_ssize_t:
    """Where the time at ``at`` (``null`` or ``-?[0-9]+``) ends in ``raw``; -1 if there is none."""
    if at + 4 <= n and raw[at] == 110 and raw[at + 1] == 117 and raw[at + 2] == 108 and raw[at + 3] == 108:
        return at + 4  # null
    if at < n and raw[at] == 45:  # "-"
        at += 1
    start = at
    while at < n and 48 <= raw[at] <= 57:
        at += 1
    return at if at > start else -1


def entity_keys(event: Event) -> dict[str, str]:
    """The entities this event carries, e.g. {"user": "u1", "ip": "1.2.3.4"}."""
    keys = {}
    for name, entity in ENTITIES.items():
        key = entity.key(event)
        if key:
            keys[name] = key
    return keys


@cython.locals(state=EntityState)
def extract(event: Event, states: Mapping[str, EntityState], source: tuple[int, int] | None = None,
            keys: dict[str, str] | None = None) -> Extraction:
    """Features of ``event`` and the new bytes of each entity record it changes.

    The features are those that are not 0, in catalogue order: most of an event's are 0 (70 of
    101 on a typical event), every reader takes an absent one as 0, and a risk score carries these
    very ones (docs/performance.md, rounds 21 and 39).

    ``source`` is the input record's (partition, offset). Each record remembers
    the last input it applied, so a redelivered event (at-least-once after a
    crash or rebalance) is scored again but never counted twice. ``keys`` is the event's
    ``entity_keys``, if the caller has them already (it read the states by them).
    """
    features = {}
    type_feature = _TYPE_FEATURES.get(event["type"])
    if type_feature is not None:
        features[type_feature] = 1.0
    for name, compute in _EVENT_FEATURES:
        value = compute(event)
        if value != 0.0 or copysign(1.0, value) < 0:  # most are 0.0: left out (-0.0 prints as -0.0: set)
            features[name] = value
    fingerprint = simhash(event["text"]) if event["type"] in CONTENT_TYPES else None
    records: dict[str, dict] = {}
    reputations = None  # label counts come last in the catalogue: added after every entity's features
    if keys is None:
        keys = entity_keys(event)
    amounts = channel_amounts(event)
    for name, entity in ENTITIES.items():
        if name not in keys:
            continue
        state = states.get(name) or _NO_STATE
        own = state.own_record()
        others = [shard if isinstance(shard, dict) else orjson.loads(shard) for shard in state.others if shard]
        lasts = [r["l"] for r in ([own] if own else []) + others]
        previous_last = max(lasts) if lasts else None
        novelty: dict[str, bool | None] = {}
        if not (own and source and already_applied(own, source)):
            own, novelty = apply_event(entity, own, event, fingerprint if entity.track_texts else None, amounts)
            if source is not None:
                applied = own.get("o")
                if applied is None:
                    own["o"] = list(source)
                else:  # in place: no new list per event
                    applied[0], applied[1] = source[0], source[1]
            records[name] = own
        shard_features(entity, [own, *others], event, previous_last, novelty, fingerprint, features, True)
        state_reputation = state.reputation
        if state_reputation:  # most entities never had a label: their counts stay 0
            if reputations is None:
                reputations = []
            reputations.append(reputation_features(name, orjson.loads(state_reputation), event["ts"]))
    if reputations is not None:
        for counts in reputations:
            for name, count in counts.items():
                if count != 0.0:  # never negative
                    features[name] = count
    return Extraction(features, records, keys)


_EVENT_FEATURES = tuple((f.name, f.compute) for f in EVENT_FEATURES if f.of_type is None)
_TYPE_FEATURES = {f.of_type: f.name for f in EVENT_FEATURES if f.of_type is not None}
_NO_STATE = EntityState()


def already_applied(record: Record, source: tuple[int, int]) -> bool:
    applied = record.get("o")
    return applied is not None and applied[0] == source[0] and applied[1] >= source[1]
