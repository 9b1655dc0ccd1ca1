"""The label join's process beside each worker (streams/join_app.py): it joins scores and labels
into training examples, comes back when it dies, and never outlives its worker."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest

from tests.integration.helpers import as_record, benign_post, moderator_label, stuffing_login

pytestmark = pytest.mark.integration

MINUTE = 60_000


def _label_join_page(settings, timeout: float = 60.0, until=lambda page: page.get("ready")) -> dict:
    """The worker's view of its label join (what the join's process last reported), once ``until`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            page = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/replica/",
                                                     timeout=10).read())["label_join"]
            if until(page):
                return page
        except OSError:  # the worker's web server is starting
            page = None
        assert time.monotonic() < deadline, page
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _label_and_learn(settings, reader, produce, worker) -> None:
    examples = reader(settings.examples_topic)
    scores = reader(settings.scores_topic)
    sent = [stuffing_login(i, f"victim-{i}") for i in range(3)] + [benign_post(i, f"user-{i}") for i in range(3)]
    produce(settings.events_topic, [as_record(e) for e in sent])
    scores.wait_for(lambda r: len(r) >= len(sent), worker=worker)
    produce(settings.labels_topic, [moderator_label(e, e["ts"] + MINUTE) for e in sent])
    learned = examples.wait_for(lambda r: len(r) >= len(sent), timeout=90, worker=worker)
    assert sorted(x[1]["event_id"] for x in learned) == sorted(e["event_id"] for e in sent)


def test_a_label_join_that_dies_is_started_again_and_joins(settings, worker, reader, produce):
    first = _label_join_page(settings)
    os.kill(first["pid"], signal.SIGKILL)
    # The worker starts another (after 5 s, streams/join_app.py); it restores the rows and joins.
    again = _label_join_page(settings, timeout=90, until=lambda page: page.get("ready") and page["pid"] != first["pid"])
    assert again["alive"] and again["restarts"] == 1
    _label_and_learn(settings, reader, produce, worker)


def test_a_label_join_ends_with_its_worker_even_one_killed(settings, worker):
    join_pid = _label_join_page(settings)["pid"]
    assert _alive(join_pid)
    worker.kill()  # SIGKILL: the worker stops nothing itself
    deadline = time.monotonic() + 60
    while _alive(join_pid):  # the kernel sends it SIGTERM (PR_SET_PDEATHSIG), and it stops in order
        assert time.monotonic() < deadline, "the label join outlived its worker"
        time.sleep(0.2)
