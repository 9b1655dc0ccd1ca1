"""The soak's summary of its windows (streams/soak.py), without a broker."""

import gc
from array import array

from streams.bench import steady_load
from streams.soak import TARGET_P99_MS, Soak, Window


def window(latencies: list[int], scoring_cpu_s: float) -> Window:
    return Window(array("l", latencies), {"scoring thread": scoring_cpu_s, "rocksdb": 3.0})


def test_the_summary_counts_the_windows_whose_p99_breaks_the_target_and_averages_the_scoring_thread():
    quiet = window([10] * 99 + [40], scoring_cpu_s=5.0)
    stalled = window([10] * 98 + [int(TARGET_P99_MS) + 1] * 2, scoring_cpu_s=9.0)
    empty = window([], scoring_cpu_s=0.0)
    result = Soak(rate=10.0, seconds=30.0, window_s=10.0, windows=[quiet, stalled, empty], produced=200, labels=3,
                  unscored=0)

    assert result.windows_over(TARGET_P99_MS) == 1
    assert result.busy() == (5.0 + 9.0) / 30.0
    assert result.line() == ("SOAK rate=10 seconds=30 p50_ms=10 p99_ms=51 worst_window_p99_ms=51 "
                             "windows_over_target=1/3 busy=0.47")


def test_a_steady_load_leaves_what_the_process_holds_out_of_the_collectors_scans():
    held = [{"record": [i]} for i in range(10_000)]  # as the simulator's state and the records to offer
    try:
        steady_load()
        scanned = {id(o) for o in gc.get_objects()}  # the collector's generations, not the frozen
        assert not scanned & {id(h) for h in held}
    finally:
        gc.unfreeze()
