"""``PartitionFollower``, the label join's reader of risk scores: exactly the partitions it is
told to follow, each from the position it is given (or the beginning), in offset order."""

from __future__ import annotations

import time

import pytest

from streams.follower import PartitionFollower
from streams.kafka.io import make_producer

pytestmark = pytest.mark.integration


def _write(settings, partition: int, values: list[bytes]) -> None:
    producer = make_producer(settings)
    for value in values:
        producer.produce(settings.scores_topic, key=b"k", value=value, partition=partition)
    assert producer.flush(30) == 0


def _read(follower: PartitionFollower, at_least: int, settle_s: float = 1.0) -> list[tuple[int, int, bytes]]:
    """Polls until ``at_least`` records came, then ``settle_s`` longer (to catch any extra)."""
    got: list[tuple[int, int, bytes]] = []
    deadline, settled = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        got += [(m.partition(), m.offset(), m.value()) for m in follower.poll()]
        if len(got) >= at_least:
            settled = settled or time.monotonic() + settle_s
            if time.monotonic() > settled:
                return got
        time.sleep(0.05)
    raise AssertionError(f"read {len(got)} of {at_least} records within 30s: {got}")


def test_follows_exactly_the_given_partitions_from_the_given_positions(settings):
    _write(settings, 0, [b"p0-%d" % i for i in range(3)])
    _write(settings, 1, [b"p1-%d" % i for i in range(4)])
    follower = PartitionFollower(settings.bootstrap_servers, settings.scores_topic)
    try:
        follower.follow({0}, position=lambda p: None)  # no position: from the beginning
        assert _read(follower, 3) == [(0, i, b"p0-%d" % i) for i in range(3)]

        # partition 1 added at its stored position; partition 0 goes on where it was
        follower.follow({0, 1}, position={1: 2}.get)
        _write(settings, 0, [b"p0-3"])
        got = _read(follower, 3)
        assert sorted(got) == [(0, 3, b"p0-3"), (1, 2, b"p1-2"), (1, 3, b"p1-3")]

        # partition 0 dropped: what it receives now is not read
        follower.follow({1}, position=lambda p: pytest.fail("partition 1 is already followed"))
        _write(settings, 0, [b"p0-4"])
        _write(settings, 1, [b"p1-4"])
        assert _read(follower, 1) == [(1, 4, b"p1-4")]
        assert follower.view() == {"following": [1], "read": 7,
                                   "partitions": {1: {"next_to_read": 5, "behind": 0}}}
    finally:
        follower.close()
