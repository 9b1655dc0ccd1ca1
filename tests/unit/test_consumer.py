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
