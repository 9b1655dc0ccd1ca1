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

``new_app`` makes a Faust app with this consumer (the scoring worker's, ``streams/app.py``, and
its label join's, ``streams/join_app.py``), and ``flush_before_faust`` has the app's own writer
flushed before Faust's producer, so a commit never gets ahead of the writes before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import faust
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from mode.services import WaitResults

from streams.config import Settings


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


def new_app(settings: Settings, read_elsewhere: set[str], **conf: Any) -> faust.App:
    """A Faust app of ``settings.app_id`` on RocksDB stores whose consumer is this module's and
    never delivers a record of ``read_elsewhere`` (the topics the app reads with librdkafka), which
    an agent keeps subscribed so that the group assigns their partitions.
    ``conf`` adds to, or overrides, the settings the scoring worker and the label join share."""
    app = faust.App(settings.app_id, **{
        "broker": f"kafka://{settings.bootstrap_servers}",
        "store": "rocksdb://",
        "datadir": settings.data_dir,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": 1,
        "consumer_auto_offset_reset": "earliest",
        "autodiscover": False,
        **conf,
    })
    app.transport.Consumer = Consumer
    app.read_elsewhere = read_elsewhere  # type: ignore[attr-defined]

    # Faust's group assigns these topics' partitions (with the tables' partitions of the same
    # numbers), so they stay subscribed; their records go to the app's own sources, never here.
    @app.agent(app.topic(*sorted(read_elsewhere), key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw"), name="inputs-assignment")
    async def assign_inputs(stream: faust.StreamT) -> None:
        async for event in stream:  # pragma: no cover - the consumer never delivers them
            raise RuntimeError(f"Faust delivered a record of {event.message.topic}, which the app reads itself")

    return app


def flush_before_faust(app: faust.App, flush: Callable[[], Awaitable[None]]) -> None:
    """Has ``flush`` run before Faust flushes its producer, which it does before every offset
    commit and at shutdown: the app's writes go through a producer of its own (``KafkaWriter``)."""
    faust_flush = app.producer.flush

    async def flush_both() -> None:
        await flush()
        await faust_flush()

    app.producer.flush = flush_both  # type: ignore[method-assign]
