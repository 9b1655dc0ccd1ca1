"""Every aggregation of the catalogue against a brute-force reference on random streams
(out-of-order events, window and bucket boundaries), and shards merging to the same answer."""

from __future__ import annotations

import math
import random

import orjson
import pytest

from detectors.catalog import (
    ENTITIES, EVENT_FEATURES, FEATURE_NAMES, WINDOW_MS, WINDOWS, Count, Distinct, IsNew, Mean, NearDuplicates,
    RateOfChange, Ratio, SinceFirstSeen, SinceLastSeen, Sum, CHANNELS, HOUR,
)
from detectors.entities import (
    apply_event, entity_features, is_idle, merge_records, new_record, ring_buckets, shard_features,
)
from detectors.features import EntityState, encode_record, entity_keys, extract, stored_is_idle
from detectors.sketches import (
    EXACT_LIMIT, HLL_RELATIVE_ERROR, NEAR_DUPLICATE_BITS, _entries, distinct_add, distinct_count, distinct_expire,
    distinct_merge, distinct_union, hamming, is_exact, new_distinct, normalize_text, simhash,
)

KINDS = ("login", "post", "message", "follow", "like", "payment", "signup", "report", "comment")
TEXTS = ("hello world from the park", "Hello,   WORLD from the park 7", "buy now http://x.example/1 free phone",
         "buy NOW http://x.example/2 free phone!!", "something else entirely different")


def random_event(rng: random.Random, ts: int, n_users: int = 5, n_ips: int = 4) -> dict:
    kind = rng.choice(KINDS)
    e = {"event_id": f"e{rng.getrandbits(40)}", "type": kind, "ts": ts, "user_id": f"u{rng.randrange(n_users)}",
         "ip": rng.choice([f"10.0.0.{i}" for i in range(n_ips)] + [None]),
         "device_id": rng.choice(("d1", "d2", "d3", None))}
    if kind == "login":
        e["success"] = rng.random() < 0.6
    elif kind in ("post", "message", "comment"):
        e["text"] = rng.choice(TEXTS)
    elif kind == "payment":
        e.update(amount=rng.choice((0.5, 3.0, 25.0, 99.99)), currency="USD", merchant_id=rng.choice(("m1", "m2", None)),
                 terminal_id="t9", card_fingerprint=rng.choice(("c1", "c2", None)),
                 status=rng.choice(("approved", "declined", None)))
    return e


def random_stream(seed: int, n: int = 300) -> list[dict]:
    rng = random.Random(seed)
    ts = 1_767_225_600_000 + rng.randrange(3_600_000)
    out = []
    for _ in range(n):
        # Gaps that cross bucket and window edges, exact bucket edges, and late events.
        ts += rng.choice((0, 1, 999, 9_999, 10_000, 59_999, 60_000, 299_999, 300_000, 3_599_999, 3_600_000,
                          7_200_000, 86_400_000))
        late = rng.random() < 0.2
        out.append(random_event(rng, ts - (rng.randrange(1, 40 * 60_000) if late else 0)))
    return out


# -- the reference ------------------------------------------------------------------
def in_window(ts: int, watermark: int, window: str) -> bool:
    """The documented rule: buckets of the window's width ending at the watermark's bucket."""
    width, n = WINDOWS[window]
    return watermark // width - n < ts // width <= watermark // width


