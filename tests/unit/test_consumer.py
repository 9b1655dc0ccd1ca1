"""The worker's Faust consumer hands over messages without a task race, unless one must wait."""

from __future__ import annotations

import asyncio

import mode
import pytest

from streams.consumer import first_or_race


class _Service(mode.Service):
    pass


async def _race(*coros):
    return await _Service().wait_first(*coros)


def test_a_delivery_that_does_not_wait_wins_alone_and_starts_no_task():
    started = []

    async def deliver():
        return "delivered"

    async def suspended():
        started.append("suspended")

    async def main():
        tasks_before = len(asyncio.all_tasks())
        result = await first_or_race((deliver(), suspended()), lambda *c: pytest.fail("raced"))
        assert len(asyncio.all_tasks()) == tasks_before
        return result

    result = asyncio.run(main())
    assert len(result.done) == 1 and result.results == ["delivered"] and not result.stopped
    assert started == []  # closed unstarted: no "never awaited" warning either


def test_a_delivery_that_waits_races_and_completes_with_its_value():
    async def main():
        room = asyncio.Event()
        suspend = asyncio.Event()

        async def deliver():
            await room.wait()  # a full queue
            return "delivered"

        asyncio.get_running_loop().call_later(0.01, room.set)
        return await first_or_race((deliver(), suspend.wait()), _race)

    result = asyncio.run(main())
    assert result.results == ["delivered"]


def test_a_suspension_interrupts_a_waiting_delivery():
    cancelled = []

    async def main():
        suspend = asyncio.Event()

        async def deliver():
            try:
                await asyncio.sleep(10)  # a full queue that never drains
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        asyncio.get_running_loop().call_later(0.01, suspend.set)
        result = await asyncio.wait_for(first_or_race((deliver(), suspend.wait()), _race), 5)
        await asyncio.sleep(0)
        return result

    result = asyncio.run(main())
    assert result.results == [True] and cancelled == [True]


def test_a_delivery_that_fails_raises_and_closes_the_rest():
    started = []

    async def deliver():
        raise ValueError("bad message")

    async def suspended():
        started.append(True)

    with pytest.raises(ValueError, match="bad message"):
        asyncio.run(first_or_race((deliver(), suspended()), _race))
    assert started == []


class _App:
    in_recovery = False
    read_elsewhere = {"events", "labels"}


class _Thread:
    def __init__(self):
        self.verified = []

    def verify_event_path(self, now, tp):
        self.verified.append(tp)


def _consumer():
    from streams.consumer import Consumer

    consumer = Consumer.__new__(Consumer)  # only the partition bookkeeping is exercised
    consumer.app, consumer._thread = _App(), _Thread()
    consumer._active_partitions, consumer._paused_partitions, consumer._buffered_partitions = None, set(), set()
    return consumer


def test_a_topic_read_elsewhere_is_never_active_whatever_resumes_it():
    from faust.types import TP

    events, labels = [TP("events", p) for p in range(2)], [TP("labels", p) for p in range(2)]
    changelog = [TP("app-user-state-changelog", p) for p in range(2)]
    consumer = _consumer()
    assert consumer._set_active_tps(set(events + labels + changelog)) == set(changelog)  # assignment
    consumer.pause_partitions(events + labels + changelog)  # recovery pauses everything...
    assert consumer._get_active_partitions() == set()
    consumer.resume_partitions(events + labels + changelog)  # ...and resumes the active partitions
    assert consumer._get_active_partitions() == set(changelog)
    consumer._buffered_partitions.add(events[0])
    consumer.on_buffer_drop(events[0])  # flow control
    assert consumer._get_active_partitions() == set(changelog)
    consumer.verify_event_path(0.0, events[1])  # Faust's livelock check: only for what it reads
    consumer.verify_event_path(0.0, labels[1])
    consumer.verify_event_path(0.0, changelog[1])
    assert consumer._thread.verified == [changelog[1]]
