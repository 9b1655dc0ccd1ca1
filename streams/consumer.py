"""Faust's Kafka consumer without its per-message task race.

Faust's fetcher hands each message to the streams with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: four
tasks (the delivery, the flow-suspension wait, the stop and crash waits), an
``asyncio.wait`` and three cancellations per message, to stop waiting if a
rebalance suspends the flow while a stream's queue is full. In a profile of a
loaded worker that race was ~10% of the loop's thread (docs/performance.md,
round 6), while the delivery almost always finishes without waiting.

``Consumer.wait_first`` runs the first awaitable up to its first suspension
point. If it finishes there (a queue with room), it returns as the race would
have, with that one winner, and closes the other awaitables unstarted.
Otherwise the race runs as before, on the delivery as already started: the
same tasks and cancellations, so a rebalance still interrupts a blocked
delivery.

Topics named in ``app.read_elsewhere`` (the events and labels topics, which the
worker reads with librdkafka, see ``streams/follower.py``) stay subscribed, so Faust's group
assigns their partitions together with the tables, but Faust never takes records
of them from the fetcher: they are never in its set of active partitions, whatever
resumes them (recovery, flow control).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from mode.services import WaitResults


class _Resumed:
    """Awaits a coroutine that already ran up to a suspension point, which yielded ``pending``."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any):
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.pending
        while True:  # what ``yield from coro`` does, from the second step on
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # e.g. the race's cancellation, passed to the delivery
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return done.value


async def _resume(coro: Coroutine[Any, Any, Any], pending: Any) -> Any:
    return await _Resumed(coro, pending)


async def first_or_race(coros: tuple[Coroutine[Any, Any, Any], ...],
                        race: Callable[..., Awaitable[WaitResults]]) -> WaitResults:
    """``race(*coros)`` (mode's ``Service.wait_first``), unless ``coros[0]`` finishes
    without suspending: then it alone wins and the others are closed unstarted."""
    first, others = coros[0], coros[1:]
    try:
        pending = first.send(None)
    except StopIteration as done:
        for other in others:
            other.close()
        return WaitResults([first], [done.value], False)
    except BaseException:
        for other in others:
            other.close()
        raise
    return await race(_resume(first, pending), *others)


class Consumer(AIOKafkaConsumer):
    def _read_here(self, tps: Any) -> set[TP]:
        elsewhere = getattr(self.app, "read_elsewhere", ())
        return {tp for tp in tps if tp.topic not in elsewhere}

    def _set_active_tps(self, tps: Any) -> set[TP]:
        return super()._set_active_tps(self._read_here(tps))

    def resume_partitions(self, tps: Any) -> None:
        super().resume_partitions(self._read_here(tps))

    def on_buffer_drop(self, tp: TP) -> None:
        if self._read_here([tp]):
            super().on_buffer_drop(tp)

    def verify_event_path(self, now: float, tp: TP) -> None:
        """Faust's livelock check, not for a topic it never reads (it would report it stalled)."""
        if self._read_here([tp]):
            super().verify_event_path(now, tp)

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        if (not coros or self._stopped.is_set() or self._crashed.is_set()
                or not all(asyncio.iscoroutine(c) for c in coros)):
            return await super().wait_first(*coros, timeout=timeout)
        race = super().wait_first
        return await first_or_race(coros, lambda *c: race(*c, timeout=timeout))
