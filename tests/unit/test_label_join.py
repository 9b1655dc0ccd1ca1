"""The label join's read back of recovered rows' scores, on its own thread (streams/label_join.py)."""

from __future__ import annotations

import threading
import time

import pytest

import streams.label_join as label_join
from streams.label_join import ScoresReadBack


def _completed(back: ScoresReadBack, count: int, timeout: float = 5.0) -> list:
    done: list = []
    deadline = time.monotonic() + timeout
    while len(done) < count:
        assert time.monotonic() < deadline, f"{len(done)} of {count} reads done"
        done += back.completed()
        time.sleep(0.005)
    return done


def test_reads_run_on_their_own_thread_and_complete_in_the_order_queued():
    callers = set()

    def score_at(partition: int, offset: int):
        callers.add(threading.current_thread().name)
        time.sleep(0.001)
        return (b"k%d" % offset, b"{}") if offset % 2 else None

    back = ScoresReadBack(score_at)
    try:
        for offset in range(20):
            back.request(offset % 3, 100 + offset, b"k%d" % offset, {}, offset)
        assert back.held_from() == {0: 100, 1: 101, 2: 102}  # nothing joined yet: commits stop at the first
        done = _completed(back, 20)
    finally:
        back.close()
    assert [r.offset for r in done] == list(range(100, 120))
    assert [r.found is not None for r in done] == [offset % 2 == 1 for offset in range(20)]
    assert callers == {"scores-read-back"}
    assert (back.read, back.gone, back.held_from()) == (10, 10, {})


def test_a_read_that_fails_is_retried_and_holds_its_labels_commit_meanwhile(monkeypatch):
    monkeypatch.setattr(label_join, "READ_BACK_RETRY_S", 0.01)
    failures = [ConnectionError("broker unreachable")] * 3

    def score_at(partition: int, offset: int):
        if failures:
            raise failures.pop()
        return b"e1", b"{}"

    back = ScoresReadBack(score_at)
    try:
        back.request(0, 7, b"e1", {}, 3)
        assert back.held_from() == {0: 7}
        (done,) = _completed(back, 1)
    finally:
        back.close()
    assert done.found == (b"e1", b"{}") and not failures
    assert (back.read, back.gone, back.held_from()) == (1, 0, {})


def test_close_stops_a_read_that_keeps_failing(monkeypatch):
    monkeypatch.setattr(label_join, "READ_BACK_RETRY_S", 0.01)
    closed = []

    def score_at(partition: int, offset: int):
        raise ConnectionError("broker unreachable")

    back = ScoresReadBack(score_at, on_close=lambda: closed.append(True))
    back.request(0, 7, b"e1", {}, 3)
    time.sleep(0.05)
    back.close()
    assert closed == [True] and back._thread is not None and not back._thread.is_alive()
    assert back.completed() == [] and back.held_from() == {0: 7}  # never joined: the next owner reads it again


@pytest.mark.parametrize("reference", [None, 4])
def test_labels_behind_another_of_their_key_wait_for_it(reference):
    back = ScoresReadBack(lambda partition, offset: (b"e1", b"{}"), start=False)
    back.request(2, 10, b"e1", {}, 4)
    assert back.waiting(2, b"e1") and not back.waiting(2, b"e2") and not back.waiting(1, b"e1")
    back.request(2, 11, b"e1", {}, reference)
    back.read_queued()
    assert [r.offset for r in back.completed()] == [10, 11]
    assert not back.waiting(2, b"e1")