def reference(entity_name: str, seen: list[dict], event: dict) -> dict[str, float]:
    entity = ENTITIES[entity_name]
    key = entity.key(event)
    mine = [e for e in seen if entity.key(e) == key]
    watermark = max(e["ts"] for e in mine)
    out: dict[str, float] = {}

    def total(channel: str, window: str) -> float:
        ring_len = entity.ring_lengths[WINDOWS[window][0]]
        width = WINDOWS[window][0]
        # An event only counts if its bucket was still in the ring when it arrived.
        counted = []
        high = None
        for e in mine:
            high = e["ts"] if high is None else max(high, e["ts"])
            if e["ts"] // width > high // width - ring_len:
                counted.append(e)
        return sum(CHANNELS[channel].amount(e) for e in counted if in_window(e["ts"], watermark, window))

    for f in entity.features:
        if isinstance(f, (Count, Sum)):
            v = total(f.channel, f.window)
        elif isinstance(f, Mean):
            d = total(f.per, f.window)
            v = total(f.channel, f.window) / d if d else 0.0
        elif isinstance(f, Ratio):
            d = total(f.denominator, f.window)
            v = total(f.numerator, f.window) / d if d else 0.0
        elif isinstance(f, RateOfChange):
            newest = watermark // HOUR
            day = sum(CHANNELS[f.channel].amount(e) for e in mine if newest - 24 <= e["ts"] // HOUR < newest)
            v = (total(f.channel, "1h") + 1) / (day / 24 + 1)
        elif isinstance(f, Distinct):
            sketch = next(s for s in entity.sketches if s.name == f.sketch)
            since = (watermark - WINDOW_MS[f.window]) // 1000
            last: dict[str, int] = {}
            for e in mine:
                value = sketch.field(e)
                if value:
                    last[value] = max(last.get(value, 0), e["ts"] // 1000)
            v = sum(1 for t in last.values() if t >= since)
        elif isinstance(f, IsNew):
            continue  # memory semantics: test_new_ip_for_user_is_remembered_for_thirty_days
        elif isinstance(f, NearDuplicates):
            if event["type"] not in ("post", "comment", "message"):
                v = 0.0
            else:
                fp = simhash(event["text"])
                since = (watermark - WINDOW_MS[f.window]) // 1000
                texts = sorted((e["ts"] // 1000, simhash(e["text"])) for e in mine
                               if e["type"] in ("post", "comment", "message"))[-24:]
                texts = [t for t in texts if t[0] >= (watermark - 3_600_000) // 1000]
                own = (event["ts"] // 1000, fp)
                if own in texts:
                    texts.remove(own)
                v = sum(1 for t, h in texts if t >= since and hamming(h, fp) <= NEAR_DUPLICATE_BITS)
        elif isinstance(f, SinceFirstSeen):
            v = (watermark - min(e["ts"] for e in mine)) / HOUR
        elif isinstance(f, SinceLastSeen):
            before = [e["ts"] for e in mine[:-1]]
            v = 86_400.0 if not before else min(86_400.0, max(0, event["ts"] - max(before)) / 1000)
        out[f.name] = float(v)
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("entity_name", list(ENTITIES))
def test_entity_features_match_brute_force(entity_name, seed):
    entity = ENTITIES[entity_name]
    records: dict[str, dict] = {}
    seen: list[dict] = []
    checked = 0
    for event in random_stream(seed):
        key = entity.key(event)
        seen.append(event)
        if not key:
            continue
        previous = records.get(key)
        previous_last = previous["l"] if previous else None
        fp = simhash(event["text"]) if entity.track_texts and event["type"] in ("post", "comment", "message") else None
        # round-trip through bytes, as the worker stores it
        record, novelty = apply_event(entity, orjson.loads(orjson.dumps(previous)) if previous else None, event, fp)
        records[key] = record
        got = entity_features(entity, record, event, previous_last, novelty, fp)
        want = reference(entity_name, seen, event)
        for name, value in want.items():
            assert got[name] == pytest.approx(value), (name, event, got[name], value)
        checked += 1
    assert checked > 10


def test_bucket_values_stay_whole_numbers_or_cents():
    from detectors.entities import _add

    assert _add(2, 1.0) == 3 and type(_add(2, 1.0)) is int  # counts stay ints in the stored JSON
    assert _add(0.1, 0.2) == 0.3 and _add(19.99, 0.001) == 19.99  # amounts to the cent
    assert type(_add(2.0 ** 53, 2.0)) is int  # every double that large is whole
    assert _add(2 ** 60 + 1, 2) == 2 ** 60 + 3  # whole amounts beyond a double's precision add exactly
    assert _add(1e308, 1e308) == math.inf and math.isnan(_add(math.inf, -math.inf))


def test_a_late_events_bucket_joins_its_ring_in_bucket_order_and_is_pruned_with_it():
    """Rings are kept in bucket order (pruning looks at the oldest bucket only): a late event
    that opens a bucket between two others is placed between them."""
    ip = ENTITIES["ip"]
    login = {"type": "login", "user_id": "u1", "ip": "1.2.3.4", "success": False}
    record = None
    for ts in (600_000, 720_000, 660_000):  # the last is late: its minute lies between the others
        record, _ = apply_event(ip, record, dict(login, ts=ts))
    minute = ring_buckets(record["r"]["60000"])
    assert [bucket[0] for bucket in minute] == [10, 11, 12]
    assert all([b[0] for b in ring] == sorted(b[0] for b in ring) for ring in map(ring_buckets, record["r"].values()))
    later = 720_000 + ip.ring_lengths[60_000] * 60_000  # a minute past the oldest bucket's ring
    record, _ = apply_event(ip, record, dict(login, ts=later))
    assert [bucket[0] for bucket in ring_buckets(record["r"]["60000"])][0] > 10


def test_shards_merge_to_the_single_record_answer():
    """Any split of an entity's events over partitions merges to the unsplit features."""
    rng = random.Random(99)
    for entity_name in ("ip", "device", "merchant", "card"):
        entity = ENTITIES[entity_name]
        for seed in range(6):
            whole: dict[str, dict] = {}
            shards: dict[tuple[int, str], dict] = {}
            for event in random_stream(seed, n=200):
                key = entity.key(event)
                if not key:
                    continue
                previous_whole = whole.get(key)
                whole[key], _ = apply_event(entity, previous_whole, event)
                p = rng.randrange(4)
                shards[(p, key)], _ = apply_event(entity, shards.get((p, key)), event)
                view = merge_records(entity, [shards.get((q, key)) for q in range(4)])
                assert entity_features(entity, view, event, None) == pytest.approx(
                    entity_features(entity, whole[key], event, None)), (entity_name, seed, event)


@pytest.mark.parametrize("seed", range(4))
def test_features_read_from_shards_equal_the_merged_view(seed):
    """shard_features (what extract runs) answers as merge_records + entity_features, with
    shards whose sketch unions stay exact, pass EXACT_LIMIT and are HyperLogLogs, shards
    whose watermarks lag, late events and near-duplicate texts spread over shards."""
    rng = random.Random(seed)
    ts = 1_767_225_600_000
    shards: dict[tuple[int, str, str], dict] = {}
    compared = {"exact": 0, "hll": 0}
    for i in range(1500):
        ts += rng.choice((0, 500, 5_000, 30_000, 60_000, 299_999, 3_600_000))
        event = random_event(rng, ts - (rng.randrange(1, 3_600_000) if rng.random() < 0.1 else 0),
                             n_users=rng.choice((8, 80)), n_ips=3)
        event["device_id"] = rng.choice(("d1", "d2"))
        fp = simhash(event["text"]) if "text" in event else None
        for name in ("ip", "device", "merchant", "card", "user"):  # users are not sharded, but may be
            entity = ENTITIES[name]
            key = entity.key(event)
            if not key:
                continue
            own_partition = rng.randrange(4)
            own, novelty = apply_event(entity, shards.get((own_partition, name, key)), event,
                                       fp if entity.track_texts else None)
            shards[(own_partition, name, key)] = own
            others = [shards[(q, name, key)] for q in range(4) if q != own_partition and (q, name, key) in shards]
            want = entity_features(entity, merge_records(entity, [own, *others]), event, ts - 1, novelty, fp)
            got = shard_features(entity, [own, *others], event, ts - 1, novelty, fp)
            into_zeros = shard_features(entity, [own, *others], event, ts - 1, novelty, fp,
                                        out=dict.fromkeys(want, 0.0), zeroed=True)  # as extract calls it
            assert list(got) == list(want)
            assert list(map(repr, into_zeros.values())) == list(map(repr, got.values()))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (name, i)
            for sketch in entity.sketches:
                parts = [r["d"][sketch.name] for r in [own, *others] if sketch.name in r["d"]]
                if len(parts) > 1:
                    compared["exact" if is_exact(distinct_union(parts)) else "hll"] += 1
    assert compared["exact"] > 100 and compared["hll"] > 100, compared


def test_features_set_into_zeros_keep_a_negative_zero():
    """``zeroed`` leaves a 0.0 unset, never a -0.0 (it prints as -0.0): a ratio of 0 over a
    negative count, from a record whose bucket was written negative, is set."""
    user = ENTITIES["user"]
    login = {"type": "login", "ts": 60_000, "user_id": "u", "ip": "1.2.3.4", "success": True}
    record, _ = apply_event(user, None, login)
    five_minutes = user.ring_layout[300_000]  # the buckets of the 1h window
    ring = ring_buckets(record["r"]["300000"])
    ring[0][1 + five_minutes.index("logins")] = -1  # no packed ring holds it: kept as lists
    record["r"]["300000"] = ring
    plain = shard_features(user, [record], login, None)
    into_zeros = shard_features(user, [record], login, None, out=dict.fromkeys(plain, 0.0), zeroed=True)
    assert repr(plain["user_login_fail_ratio_1h"]) == "-0.0"
    assert list(map(repr, into_zeros.values())) == list(map(repr, plain.values()))


def test_new_ip_for_user_is_remembered_for_thirty_days():
    user = ENTITIES["user"]
    login = {"type": "login", "user_id": "u", "success": True, "ip": "1.1.1.1", "device_id": "d"}
    record, novelty = apply_event(user, None, dict(login, ts=0))
    assert novelty == {"ips": True, "devices": True}
    record, novelty = apply_event(user, record, dict(login, ts=86_400_000))
    assert novelty == {"ips": False, "devices": False}
    record, novelty = apply_event(user, record, dict(login, ts=32 * 86_400_000))
    assert novelty == {"ips": True, "devices": True}


def test_idle_entities_expire_by_event_time():
    ip = ENTITIES["ip"]
    record, _ = apply_event(ip, None, {"type": "signup", "ts": 0, "user_id": "u", "ip": "1.1.1.1"})
    assert not is_idle(ip, record, watermark_ms=ip.idle_expiry_ms)
    assert is_idle(ip, record, watermark_ms=ip.idle_expiry_ms + 1)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_sweeps_reading_of_stored_records_agrees_with_decoding_them(seed):
    """``stored_is_idle`` reads the last event time from a stored record's first bytes: it
    agrees with ``is_idle`` of the decoded record just below, at and just above the expiry,
    for records of every entity written by ``encode_record``, and for bytes it cannot read
    that way (keys in another order, a float time, no time yet), which it decodes whole."""
    rng = random.Random(seed)
    checked = 0
    for entity in ENTITIES.values():
        record = None
        for _ in range(40):
            event = {"type": rng.choice(["login", "post", "signup"]), "ts": rng.randrange(-10**6, 10**13),
                     "user_id": f"u{rng.randrange(5)}", "ip": "1.1.1.1", "device_id": "d", "text": "hello there",
                     "success": rng.random() < 0.5}
            record, _ = apply_event(entity, record, event)
            raw = encode_record(dict(record, o=[0, rng.randrange(100)]))
            other_order = orjson.dumps(dict(reversed(list(record.items()))))
            float_time = orjson.dumps(dict(record, l=float(record["l"]) + 0.5))
            for stored in (raw, other_order, float_time, encode_record(new_record())):
                decoded = orjson.loads(stored)
                last = decoded["l"] if decoded["l"] is not None else 0
                for watermark in (last + entity.idle_expiry_ms - 1, last + entity.idle_expiry_ms,
                                  int(last) + entity.idle_expiry_ms + 1):
                    assert stored_is_idle(entity, stored, watermark) == is_idle(entity, decoded, watermark), stored
                    checked += 1
    assert checked == len(ENTITIES) * 40 * 4 * 3


def test_extract_emits_the_features_that_are_not_zero_in_catalogue_order():
    """What a risk score carries as they are: every reader takes an absent feature as 0."""
    from detectors.reputation import add_label_stored

    event = {"event_id": "e", "type": "payment", "ts": 5, "user_id": "u", "ip": "1.1.1.1", "device_id": "d",
             "amount": 1.0, "currency": "USD", "merchant_id": "m", "card_fingerprint": "c"}
    result = extract(event, {})
    assert set(result.updates) == set(ENTITIES)
    assert result.features["ip_events_1m"] == 1 and result.features["card_payments_1h"] == 1
    again = extract(dict(event, event_id="f", ts=6),
                    {k: EntityState(v, reputation=add_label_stored(None, 1, 1) if k in ("card", "user") else None)
                     for k, v in result.updates.items()})
    assert again.features["merchant_payments_10m"] == 2 and again.features["user_secs_since_last"] == 0.001
    # label counts, last in the catalogue, come after every entity's features
    assert again.features["user_abuse_labels_1d"] == again.features["card_abuse_labels_28d"] == 1.0
    only_a_user = extract({"event_id": "g", "type": "signup", "ts": 7, "user_id": "v"}, {}).features
    assert not any(name.startswith(("ip_", "device_")) for name in only_a_user)  # absent entities: none
    for features in (result.features, again.features, only_a_user):
        assert tuple(features) == tuple(name for name in FEATURE_NAMES if name in features)
        assert all(value != 0.0 or math.copysign(1.0, value) < 0 for value in features.values())
        assert 5 < len(features) < len(FEATURE_NAMES)


def test_extract_sets_each_event_feature_as_the_catalogue_computes_it():
    """``extract`` sets a type's one-hot by the event's type and the other event features only
    where they are not 0.0: the values are still each feature's ``compute``, sign of zero included."""
    rng = random.Random(5)
    events = [random_event(rng, 1_767_225_600_000 + i) for i in range(300)]
    events += [{"event_id": "z", "type": "payment", "ts": 1, "user_id": "u", "amount": -0.0, "currency": "USD"},
               {"event_id": "t", "type": "a type the catalogue does not know", "ts": 2, "user_id": "u"}]
    kinds_seen = set()
    for event in events:
        features = extract(event, {}).features
        want = {f.name: repr(f.compute(event)) for f in EVENT_FEATURES}
        assert {name: repr(features.get(name, 0.0)) for name in want} == want, event
        kinds_seen.add(event["type"])
    assert repr(extract(events[-2], {}).features["payment_amount"]) == "-0.0"
    assert {f.of_type for f in EVENT_FEATURES if f.of_type} <= kinds_seen


# -- rings ---------------------------------------------------------------------------
def _packed_and_lists(entity, events):
    """Each event applied to a record whose rings stay packed, and to one whose rings are
    turned back into lists before every event (the reference form): their rings' buckets,
    values' types and features must agree event by event."""
    packed = lists = None
    for event in events:
        if lists is not None:
            lists["r"] = {width: ring_buckets(ring) for width, ring in lists["r"].items()}
        previous = packed["l"] if packed else None
        packed, novelty = apply_event(entity, packed, event)
        lists, _ = apply_event(entity, lists, event)
        assert all(type(ring) is str for ring in packed["r"].values())
        assert repr({w: ring_buckets(r) for w, r in packed["r"].items()}) == \
            repr({w: ring_buckets(r) for w, r in lists["r"].items()})
        assert repr(entity_features(entity, packed, event, previous, novelty)) == \
            repr(entity_features(entity, lists, event, previous, novelty))
    return packed


@pytest.mark.parametrize("seed", range(3))
def test_packed_rings_hold_what_list_rings_hold(seed):
    """Counts, amounts to the cent, late events between buckets, pruning, and counts that
    outgrow a ring's digits (a bucket of 70 logins needs two)."""
    rng = random.Random(seed)
    events = random_stream(seed, n=300)
    for i, event in enumerate(events):
        if event["type"] == "payment":
            event["amount"] = rng.choice((0.01, 0.1, 0.2, 19.99, 1e6 + 0.005, 7.125, 1234.5678, 0.0, 3, 2 ** 40))
    burst = dict(events[-1], type="login", success=False, ip="10.9.9.9")
    events += [dict(burst, ts=burst["ts"] + i) for i in range(70)]
    for name in ("user", "ip", "merchant", "card", "device"):
        record = _packed_and_lists(ENTITIES[name], events)
    assert max(ord(ring[0]) - 48 for ring in record["r"].values()) >= 1
    ip = _packed_and_lists(ENTITIES["ip"], events[-70:])
    assert {ord(ring[0]) - 48 for ring in ip["r"].values()} == {2}  # 70 > 63: two digits a value


def test_a_ring_is_one_string_that_json_keeps_as_it_is():
    from detectors.entities import _pack_ring

    ring = _pack_ring([[0, 0, 1], [5, 12, 19.99], [2 ** 36 - 1, 2 ** 47 - 1, (2 ** 47 - 1) / 100]], 2)
    assert ring.isascii() and ring.isprintable() and '"' not in ring and "\\" not in ring
    assert orjson.dumps(ring) == b'"' + ring.encode() + b'"'
    assert ring_buckets(ring) == [[0, 0, 1], [5, 12, 19.99], [2 ** 36 - 1, 2 ** 47 - 1, (2 ** 47 - 1) / 100]]
    assert len(ring) == 2 + 3 * (6 + 2 * 8)  # the largest value sets every value's width
    for unfit in ([[0, -1, 0]], [[0, 2 ** 47, 0]], [[0, 3.0, 0]], [[0, 0.001, 0]], [[0, True, 0]],
                  [[0, 1]], [[2 ** 36, 1, 0]], [[-1, 1, 0]], [[0, math.inf, 0]]):
        assert _pack_ring(unfit, 2) is None, unfit  # kept as lists, as written
    for corrupt in ("", "1", "01", ring[:-1], "9" + ring[1:], "0" + ring[1:], ring[:-1] + "\u00e9"):
        with pytest.raises(ValueError, match="not a ring"):  # read from a changelog someone else wrote
            ring_buckets(corrupt)


def test_the_readable_view_names_each_rings_channels_and_sizes_each_sketch():
    """What the worker's entity view shows: the same for packed rings and list rings."""
    from detectors.entities import readable

    user = ENTITIES["user"]
    record = None
    for i in range(EXACT_LIMIT + 40):  # past the exact range: a HyperLogLog of IPs
        record, _ = apply_event(user, record, {"type": "login", "ts": 1_000 * i, "user_id": "u", "success": True,
                                               "ip": f"10.1.{i}.1", "device_id": "d"})
    view = readable(user, record)
    assert view["rings"]["300000"]["channels"] == list(user.ring_layout[300_000])
    logins = [b[1 + user.ring_layout[300_000].index("logins")] for b in view["rings"]["300000"]["buckets"]]
    assert sum(logins) == EXACT_LIMIT + 40
    assert view["sketches"]["devices"] == {"form": "exact", "distinct": 1}
    assert view["sketches"]["ips"]["form"] == "hyperloglog"
    assert abs(view["sketches"]["ips"]["distinct"] - (EXACT_LIMIT + 40)) <= 4 * HLL_RELATIVE_ERROR * (EXACT_LIMIT + 40)
    as_lists = dict(record, r={width: ring_buckets(ring) for width, ring in record["r"].items()})
    assert readable(user, as_lists) == view
    assert orjson.loads(orjson.dumps(view)) == view


def test_a_value_that_does_not_pack_keeps_its_ring_as_lists_until_it_is_pruned():
    """A payment beyond 2 ** 47 cents is added as ``_add`` adds it, in a list ring; the ring
    packs again once that bucket has left it."""
    user = ENTITIES["user"]
    pay = {"type": "payment", "user_id": "u", "currency": "USD", "merchant_id": "m", "amount": 19.99}
    record, _ = apply_event(user, None, dict(pay, ts=3_600_000))
    assert type(record["r"]["3600000"]) is str
    record, _ = apply_event(user, record, dict(pay, ts=3_600_001, amount=1e13 + 0.5))
    from detectors.entities import _add

    hours, total = record["r"]["3600000"], _add(19.99, 1e13 + 0.5)
    assert type(hours) is list and hours[0][1 + user.ring_layout[HOUR].index("payment_amount")] == total
    assert entity_features(user, record, dict(pay, ts=3_600_001), 3_600_000)["user_payment_amount_sum_24h"] == total
    later = 3_600_000 + user.ring_lengths[HOUR] * HOUR
    record, _ = apply_event(user, record, dict(pay, ts=later))
    assert type(record["r"]["3600000"]) is str and ring_buckets(record["r"]["3600000"])[0][0] == later // HOUR
    # a bucket index beyond 6 digits (a time past the contracts' year 9999) is kept as lists too
    beyond = (1 << 36) * 10_000
    record, _ = apply_event(user, record, dict(pay, ts=beyond))
    assert type(record["r"]["10000"]) is list and record["r"]["10000"][-1][0] == 1 << 36


# -- sketches ------------------------------------------------------------------------
def test_distinct_is_exact_up_to_the_limit():
    sketch = new_distinct()
    for i in range(EXACT_LIMIT):
        sketch = distinct_add(sketch, f"v{i}", ts_s=i)
    assert is_exact(sketch)
    assert [distinct_count(sketch, since_s=s) for s in (0, 10, EXACT_LIMIT)] == [EXACT_LIMIT, EXACT_LIMIT - 10, 0]


def test_a_sketch_is_one_string_that_json_keeps_as_it_is():
    from detectors.sketches import TIME_LIMIT_S, _entries, distinct_insert, hash32, hashed

    h = hashed("1.2.3.4")
    assert h == hash32("1.2.3.4")
    sketch, known = distinct_insert(new_distinct(), h, 5)
    assert (sketch[0], _entries(sketch), known) == ("x", [(h, 5)], False)
    for i in range(EXACT_LIMIT):
        sketch = distinct_add(sketch, f"v{i}", ts_s=TIME_LIMIT_S - 1 - i)  # the largest time kept, too
    assert not is_exact(sketch) and sketch[0] == "h"
    assert sketch.isascii() and sketch.isprintable() and '"' not in sketch and "\\" not in sketch
    assert orjson.dumps(sketch) == b'"' + sketch.encode() + b'"'
    with pytest.raises(ValueError, match="a sketch keeps times from 0"):
        distinct_add(sketch, "late", ts_s=TIME_LIMIT_S)
    exact = distinct_add(new_distinct(), "a", ts_s=1)
    for corrupt in ("", exact[:-1], "q" + exact[1:], exact[:-1] + "\u00e9", "h" + exact[1:]):
        with pytest.raises(ValueError, match="not a sketch"):  # read from a changelog someone else wrote
            distinct_count(corrupt, 0)


def _as_written_before_round_31(sketch: str):
    """A packed sketch in the dict form records held before round 31."""
    from detectors.sketches import _entries

    if sketch[0] == "x":
        return {"x": {str(h): ts for h, ts in _entries(sketch)}}
    fronts: dict[str, list] = {}
    for key, ts in _entries(sketch):
        fronts.setdefault(str(key >> 5), []).append([key & 31, ts])
    return {"h": fronts}


@pytest.mark.parametrize("values", [5, EXACT_LIMIT, 400])
def test_a_sketch_in_the_dict_form_reads_as_its_packed_form(values):
    from detectors.sketches import _packed, distinct_counts, distinct_insert

    rng = random.Random(values)
    packed = new_distinct()
    for i in range(3 * values):
        packed = distinct_add(packed, f"v{rng.randrange(values)}", ts_s=1000 + i)
    old = _as_written_before_round_31(packed)
    assert _packed(old) == packed and is_exact(old) == is_exact(packed) == (values <= EXACT_LIMIT)
    since = (0, 1000 + values, 1000 + 2 * values, 1000 + 3 * values)
    assert distinct_counts(old, since) == distinct_counts(packed, since)
    assert distinct_expire(old, 1000 + values) == distinct_expire(packed, 1000 + values)
    assert distinct_insert(old, 7, 5000) == distinct_insert(packed, 7, 5000)
    assert distinct_merge(old, packed) == distinct_merge(packed, packed)
    assert distinct_union([old, packed]) == distinct_union([packed, packed])


def _rings_read(raw: bytes) -> dict:
    record = orjson.loads(raw)
    record["r"] = {width: ring_buckets(ring) for width, ring in record["r"].items()}
    return record


def test_records_written_before_round_32_give_the_same_features_and_are_rewritten_packed():
    """A store written before round 31 (dict sketches, list rings) or 32 (list rings) scores as
    the packed one, and each record it rewrites is written packed."""
    rng = random.Random(9)
    packed: dict[tuple[str, str], bytes] = {}
    old: dict[tuple[str, str], bytes] = {}
    ts, changed = 0, 0
    for n in range(3000):
        ts += rng.randrange(0, 5_000)
        event = random_event(rng, ts, n_users=30, n_ips=40)
        keys = entity_keys(event)
        if n == 2000:  # the state so far, as workers before rounds 31 and 32 would have stored it
            for i, (key, raw) in enumerate(packed.items()):
                record = orjson.loads(raw)
                record["r"] = {width: ring_buckets(ring) for width, ring in record["r"].items()}
                if i % 2:
                    record["d"] = {name: _as_written_before_round_31(s) for name, s in record["d"].items()}
                old[key] = orjson.dumps(record)
        extracted = extract(event, {k: EntityState(packed.get((k, v))) for k, v in keys.items()})
        if n >= 2000:
            from_old = extract(event, {k: EntityState(old.get((k, v))) for k, v in keys.items()})
            assert from_old.features == extracted.features
            # written packed: the same records, but for a ring's digits (a ring widened by a
            # count since pruned keeps its width, one packed from lists takes the fewest)
            assert list(map(_rings_read, from_old.updates.values())) == \
                list(map(_rings_read, extracted.updates.values()))
            assert all(type(ring) is str and type(s) is str for raw in from_old.updates.values()
                       for record in [orjson.loads(raw)] for ring in record["r"].values() for s in record["d"].values())
            changed += any(old.get((k, keys[k])) != packed.get((k, keys[k])) for k in from_old.updates)
            for name, raw in from_old.updates.items():
                old[(name, keys[name])] = raw
        for name, raw in extracted.updates.items():
            packed[(name, keys[name])] = raw
    assert changed > 30  # records still in the old form were read


@pytest.mark.parametrize("n", [30, 100, 400, 2000, 20000])
def test_sliding_hyperloglog_stays_within_its_documented_error(n):
    sketch = new_distinct()
    for i in range(n):
        sketch = distinct_add(sketch, f"value-{n}-{i}", ts_s=i)
    for since, true in ((0, n), (n // 2, n - n // 2)):
        estimate = distinct_count(sketch, since_s=since)
        assert abs(estimate - true) <= max(2, 4 * HLL_RELATIVE_ERROR * true), (n, since, estimate, true)


def test_expiring_a_sliding_hyperloglog_keeps_what_is_inside_the_window():
    sketch = new_distinct()
    for i in range(1000):
        sketch = distinct_add(sketch, f"v{i}", ts_s=i)
    assert not is_exact(sketch)
    assert distinct_expire(sketch, 0) is sketch  # nothing to drop: no copy
    expired = distinct_expire(sketch, 600)
    assert all(t >= 600 for _, t in _entries(expired))
    for since in (600, 800, 999):
        assert distinct_count(expired, since) == distinct_count(sketch, since)
    assert distinct_count(distinct_expire(sketch, 1000), 0) == 0


def test_distinct_merge_is_a_union():
    rng = random.Random(4)
    values = [f"x{rng.randrange(300)}" for _ in range(600)]
    a, b, whole = new_distinct(), new_distinct(), new_distinct()
    for i, v in enumerate(values):
        whole = distinct_add(whole, v, ts_s=i)
        if i % 2:
            a = distinct_add(a, v, ts_s=i)
        else:
            b = distinct_add(b, v, ts_s=i)
    merged = distinct_merge(a, b)
    for since in (0, 200, 500):
        assert distinct_count(merged, since) == distinct_count(whole, since)
    small_a, small_b = distinct_add(new_distinct(), "p", 1), distinct_add(new_distinct(), "q", 2)
    assert distinct_count(distinct_merge(small_a, small_b), 0) == 2


def _hyperloglog_of(hashes: list[int]) -> int:
    """The estimate from scratch (as Flajolet et al., with linear counting when small)."""
    best = [0] * 128
    for h in hashes:
        register, rest = h & 127, h >> 7
        best[register] = max(best[register], 25 - rest.bit_length() + 1)
    raw = 0.7213 / (1 + 1.079 / 128) * 128 * 128 / sum(2.0 ** -r for r in best)
    return round(128 * math.log(128 / best.count(0))) if raw <= 2.5 * 128 and best.count(0) else round(raw)


@pytest.mark.parametrize("seed", range(6))
def test_counts_of_a_union_of_sketches_in_several_windows(seed):
    """distinct_counts over distinct_union: exact while the parts are and their union is within
    the limit, else the HyperLogLog of every value seen in each window, in one pass; counted
    back from a time (as an entity's windows are), the same."""
    from detectors.sketches import distinct_counts, distinct_counts_back, distinct_union, hash32

    rng = random.Random(seed)
    parts, seen = [], {}  # value hash -> last time seen, over all parts
    for _ in range(rng.choice((2, 3, 4))):
        part = new_distinct()
        for _ in range(rng.choice((3, 8, 30, 200))):
            value, ts = f"v{rng.randrange(rng.choice((20, 400)))}", rng.randrange(1000)
            part = distinct_add(part, value, ts_s=ts)
            seen[hash32(value)] = max(ts, seen.get(hash32(value), ts))
        parts.append(part)
    since = (0, sorted(seen.values())[len(seen) // 2], 700, max(seen.values()))  # two at a value's own time
    counts = distinct_counts(distinct_union(parts), since)
    for window, count in zip(since, counts):
        in_window = [h for h, ts in seen.items() if ts >= window]
        exact = all(is_exact(part) for part in parts) and len(seen) <= EXACT_LIMIT
        assert count == (len(in_window) if exact else _hyperloglog_of(in_window)), (window, exact)
    now = rng.randrange(1000, 2000)
    assert distinct_counts_back(distinct_union(parts), now, tuple(now - s for s in since)) == counts
    with pytest.raises(ValueError, match="at most 4 windows"):
        distinct_counts(parts[0], (0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match="at most 4 windows"):
        distinct_counts_back(parts[0], now, (0, 1, 2, 3, 4))


def test_simhash_separates_near_duplicates_from_unrelated_texts():
    spam = [f"{g} get a FREE phone now!!! visit http://x.example/{c} code {n}"
            for g, c, n in (("WOW", "ab12c", 1), ("Hey", "zz9", 22), ("OMG", "q1", 333))]
    benign = ["Lovely walk in the park with the dog", "Dinner with family tonight was great",
              "Finally finished the project release"]
    fps = [simhash(t) for t in spam]
    assert all(hamming(a, b) <= NEAR_DUPLICATE_BITS for a in fps for b in fps)
    assert all(hamming(simhash(a), simhash(b)) > NEAR_DUPLICATE_BITS for a in benign for b in benign if a != b)
    assert all(hamming(simhash(a), f) > NEAR_DUPLICATE_BITS for a in benign for f in fps)


@pytest.mark.parametrize("text, normalized", [
    ("Call 555-1234 now, code a1b2 or visit http://x.example/abc?q=1 ok", "call now code or visit http x example ok"),
    ("x\u0661\u0662 word2word  tail9 ok", "ok"),  # any token with a digit, Unicode digits too, goes whole
    ("Lovely walk, in the PARK!", "lovely walk in the park"),
    ("", ""),
])
def test_normalized_text_keeps_lower_case_words_without_digits(text, normalized):
    assert normalize_text(text) == normalized


def test_state_per_entity_is_small():
    rng = random.Random(1)
    records: dict[tuple[str, str], dict] = {}
    ts = 0
    for _ in range(20_000):
        ts += rng.randrange(0, 20_000)
        event = random_event(rng, ts, n_users=200, n_ips=150)
        for name, entity in ENTITIES.items():
            key = entity.key(event)
            if key:
                records[(name, key)], _ = apply_event(entity, records.get((name, key)), event)
    sizes = [len(orjson.dumps(r)) for r in records.values()]
    assert sum(sizes) / len(sizes) < 2048
    assert math.isfinite(max(sizes))
