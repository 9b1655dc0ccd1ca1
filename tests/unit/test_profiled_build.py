"""The profile-guided build (streams/profiled_build.py): its training run takes the worker's paths,
setup.py refuses a profile it does not know, and an instrumented build is never left in place."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from streams import profiled_build
from streams.profiled_build import ROOT, training_run


def test_the_training_run_scores_joins_and_learns():
    counts = training_run(days=0.2)
    assert counts["events"] > 5000
    assert counts["rejected"] > 0  # the simulator's malformed records, through the contracts' rejections
    assert 0 < counts["labels"] and counts["examples"] == counts["labels"]  # every label joined its score
    assert counts["alerts"] > 0  # the alert policy's path, with models trained on the examples


def test_setup_refuses_a_profile_it_does_not_know():
    env = dict(os.environ, ABUSE_BUILD_PROFILE="fast")
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "ABUSE_BUILD_PROFILE='fast'" in done.stderr


def test_an_instrumented_build_is_found(tmp_path, monkeypatch):
    (tmp_path / "detectors").mkdir()
    (tmp_path / "detectors" / "plain.so").write_bytes(b"\x7fELF PyInit_plain")
    (tmp_path / "detectors" / "counting.so").write_bytes(b"\x7fELF PyInit_counting __gcov_merge_add")
    monkeypatch.setattr(profiled_build, "ROOT", tmp_path)
    assert [path.name for path in profiled_build._instrumented()] == ["counting.so"]


def test_no_installed_build_counts():
    # make install's builds: an instrumented one would write its counts at every exit, and run slower
    assert profiled_build._instrumented() == []


def test_a_wheel_compiled_without_the_counts_is_found(tmp_path, monkeypatch):
    # gcc compiles without counts it cannot find, silently: the wheel's modules must be the tree's
    (tmp_path / "detectors").mkdir()
    (tmp_path / "detectors" / "a.so").write_bytes(b"\x7fELF with the counts")
    (tmp_path / "detectors" / "b.so").write_bytes(b"\x7fELF with the counts")
    wheel = tmp_path / "abuse_detector-0.1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("detectors/a.so", b"\x7fELF with the counts")
        archive.writestr("detectors/b.so", b"\x7fELF without")
        archive.writestr("detectors/_build.json", b"{}")
    monkeypatch.setattr(profiled_build, "ROOT", tmp_path)
    assert profiled_build._differ_from_the_tree(wheel) == ["detectors/b.so"]
