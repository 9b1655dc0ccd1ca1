"""The options the worker gives the RocksDB stores of its Faust tables."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from faust.stores.rocksdb import RocksDBOptions

from streams.state import pace_background_writes


def _rate_limiter_of_store_opened(tmp_path: Path, mb_per_s: int) -> str:
    """What RocksDB's own log says of the rate limiter of a store opened as Faust opens a
    table partition's store, after ``pace_background_writes``."""
    options = RocksDBOptions(driver="rocksdict", ttl=3600)
    pace_background_writes(SimpleNamespace(data=SimpleNamespace(rocksdb_options=options)), mb_per_s)
    path = tmp_path / f"label-join-{mb_per_s}.db"
    options.open(path).close()
    return re.search(r"Options\.rate_limiter: (\S+)", (path / "LOG").read_text()).group(1)


@pytest.mark.parametrize("mb_per_s, limited", [(48, True), (0, False)])
def test_the_label_joins_flushes_and_compactions_are_paced_only_when_asked(tmp_path, mb_per_s, limited):
    assert (_rate_limiter_of_store_opened(tmp_path, mb_per_s) != "(nil)") is limited


def test_a_store_without_rocksdb_options_is_left_alone():
    table = SimpleNamespace(data=SimpleNamespace())  # memory://, as the unit tests' apps use
    pace_background_writes(table, 48)
    assert vars(table.data) == {}


def test_a_negative_rate_is_refused_with_the_setting_to_fix():
    table = SimpleNamespace(data=SimpleNamespace(rocksdb_options=RocksDBOptions(driver="rocksdict")))
    with pytest.raises(ValueError, match="ABUSE_LABEL_JOIN_WRITE_MB_S=-1"):
        pace_background_writes(table, -1)
