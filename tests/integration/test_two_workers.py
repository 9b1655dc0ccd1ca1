"""Two workers on the real broker: per-IP and per-device state stays whole, and every
label is joined exactly once, while partitions move between them (one worker stopped
and started mid-stream)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from typing import Callable

import pytest

from detectors.sketches import EXACT_LIMIT, HLL_RELATIVE_ERROR
from streams.demo import free_port
from tests.integration.conftest import Worker
from tests.integration.helpers import as_record, event, moderator_label

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000
STALENESS_BOUND_S = 2.0  # docs/partitioning.md
IPS = [f"203.0.113.{i}" for i in range(6)]
DEVICES = [f"dev-{i}" for i in range(4)]


def _phase(start: int, n: int) -> list[dict]:
    out = []
    for i in range(start, start + n):
        e = event(f"ev-{i}", "login", T0 + i * 50, f"user-{i % 37}", ip=IPS[i % len(IPS)],
                  device_id=DEVICES[(i // 3) % len(DEVICES)], success=i % 4 != 0)
        out.append(e)
    return out


def _brute_force(events: list[dict]) -> dict[str, dict[str, float]]:
    per_ip: dict[str, dict] = defaultdict(lambda: {"events": 0, "failures": 0, "users": set()})
    per_device: dict[str, dict] = defaultdict(lambda: {"events": 0, "users": set(), "ips": set()})
    for e in events:
        if e["ip"]:
            ip = per_ip[e["ip"]]
            ip["events"] += 1
            ip["failures"] += not e["success"]
            ip["users"].add(e["user_id"])
        if e["device_id"]:
            dev = per_device[e["device_id"]]
            dev["events"] += 1
            dev["users"].add(e["user_id"])
            if e["ip"]:
                dev["ips"].add(e["ip"])
    return {
        **{f"ip:{k}": {"ip_events_1h": v["events"], "ip_login_failures_10m": v["failures"],
                       "ip_distinct_users_1h": len(v["users"])} for k, v in per_ip.items()},
        **{f"device:{k}": {"device_events_1h": v["events"], "device_distinct_users_24h": len(v["users"]),
                           "device_distinct_ips_24h": len(v["ips"])} for k, v in per_device.items()},
    }


def _scored_ids(records: list) -> set[str]:
    return {r[1]["event_id"] for r in records}


def _consumer(worker: Worker) -> dict:
    url = f"http://127.0.0.1:{worker.settings.web_port}/replica/"
    return json.loads(urllib.request.urlopen(url, timeout=10).read())["events_partitions"]


def _wait_ready(worker: Worker, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _consumer(worker)["assigned"]:
                return
        except OSError:
            pass
        assert worker.alive(), worker.log()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"worker on port {worker.settings.web_port} got no partitions within {timeout}s")


def _explain(worker: Worker, kind: str, key: str, timeout: float = 90) -> dict:
    """The worker's whole view of an entity, once it has restored its tables (503 until then)."""
    url = f"http://127.0.0.1:{worker.settings.web_port}/entities/{kind}/{key}/"
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise
            assert "retry" in json.loads(exc.read())["error"]
        time.sleep(0.5)


def _missing(sent: list[dict], workers: list[Worker]) -> Callable[[list], str]:
    def describe(records: list) -> str:
        missing = sorted({e["event_id"] for e in sent} - _scored_ids(records))
        errors = [line for w in workers for line in w.log().splitlines() if "ERROR" in line or "Traceback" in line]
        consumers = []
        for w in workers:
            try:
                consumers.append(_consumer(w) if w.alive() else "stopped")
            except OSError as exc:
                consumers.append(str(exc))
        return f"unscored: {missing[:20]}; worker errors: {errors[:20]}; events partitions per worker: {consumers}"
    return describe


