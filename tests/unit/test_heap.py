"""The worker's heap keeps what a batch freed for the next (streams/heap.py): the pages of a
batch's freed blocks are reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streams.heap import MAX_MB, keep_freed_heap

# Makes and frees a batch's worth of blocks larger than pymalloc serves (as a batch's risk
# scores' JSON are), twice; prints the page faults of the second batch.
_BATCHES = """
import resource, sys
from streams.heap import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap(64)
def batch():
    return [bytes(2048) for _ in range(8192)]  # 16 MB
held = batch()
del held
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_batch_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _BATCHES, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_batch_reuses_the_pages_the_last_one_freed():
    defaults, kept = _second_batch_faults("defaults"), _second_batch_faults("keep")
    # 16 MB is 4,096 pages: with glibc's defaults the freed top of the heap went back to the OS
    assert defaults > 3000
    assert kept < defaults / 10


def test_zero_leaves_the_allocator_alone_and_a_size_out_of_range_is_refused():
    assert keep_freed_heap(0) is False
    with pytest.raises(ValueError, match="ABUSE_HEAP_KEEP_MB.*0 to 2047 MB"):
        keep_freed_heap(MAX_MB + 1)
