"""Entity records out of the cyclic garbage collector.

A record (``detectors/entities.py``) is a tree of dicts and lists over numbers, strings
and None: no reference cycle can run through it, so the collector never has anything to
free in one, yet it scanned every container of every record the worker held at each young
collection. At 5,000 events/s that was ~80,000 containers, 15-19 ms every 2-7 s, and the
seconds holding one were the seconds of the worst latency (docs/performance.md, round 25).

``untrack`` takes a record's containers out of the collector's lists. Reference counting
frees them as before; a dict that later gets a container value inserted is tracked again
by CPython itself, and a container added to a record later (a new bucket) stays tracked
until its record is written and dropped. Only the compiled build can do it (the C API's
``PyObject_GC_UnTrack``); from source it does nothing, and records are collected as any
other objects.

>>> import gc
>>> record = {"r": {"300000": [[5891321, 1, 0]]}, "t": [[12, 34]]}
>>> untrack(record)
>>> import detectors
>>> untracked = "acyclic" in detectors.compiled_modules()
>>> all(gc.is_tracked(c) != untracked for c in (record, record["r"], record["r"]["300000"], record["t"][0]))
True
"""

from __future__ import annotations

import cython


def untrack(tree: object) -> None:
    """Takes the dicts and lists of ``tree`` (a JSON-like value) out of the cyclic collector."""
    if cython.compiled:
        _untrack(tree)


@cython.cfunc
@cython.locals(item=object)
def _untrack(tree: object) -> cython.void:
    if type(tree) is list:
        PyObject_GC_UnTrack(tree)
        for item in cython.cast(list, tree):
            if type(item) is list or type(item) is dict:
                _untrack(item)
    elif type(tree) is dict:
        PyObject_GC_UnTrack(tree)
        for item in cython.cast(dict, tree).values():
            if type(item) is list or type(item) is dict:
                _untrack(item)