@pytest.mark.partitions(4)
def test_entity_counts_stay_exact_while_partitions_move(settings, reader, produce, tmp_path):
    # One after the other, so the counts are checked apart from a join's races; partitions
    # still move when b joins.
    a = Worker(settings.replace(data_dir=str(tmp_path / "a"), web_port=free_port()), tmp_path / "logs-a").start()
    _wait_ready(a)
    b = Worker(settings.replace(data_dir=str(tmp_path / "b"), web_port=free_port()), tmp_path / "logs-b").start()
    _wait_ready(b)
    scores = reader(settings.scores_topic)
    examples = reader(settings.examples_topic)
    sent: list[dict] = []
    labelled: set[str] = set()
    try:
        def send(batch: list[dict]) -> None:
            sent.extend(batch)
            produce(settings.events_topic, [as_record(e) for e in batch])
            # every third event labelled at once: some labels reach the join before their score
            produce(settings.labels_topic, [moderator_label(e, e["ts"] + 1000) for e in batch[::3]])
            labelled.update(e["event_id"] for e in batch[::3])

        send(_phase(0, 400))
        scores.wait_for(lambda r: len(_scored_ids(r)) >= 400, timeout=120, worker=a, describe=_missing(sent, [a, b]))
        b.stop()  # its partitions move to a, mid-stream
        send(_phase(400, 400))
        scores.wait_for(lambda r: len(_scored_ids(r)) >= 800, timeout=120, worker=a, describe=_missing(sent, [a, b]))
        b.start()  # and back again, while input keeps coming
        for start in range(800, 1200, 100):
            send(_phase(start, 100))
            time.sleep(0.5)
        scores.wait_for(lambda r: len(_scored_ids(r)) >= 1200, timeout=120, worker=a, describe=_missing(sent, [a, b]))

        time.sleep(STALENESS_BOUND_S)  # input paused: replicas converge within the bound
        # One probe per IP and per device, each from a new account, landing on either worker.
        probes = []
        for i, ip in enumerate(IPS):
            probes.append(event(f"probe-ip-{i}", "login", T0 + 1200 * 50 + i, f"prober-ip-{i}", ip=ip,
                                device_id=None, success=True))
        for i, dev in enumerate(DEVICES):
            probes.append(event(f"probe-dev-{i}", "login", T0 + 1200 * 50 + 10 + i, f"prober-dev-{i}", ip=None,
                                device_id=dev, success=True))
        produce(settings.events_topic, [as_record(p) for p in probes])
        records = scores.wait_for(lambda r: all(p["event_id"] in _scored_ids(r) for p in probes), timeout=60, worker=a)
        by_id = {r[1]["event_id"]: r[1] for r in records}

        for probe in probes:
            entity = f"ip:{probe['ip']}" if probe["ip"] else f"device:{probe['device_id']}"
            expected = _brute_force(sent + [probe])[entity]
            got = {name: by_id[probe["event_id"]]["features"].get(name, 0.0) for name in expected}  # absent: 0
            for name, want in expected.items():
                if "distinct" in name and want > EXACT_LIMIT:  # a sliding HyperLogLog past the exact range
                    assert abs(got[name] - want) <= 4 * HLL_RELATIVE_ERROR * want, (entity, name, got[name], want)
                else:
                    assert got[name] == want, (entity, name, got, expected)

        # Both workers give the same whole view of an IP through `features explain`, once the
        # probes' own writes have replicated and b, restarted above, has restored its tables (a
        # worker takes seconds to start on a loaded 2-core box, longer than a now needs to score:
        # until then it answers 503).
        _wait_ready(b)
        time.sleep(STALENESS_BOUND_S)
        for worker in (a, b):
            answer = _explain(worker, "ip", IPS[0])
            replica = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{worker.settings.web_port}/replica/", timeout=10).read())
            expected = _brute_force(sent + probes)[f"ip:{IPS[0]}"]["ip_events_1h"]
            assert answer["features"]["ip_events_1h"] == expected, (worker is a, answer["shards"], replica)
            assert answer["shards"] >= 2
            assert replica["caught_up"] and not replica["rebalancing"]
            print(f"replication lag on worker {worker.settings.web_port}: {replica['replication_lag']}")
            assert replica["replication_lag"]["max_ms"] < STALENESS_BOUND_S * 1000
        # More labelled events once partitions have settled: each worker now reads risk scores
        # from a position it took over with a partition.
        send(_phase(1300, 120))
        # Each label joined to its score exactly once, wherever its partition was at the time.
        joined = examples.wait_for(lambda r: {x[1]["event_id"] for x in r} >= labelled, timeout=60, worker=a)
        assert sorted(x[1]["event_id"] for x in joined) == sorted(labelled)
        assert a.alive() and b.alive()
    finally:
        b.stop()
        a.stop()
