"""The worker's guard against records its consumer never delivers (streams/progress.py)."""

from streams.progress import PartitionProgress, Stall


def _progress(**kw) -> PartitionProgress:
    p = PartitionProgress(stall_after_s=kw.pop("stall_after_s", 5.0), **kw)
    p.assigned([0, 1], now=0.0)
    return p


def test_no_gap_until_the_start_is_known_then_every_jump_is_one():
    p = _progress()
    assert p.gap_before(0, 7) is None  # committed offset not looked up yet
    p.start_at(0, 3)
    assert p.gap_before(0, 3) is None
    assert p.gap_before(0, 7) == (3, 7)
    p.processed(0, 3, now=1.0)
    assert p.gap_before(0, 4) is None
    assert p.gap_before(0, 5) == (4, 5)


def test_redeliveries_are_not_gaps_and_never_move_progress_back():
    p = _progress()
    p.start_at(0, 0)
    for offset in range(10):
        p.processed(0, offset, now=1.0)
    assert p.gap_before(0, 4) is None
    p.processed(0, 4, now=2.0)
    assert p.next_offset[0] == 10


def test_events_scored_before_the_lookup_win_over_it():
    p = _progress()
    p.processed(1, 20, now=1.0)
    p.start_at(1, 5)  # the committed offset read before those events were scored
    assert p.next_offset[1] == 21
    assert p.unknown_start() == [0]


def test_a_lookup_from_an_older_assignment_is_ignored():
    p = _progress()
    generation = p.generation
    p.assigned([0], now=1.0)
    p.start_at(0, 50, generation)
    assert p.unknown_start() == [0]
    p.start_at(0, 7, p.generation)
    assert p.next_offset == {0: 7}
    p.start_at(1, 9, p.generation)  # no longer owned
    assert 1 not in p.next_offset


def test_stall_needs_unscored_records_and_time_without_progress():
    p = _progress(stall_after_s=5.0)
    p.start_at(0, 10)
    p.start_at(1, 0)
    assert p.overdue({0: 10, 1: 0}, now=60.0) == []  # caught up: idle is not stalled
    assert p.overdue({0: 11, 1: 0}, now=4.9) == []  # behind, but not for long
    assert p.overdue({0: 11, 1: 0}, now=5.0) == [Stall(0, 10, 11, 0)]
    p.processed(0, 10, now=5.5)
    assert p.overdue({0: 12}, now=10.0) == []


def test_seeks_come_first_then_a_rebalance():
    p = _progress(stall_after_s=5.0, max_seeks=2)
    p.start_at(0, 0)
    now, actions = 0.0, []
    for _ in range(4):
        now += 5.0
        (stall,) = p.overdue({0: 100}, now)
        actions.append("rebalance" if p.should_rebalance(stall) else "seek")
        p.seeked(0, now)
    assert actions == ["seek", "seek", "rebalance", "rebalance"]
    assert p.recoveries == 4
    p.processed(0, 0, now=now)  # progress: the next stall starts over with seeks
    (stall,) = p.overdue({0: 100}, now + 5.0)
    assert not p.should_rebalance(stall)


def test_a_new_assignment_forgets_the_old_one():
    p = _progress()
    p.start_at(0, 10)
    p.processed(1, 3, now=1.0)
    p.assigned([1], now=2.0)
    assert p.next_offset == {}
    assert p.unknown_start() == [1]
    assert p.overdue({1: 100}, now=100.0) == []  # start unknown: no verdict
