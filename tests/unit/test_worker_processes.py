"""Stopping a worker waits for the children it leaves behind (streams/demo.py)."""

import os
import signal
import subprocess
import time

import pytest

from streams.demo import stop_worker, wait_for_worker_group


def _parent_leaving_a_child(child_seconds: float) -> subprocess.Popen:
    """A parent that exits at once and leaves a child in its process group, as a killed worker
    leaves its label join closing its store."""
    proc = subprocess.Popen(["sh", "-c", f"sleep {child_seconds} & exit 0"], start_new_session=True)
    proc.wait(5)
    return proc


def test_stopping_a_worker_returns_only_once_its_children_have_ended():
    proc = _parent_leaving_a_child(1.5)
    started = time.monotonic()
    stop_worker(proc)
    assert time.monotonic() - started >= 1.0


def test_children_that_outlive_the_timeout_are_an_error_that_names_them():
    proc = _parent_leaving_a_child(30)
    with pytest.raises(RuntimeError, match=f"ps -g {proc.pid}"):
        wait_for_worker_group(proc, timeout=0.5)
    os.killpg(proc.pid, signal.SIGKILL)
