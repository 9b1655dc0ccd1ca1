"""The options the worker gives the RocksDB stores of its Faust tables."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from faust.stores.rocksdb import RocksDBOptions
from rocksdict import Rdict

from streams.state import (
    MEMTABLE_BLOOM_RATIO, amend_table_stores, filter_memtable_misses, memtable_budget, pace_background_writes,
    store_options, within,
)


def _logged_options(store: Path) -> dict[str, str]:
    """The options RocksDB's own log says a store was opened with."""
    return dict(re.findall(r"Options\.(\S+): (\S+)", (store / "LOG").read_text()))


def _rate_limiter_of_store_opened(tmp_path: Path, mb_per_s: int) -> str:
    """What RocksDB's own log says of the rate limiter of a store opened as Faust opens a
    table partition's store, after ``pace_background_writes``."""
    options = RocksDBOptions(driver="rocksdict", ttl=3600)
    pace_background_writes(SimpleNamespace(data=SimpleNamespace(rocksdb_options=options)), mb_per_s)
    path = tmp_path / f"label-join-{mb_per_s}.db"
    options.open(path).close()
    return _logged_options(path)["rate_limiter"]


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


def _memtable_bloom(options: dict[str, str]) -> tuple[float, str]:
    return float(options["memtable_prefix_bloom_size_ratio"]), options["memtable_whole_key_filtering"]


def test_a_tables_stores_filter_their_memtables_misses_with_fausts_options_kept(tmp_path):
    options = RocksDBOptions(driver="rocksdict", bloom_filter_size=10)
    table = SimpleNamespace(data=SimpleNamespace(rocksdb_options=options))
    pace_background_writes(table, 48)
    amend_table_stores(table, filter_memtable_misses)
    options.open(tmp_path / "amended.db").close()
    logged = _logged_options(tmp_path / "amended.db")
    assert _memtable_bloom(logged) == (MEMTABLE_BLOOM_RATIO, "1")
    assert logged["rate_limiter"] != "(nil)"  # the earlier amendment stays
    assert logged["write_buffer_size"] == str(options.write_buffer_size)  # and Faust's own options

    RocksDBOptions(driver="rocksdict").open(tmp_path / "faust.db").close()  # what Faust alone does
    assert _memtable_bloom(_logged_options(tmp_path / "faust.db")) == (0.0, "0")


def test_the_workers_own_stores_filter_their_memtables_misses(tmp_path):
    Rdict(str(tmp_path / "own.db"), options=store_options()).close()
    assert _memtable_bloom(_logged_options(tmp_path / "own.db")) == (MEMTABLE_BLOOM_RATIO, "1")


def test_a_memtable_budget_is_shared_by_the_tables_stores_and_the_workers_own(tmp_path):
    budget = memtable_budget(64)
    assert budget is not None and budget.get_buffer_size() == 64 << 20 and budget.get_usage() == 0
    options = RocksDBOptions(driver="rocksdict")
    amend_table_stores(SimpleNamespace(data=SimpleNamespace(rocksdb_options=options)), within(budget))
    table_store = options.open(tmp_path / "table.db")
    own_store = Rdict(str(tmp_path / "own"), options=store_options(budget))
    outside = Rdict(str(tmp_path / "outside"), options=store_options())
    usage = [budget.get_usage()]
    for store in (table_store, own_store, outside):
        for i in range(5_000):
            store[b"key-%d" % i] = b"x" * 300
        usage.append(budget.get_usage())
    for store in (table_store, own_store, outside):
        store.close()
    assert usage[1] > usage[0] and usage[2] > usage[1]  # each store under the budget counts
    assert usage[3] == usage[2]  # a store without it does not


def test_no_memtable_budget_unless_asked_and_a_negative_one_is_refused():
    assert memtable_budget(0) is None
    with pytest.raises(ValueError, match="ABUSE_STATE_MEMTABLE_MB=-1"):
        memtable_budget(-1)
