"""Seeded traffic of a social platform: benign users plus injected abuse campaigns.

``simulate()`` yields, in event-time order, input events (as the bytes a
producer would send), labels that moderators, QA reviewers and chargebacks
produce some time after their event, and the ground truth of every event.
The same seed always yields the same stream.

Benign users have a home IP and device, a time zone and a daily rhythm.
Campaigns: credential stuffing (few IPs, many existing accounts, mostly failed
logins), fake-account signup bursts from shared devices followed by follow and
like sprees, spam bursts with near-duplicate texts and links, and card testing
(many small, mostly declined payments). A small share of records is malformed
on purpose; each malformed record is counted so the dead-letter topic can be
checked against it.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

import orjson

from streams.kafka.io import produce_waiting

if TYPE_CHECKING:
    from confluent_kafka import Producer

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

WORDS = (
    "the a my our this that today tomorrow weekend morning night coffee dinner lunch friends family dog cat "
    "garden music concert movie book reading running trip beach mountain city train photo picture new old "
    "great lovely amazing tired happy busy late early again finally really so very just still back home work "
    "school team game match season recipe cake bread pasta rain sun snow walk bike park lake river birthday "
    "party wedding baby kids project meeting deadline launch release update thanks congrats love miss see "
    "you soon later everyone anyone who what why when where how think know feel want need try learn"
).split()
SPAM_ITEMS = ("phone", "gift card", "crypto bonus", "followers", "sunglasses", "vpn", "loan")
SPAM_DOMAINS = ("free-prizes.example", "best-deals.example", "get-rich.example", "cheap-meds.example")
MERCHANTS = tuple(f"m-{i:04d}" for i in range(400))
EMAIL_DOMAINS = ("mail.example", "inbox.example", "post.example", "web.example")
DISPOSABLE_DOMAINS = ("tempmail.example", "throwaway.example")


@dataclass(frozen=True)
class SimulationConfig:
    seed: int = 7
    users: int = 3000
    days: float = 1.5
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    events_per_user_day: float = 8.0
    malformed_share: float = 0.002
    stuffing_per_day: float = 2.0
    fake_signup_bursts_per_day: float = 2.0
    spam_bursts_per_day: float = 3.0
    card_testing_per_day: float = 3.0
    abuse_label_share: float = 0.3
    benign_label_share: float = 0.03
    # A history exported after the fact holds the labels that arrived after its last
    # event too; a live stream that stops at the end does not.
    labels_after_end: bool = False


@dataclass
class User:
    user_id: str
    home_ip: str
    devices: list[str]
    tz_hours: int
    activity: float
    pays: bool


@dataclass(order=True)
class _Item:
    ts: int
    seq: int
    kind: Literal["event", "label", "malformed"] = field(compare=False)
    payload: dict | bytes = field(compare=False)
    truth: tuple[bool, str] | None = field(compare=False, default=None)


@dataclass(frozen=True)
class SimRecord:
    """One record to produce. ``kind`` is event, label or malformed."""
    kind: Literal["event", "label", "malformed"]
    key: bytes | None
    value: bytes
    ts: int
    event_id: str | None = None
    is_abuse: bool | None = None
    campaign: str | None = None


class _Generator:
    def __init__(self, config: SimulationConfig):
        self.c = config
        self.rng = random.Random(config.seed)
        self.seq = 0
        self.users: list[User] = [self._new_user(i) for i in range(config.users)]
        self.mobile_ips = [self._ip("172.20") for _ in range(200)]

    # -- helpers ----------------------------------------------------------
    def _ip(self, prefix: str) -> str:
        r = self.rng
        return f"{prefix}.{r.randrange(256)}.{r.randrange(1, 255)}"

    def _new_user(self, i: int, prefix: str = "u") -> User:
        r = self.rng
        return User(
            user_id=f"{prefix}{i:06d}",
            home_ip=self._ip("100.64"),
            devices=[f"d-{r.getrandbits(40):010x}" for _ in range(r.choice((1, 1, 2)))],
            tz_hours=r.choice((-8, -5, -5, 0, 1, 1, 2, 5, 8, 9)),
            activity=r.lognormvariate(0, 0.8),
            pays=r.random() < 0.3,
        )

    def _event_id(self) -> str:
        self.seq += 1
        return f"ev-{self.c.seed}-{self.seq:09d}"

    def _item(self, ts: int, kind: str, payload: dict | bytes, truth: tuple[bool, str] | None = None) -> _Item:
        self.seq += 1
        return _Item(ts, self.seq, kind, payload, truth)  # type: ignore[arg-type]

    def _envelope(self, kind: str, ts: int, user_id: str, ip: str | None, device: str | None) -> dict:
        return {"event_id": self._event_id(), "type": kind, "schema_version": 1, "ts": ts,
                "user_id": user_id, "ip": ip, "device_id": device}

    def _benign_text(self) -> str:
        r = self.rng
        words = " ".join(r.choice(WORDS) for _ in range(r.randint(4, 25)))
        if r.random() < 0.05:
            words += f" https://photos.example/{r.getrandbits(32):08x}"
        return words.capitalize()

    @staticmethod
    def _diurnal(local_hour: float) -> float:
        # Low at 4am local, peak around 8pm; integrates to ~1 over a day.
        return (1.0 + 0.85 * math.cos((local_hour - 20) / 24 * 2 * math.pi)) / 24

    # -- benign traffic ---------------------------------------------------
    def _benign_event(self, user: User, ts: int) -> dict:
        r = self.rng
        roll = r.random()
        ip = user.home_ip if r.random() < 0.9 else (r.choice(self.mobile_ips) if r.random() < 0.8 else self._ip("198.18"))
        device = r.choice(user.devices) if r.random() < 0.97 else f"d-{r.getrandbits(40):010x}"
        if roll < 0.12:
            e = self._envelope("login", ts, user.user_id, ip, device)
            ok = r.random() > 0.04
            e.update(success=ok, failure_reason=None if ok else "bad_password", method="password")
        elif roll < 0.22:
            e = self._envelope("post", ts, user.user_id, ip, device)
            e["text"] = self._benign_text()
        elif roll < 0.37:
            e = self._envelope("comment", ts, user.user_id, ip, device)
            e.update(text=self._benign_text(), parent_id=f"p-{r.getrandbits(32):08x}")
        elif roll < 0.52:
            e = self._envelope("message", ts, user.user_id, ip, device)
            e.update(text=self._benign_text(), recipient_id=r.choice(self.users).user_id)
        elif roll < 0.60:
            e = self._envelope("follow", ts, user.user_id, ip, device)
            e["target_user_id"] = r.choice(self.users).user_id
        elif roll < 0.62:
            e = self._envelope("report", ts, user.user_id, ip, device)
            e.update(target_id=f"p-{r.getrandbits(32):08x}", reason=r.choice(("spam", "harassment", "other")))
        elif roll < 0.64 and user.pays:
            e = self._envelope("payment", ts, user.user_id, ip, device)
            e.update(amount=round(r.lognormvariate(3, 0.8), 2), currency="USD",
                     merchant_id=r.choice(MERCHANTS), status="approved" if r.random() > 0.02 else "declined")
        else:
            e = self._envelope("like", ts, user.user_id, ip, device)
            e.update(target_id=f"p-{r.getrandbits(32):08x}", target_user_id=r.choice(self.users).user_id)
        return e

    def _benign_hour(self, hour_start: int) -> list[_Item]:
        r, c = self.rng, self.c
        items = []
        hour_of_day = (hour_start % DAY_MS) / HOUR_MS
        # A few honest signups every hour; new users join the population.
        for _ in range(self._poisson(c.users * 0.02 / 24)):
            user = self._new_user(len(self.users))
            self.users.append(user)
            ts = hour_start + r.randrange(HOUR_MS)
            e = self._envelope("signup", ts, user.user_id, user.home_ip, user.devices[0])
            e.update(email_domain=r.choice(EMAIL_DOMAINS))
            items.append(self._item(ts, "event", e, (False, "benign")))
        for user in self.users:
            rate = c.events_per_user_day * user.activity * self._diurnal((hour_of_day + user.tz_hours) % 24)
            for _ in range(self._poisson(rate)):
                ts = hour_start + r.randrange(HOUR_MS)
                items.append(self._item(ts, "event", self._benign_event(user, ts), (False, "benign")))
        return items

    def _poisson(self, lam: float) -> int:
        if lam <= 0:
            return 0
        # Knuth's method is fine for the small rates used here.
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    # -- campaigns --------------------------------------------------------
    def _credential_stuffing(self, start: int) -> list[_Item]:
        r = self.rng
        ips = [self._ip("203.0") for _ in range(r.randint(2, 5))]
        victims = r.sample(self.users, min(len(self.users), r.randint(120, 300)))
        items = []
        for victim in victims:
            for _ in range(r.choice((1, 1, 2))):
                ts = start + r.randrange(15 * 60_000)
                e = self._envelope("login", ts, victim.user_id, r.choice(ips), None if r.random() < 0.5 else f"d-bot{r.randrange(8)}")
                ok = r.random() < 0.08
                e.update(success=ok, failure_reason=None if ok else "bad_password", method="password")
                items.append(self._item(ts, "event", e, (True, "credential_stuffing")))
        return items

    def _fake_signups(self, start: int) -> list[_Item]:
        r = self.rng
        devices = [f"d-farm{r.getrandbits(24):06x}" for _ in range(r.randint(1, 3))]
        ip = self._ip("198.51")
        items = []
        for _ in range(r.randint(30, 70)):
            fake = self._new_user(len(self.users), prefix="u")
            self.users.append(fake)
            device = r.choice(devices)
            ts = start + r.randrange(10 * 60_000)
            e = self._envelope("signup", ts, fake.user_id, ip, device)
            e["email_domain"] = r.choice(DISPOSABLE_DOMAINS)
            items.append(self._item(ts, "event", e, (True, "fake_account")))
            fake.activity = 0.0  # the farm does not behave like people afterwards
            for _ in range(r.randint(10, 30)):
                ts += r.randint(2_000, 20_000)
                kind = r.choice(("follow", "follow", "like"))
                e = self._envelope(kind, ts, fake.user_id, ip, device)
                if kind == "follow":
                    e["target_user_id"] = r.choice(self.users).user_id
                else:
                    e.update(target_id=f"p-{r.getrandbits(32):08x}", target_user_id=r.choice(self.users).user_id)
                items.append(self._item(ts, "event", e, (True, "fake_account")))
        return items

    def _spam_burst(self, start: int) -> list[_Item]:
        r = self.rng
        item, domain = r.choice(SPAM_ITEMS), r.choice(SPAM_DOMAINS)
        spammers = r.sample(self.users, r.randint(3, 8))
        items = []
        for spammer in spammers:
            ip, device = self._ip("192.0"), f"d-{r.getrandbits(40):010x}"
            ts = start + r.randrange(5 * 60_000)
            for _ in range(r.randint(15, 45)):
                ts += r.randint(3_000, 40_000)
                kind = r.choice(("message", "message", "comment", "post"))
                e = self._envelope(kind, ts, spammer.user_id, ip, device)
                e["text"] = (f"{r.choice(('WOW', 'Hey', 'OMG', 'Hi'))} get a FREE {item} now!!! "
                             f"visit http://{domain}/{r.getrandbits(20):05x} code {r.randint(100, 999)}")
                if kind == "message":
                    e["recipient_id"] = r.choice(self.users).user_id
                elif kind == "comment":
                    e["parent_id"] = f"p-{r.getrandbits(32):08x}"
                items.append(self._item(ts, "event", e, (True, "spam")))
        return items

    def _card_testing(self, start: int) -> list[_Item]:
        r = self.rng
        accounts = r.sample(self.users, r.randint(1, 3))
        items = []
        for account in accounts:
            ip, device = self._ip("203.0"), f"d-{r.getrandbits(40):010x}"
            ts = start + r.randrange(5 * 60_000)
            for _ in range(r.randint(15, 50)):
                ts += r.randint(3_000, 30_000)
                e = self._envelope("payment", ts, account.user_id, ip, device)
                e.update(amount=round(r.uniform(0.5, 2.0), 2), currency="USD", terminal_id=r.choice(MERCHANTS),
                         card_fingerprint=f"c-{r.getrandbits(32):08x}",
                         status="declined" if r.random() < 0.85 else "approved")
                items.append(self._item(ts, "event", e, (True, "card_testing")))
        return items

    def _campaigns_in_hour(self, hour_start: int) -> list[_Item]:
        c, r = self.c, self.rng
        items: list[_Item] = []
        for rate, make in (
            (c.stuffing_per_day, self._credential_stuffing),
            (c.fake_signup_bursts_per_day, self._fake_signups),
            (c.spam_bursts_per_day, self._spam_burst),
            (c.card_testing_per_day, self._card_testing),
        ):
            for _ in range(self._poisson(rate / 24)):
                items.extend(make(hour_start + r.randrange(HOUR_MS)))
        return items

    # -- labels and malformed records -------------------------------------
    def _label_for(self, event: dict, is_abuse: bool, campaign: str) -> _Item | None:
        r = self.rng
        if is_abuse:
            if campaign == "card_testing" and r.random() < 0.5:
                delay, source = r.uniform(6 * HOUR_MS, 36 * HOUR_MS), "chargeback"
            elif r.random() < self.c.abuse_label_share:
                delay, source = r.lognormvariate(math.log(30 * 60_000), 0.8), "moderator"
            else:
                return None
        elif r.random() < self.c.benign_label_share:
            delay, source = r.lognormvariate(math.log(2 * HOUR_MS), 0.8), "qa_sample"
        else:
            return None
        ts = event["ts"] + int(delay)
        label = {"event_id": event["event_id"], "label": "abuse" if is_abuse else "benign", "source": source,
                 "ts": ts, "schema_version": 1, "user_id": event["user_id"],
                 "category": campaign if is_abuse else None}
        return self._item(ts, "label", label)

    def _malformed(self, ts: int) -> _Item:
        r = self.rng
        variant = r.randrange(6)
        good = self._envelope("login", ts, "u-bad", "100.64.0.1", None)
        good.update(success=True)
        if variant == 0:
            value = b"{this is not json"
        elif variant == 1:
            good["ts"] = "yesterday"
            value = orjson.dumps(good)
        elif variant == 2:
            del good["user_id"]
            value = orjson.dumps(good)
        elif variant == 3:
            good["type"] = "teleport"
            value = orjson.dumps(good)
        elif variant == 4:
            good["type"], good["text"] = "post", "x" * 80_000
            value = orjson.dumps(good)
        else:
            value = orjson.dumps([good])
        return self._item(ts, "malformed", value)

    def run(self) -> Iterator[_Item]:
        c, r = self.c, self.rng
        end = c.start_ms + int(c.days * DAY_MS)
        labels: list[_Item] = []
        spill: list[_Item] = []  # campaign events that run past the hour they started in
        hour = c.start_ms
        while hour < end:
            batch = self._benign_hour(hour) + self._campaigns_in_hour(hour) + spill
            batch.sort()
            cut = next((i for i, item in enumerate(batch) if item.ts >= hour + HOUR_MS), len(batch))
            batch, spill = batch[:cut], batch[cut:]
            for item in batch:
                if item.ts >= end:
                    continue
                while labels and labels[0].ts <= item.ts:
                    yield heapq.heappop(labels)
                if r.random() < c.malformed_share:
                    yield self._malformed(item.ts)
                yield item
                label = self._label_for(item.payload, *item.truth)  # type: ignore[arg-type, misc]
                if label is not None and (label.ts < end or c.labels_after_end):
                    heapq.heappush(labels, label)
            hour += HOUR_MS
        while labels:
            yield heapq.heappop(labels)


def simulate(config: SimulationConfig) -> Iterator[SimRecord]:
    """The seeded stream, ready to produce: events keyed by user_id, labels by event_id."""
    for item in _Generator(config).run():
        if item.kind == "event":
            e = item.payload
            assert isinstance(e, dict) and item.truth is not None
            yield SimRecord("event", e["user_id"].encode(), orjson.dumps(e), item.ts, e["event_id"], *item.truth)
        elif item.kind == "label":
            assert isinstance(item.payload, dict)
            yield SimRecord("label", item.payload["event_id"].encode(), orjson.dumps(item.payload), item.ts,
                            item.payload["event_id"])
        else:
            assert isinstance(item.payload, bytes)
            yield SimRecord("malformed", None, item.payload, item.ts)


@dataclass
class SimulationReport:
    events: int = 0
    labels: int = 0
    malformed: int = 0
    abusive_events: int = 0
    truth: dict[str, bool] = field(default_factory=dict)


def run_simulation(
    config: SimulationConfig,
    *,
    producer: Producer | None = None,
    events_topic: str = "events",
    labels_topic: str = "labels",
    rate: float = 0.0,
    out_dir: Path | None = None,
    keep_truth: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
) -> SimulationReport:
    """Produces the stream to Kafka and/or writes it as JSONL files.

    ``rate`` caps input records per second of wall time (0 = as fast as possible).
    ``out_dir`` receives events.jsonl (malformed records included, as sent),
    labels.jsonl and truth.jsonl (event_id, is_abuse, campaign).
    """
    report = SimulationReport()
    files = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {name: open(out_dir / f"{name}.jsonl", "wb") for name in ("events", "labels", "truth", "truth-labels")}
    started = time.monotonic()
    sent = 0
    try:
        for record in simulate(config):
            if should_stop():
                break
            if record.kind == "label":
                report.labels += 1
                topic = labels_topic
            else:
                topic = events_topic
                if record.kind == "malformed":
                    report.malformed += 1
                else:
                    report.events += 1
                    report.abusive_events += bool(record.is_abuse)
                    if keep_truth:
                        report.truth[record.event_id] = bool(record.is_abuse)  # type: ignore[index]
            if producer is not None:
                produce_waiting(producer, topic, record.key, record.value)
            if files:
                files["labels" if record.kind == "label" else "events"].write(record.value.replace(b"\n", b" ") + b"\n")
                if record.kind == "event":
                    files["truth"].write(orjson.dumps({"event_id": record.event_id, "is_abuse": record.is_abuse,
                                                       "campaign": record.campaign}) + b"\n")
                    # the ground truth as label records, for `abuse-detector evaluate --labels`
                    files["truth-labels"].write(orjson.dumps({
                        "event_id": record.event_id, "label": "abuse" if record.is_abuse else "benign",
                        "source": "automated", "ts": record.ts, "schema_version": 1,
                        "category": record.campaign if record.is_abuse else None}) + b"\n")
            sent += 1
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        if producer is not None:
            remaining = producer.flush(60)
            if remaining:
                raise RuntimeError(f"{remaining} records were not acknowledged by Kafka within 60s")
        for f in files.values():
            f.close()
    return report
