"""The entity state a live worker's events read and change, between its stores and ``extract``.

A worker reads an entity's record (per shard for sharded entities) for each event, and writes
it back once per ``interval_s`` at most (``HeldRecords``), so what an event must see comes from
the first of:

1. the batch's own changes, decoded (``BatchChanges``): the batch's earlier events changed it;
2. the records held since an earlier batch, encoded, until written (``HeldRecords``);
3. the bytes last read from or written to the store (``KeptPerEntity``): no RocksDB read;
4. the store itself.

``EntityReads`` puts them together: ``states_for`` gives an event's ``EntityState`` per entity,
``hold`` takes the records ``extract`` changed. It knows no store, only what reads one (given
``store_of``, ``replica_shards`` and ``reputation_of``), so it runs, and is tested, without
Kafka, Faust or RocksDB. It is compiled with the rest of the per-event path (setup.py): as
closures in the worker over Python classes, the same reads and holds took 1.6 times as long
in an offline loop of the simulator's events (docs/performance.md, round 35).

Sharded entities (``Entity.sharded``) keep one record per partition under ``shard_key``; an
event reads the shards in the partitions the worker owns from their stores (``ShardPresence``
says which hold one) and the others from the replica.

>>> stores = {("user", 0): {}, ("ip", 0): {b"0|1.2.3.4": b'{"f":1,"l":1}'}, ("ip", 1): {}}
>>> reads = EntityReads(lambda entity, p: stores[entity, p].get, lambda entity, key, ps: (),
...                     lambda entity, key: None, partitions=2, interval_s=1.0)
>>> reads.begin_batch({0, 1})
>>> states = reads.states_for({"user": "u1", "ip": "1.2.3.4"}, 0)
>>> states["user"].record, states["ip"].record
(None, {'f': 1, 'l': 1})
>>> states["ip"].record["l"] = 2  # extract changes a record in place
>>> reads.hold("ip", 0, "1.2.3.4", states["ip"].record, offset=7)
>>> reads.states_for({"ip": "1.2.3.4"}, 1)["ip"].others  # the batch's next event, on partition 1
({'f': 1, 'l': 2},)
>>> reads.end_batch()
>>> reads.held.get(("ip", b"0|1.2.3.4")), reads.is_held(("ip", b"0|1.2.3.4"))
(b'{"f":1,"l":2}', True)
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Hashable, Iterable

import cython
import orjson

from detectors.catalog import ENTITIES
from detectors.features import EntityState, Extraction, encode_record, entity_keys, extract, stored_is_idle

HeldKey = tuple[str, bytes]  # (entity, table key)
WRITE_ROUND_S = 0.1
SHARD_PRESENCE_ENTITIES = 100_000  # ~100 bytes each
STORED_BYTES_ENTRIES = 100_000  # entity records kept as stored bytes (~0.5 KB each)
_UNREAD = object()
# b"<p>|" per partition: a shard key is one concatenation (formatting took twice as long)
_SHARD_PREFIXES = cython.declare(list, [b"%d|" % p for p in range(256)])


def shard_key(partition: int, key: str) -> bytes:
    """The table key of an entity's shard in ``partition``.

    >>> shard_key(3, "1.2.3.4"), shard_key(300, "d")
    (b'3|1.2.3.4', b'300|d')
    """
    if 0 <= partition < 256:
        return _SHARD_PREFIXES[partition] + key.encode()
    return b"%d|%s" % (partition, key.encode())


@cython.cclass
class KeptPerEntity:
    """Values kept per entity and key, all forgotten at once when ``capacity`` are kept: a
    read costs two dict lookups and no bookkeeping (an LRU's would be one more write).

    >>> kept = KeptPerEntity(capacity=2)
    >>> kept.put("ip", "a", 1)
    >>> kept.put("ip", "b", None)  # kept: a default tells it from a key never kept
    >>> kept.get("ip", "b", "unknown"), kept.get("ip", "z", "unknown")
    (None, 'unknown')
    >>> kept.put("device", "c", 3)  # the third: a and b are forgotten
    >>> kept.get("ip", "a"), kept.get("device", "c"), len(kept)
    (None, 3, 1)
    """
    capacity = cython.declare(cython.Py_ssize_t, visibility="readonly")
    _kept = cython.declare(dict)  # entity -> key -> value
    _count = cython.declare(cython.Py_ssize_t)

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._kept = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @cython.ccall
    def get(self, entity: str, key: Hashable, default: Any = None) -> Any:
        kept = self._kept.get(entity)
        return default if kept is None else kept.get(key, default)

    @cython.ccall
    def put(self, entity: str, key: Hashable, value: Any) -> None:
        kept = self._kept.get(entity)
        if kept is None:
            kept = self._kept[entity] = {}
        if key not in kept:
            if self._count >= self.capacity:
                self.clear()
                kept = self._kept[entity] = {}
            self._count += 1
        kept[key] = value

    @cython.ccall
    def forget(self, entity: str, key: Hashable) -> None:
        kept = self._kept.get(entity)
        if kept is not None and key in kept:
            del kept[key]
            self._count -= 1

    @cython.ccall
    def clear(self) -> None:
        self._kept.clear()
        self._count = 0


@cython.cclass
class _Changed:
    """Records by key, each with its partition and the input offset of the first event that
    changed it since it was last taken (how far a commit may go without it)."""
    _records = cython.declare(dict)  # HeldKey -> (record, partition, first offset)

    def __init__(self) -> None:
        self._records = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: HeldKey) -> bool:
        return key in self._records

    @cython.ccall
    def get(self, key: tuple) -> object:
        """The record kept under ``key`` (None if none)."""
        kept = self._records.get(key)
        return None if kept is None else kept[0]

    @cython.ccall
    def _keep(self, key: tuple, record: object, partition: int, offset: int) -> cython.bint:
        """Keeps ``record`` as the event at ``offset`` left it; True if ``key`` was not kept yet."""
        kept = self._records.get(key)
        if kept is None:
            self._records[key] = (record, partition, offset)
            return True
        if kept[0] is not record:  # a batch's change is mostly the very object, changed in place
            self._records[key] = (record, partition, kept[2])
        return False


@cython.cclass
class HeldRecords(_Changed):
    """The entity records events changed, encoded, until written: the next batches' events read
    them here, not from the store (``BatchChanges`` holds them at the end of each batch).

    Each record is written once it has been held ``interval_s`` less one write round, by the
    round that finds it due (a round every ``round_s``, at most ``interval_s``): a record waits
    at most ``interval_s``, a busy entity costs one write per interval, and each round writes
    about one round's worth of records. Before round 20 every held record was written once the
    oldest was due: with a longer interval, a worker stopped for the whole interval's writes
    at once. Changing a held record again keeps its first time.

    Each record also keeps the input offset of the first event that changed it since it was
    last written: ``unwritten_from`` gives, per partition, the oldest of them, the position a
    commit may go up to without writing the held records first (round 24: writing all of
    them at every commit stopped the worker for ~30 ms a second at 5,000 events/s).

    >>> now = [0.0]
    >>> held = HeldRecords(interval_s=0.5, round_s=0.1, clock=lambda: now[0])
    >>> held.hold(("user", b"u1"), b'{"l":1}', 0, offset=7)
    >>> now[0] = 0.3
    >>> held.hold(("user", b"u2"), b'{"l":2}', 1, offset=3)
    >>> held.hold(("user", b"u1"), b'{"l":3}', 0, offset=9)  # changed again: still held since 0.0, from 7
    >>> held.unwritten_from()
    {0: 7, 1: 3}
    >>> [key for key, _, _ in held.take_due()]  # a round: u1 is not due before 0.4
    []
    >>> now[0] = 0.45
    >>> [(key, raw) for key, raw, _ in held.take_due()]
    [(('user', b'u1'), b'{"l":3}')]
    >>> held.unwritten_from()  # partition 0 has nothing held: its commits go as far as processed
    {1: 3}
    >>> ("user", b"u2") in held, [key for key, _, _ in held.take_all()]
    (True, [('user', b'u2')])
    """
    round_s = cython.declare(cython.double, visibility="readonly")
    _due_after_s = cython.declare(cython.double)
    _clock = cython.declare(object)
    _order = cython.declare(object)  # deque of (first held, key), oldest first
    _last_round = cython.declare(cython.double)

    def __init__(self, interval_s: float, round_s: float = WRITE_ROUND_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.round_s = min(interval_s, round_s)
        self._due_after_s = interval_s - self.round_s
        self._clock = clock
        self._records = {}
        self._order = deque()
        self._last_round = clock()

    @cython.ccall
    def hold(self, key: tuple, record: bytes, partition: int, offset: int) -> None:
        """``record`` (encoded), as the events from ``offset`` of ``partition`` on left it."""
        if self._keep(key, record, partition, offset):
            self._order.append((self._clock(), key))

    def unwritten_from(self) -> dict[int, int]:
        """Per partition with records held, the offset of the oldest event whose changes they
        hold: every change by the events before it is written (or never was held)."""
        oldest: dict[int, int] = {}
        for _, partition, offset in self._records.values():
            if offset < oldest.get(partition, offset + 1):
                oldest[partition] = offset
        return oldest

    def take_due(self) -> list[tuple[HeldKey, bytes, int]]:
        """If a write round is due, the records due in it, no longer held; else none."""
        now: cython.double = self._clock()
        if now - self._last_round < self.round_s:
            return []
        self._last_round = now
        held_before: cython.double = now - self._due_after_s
        due = []
        order = self._order
        while order and order[0][0] <= held_before:
            key = order.popleft()[1]
            record, partition, _ = self._records.pop(key)
            due.append((key, record, partition))
        return due

    def take_all(self) -> list[tuple[HeldKey, bytes, int]]:
        """Every held record (before a rebalance, a shutdown or an explain), no longer held."""
        taken = [(key, record, partition) for key, (record, partition, _) in self._records.items()]
        self._records.clear()
        self._order.clear()
        return taken


@cython.cclass
class BatchChanges(_Changed):
    """The entity records one batch's events changed, decoded: the batch's next events read and
    change them here, and at its end each is encoded once and held (``HeldRecords``).

    Until round 28 (docs/performance.md) records stayed decoded while held, up to
    ``ABUSE_STATE_WRITE_INTERVAL_S``: by their next event or their write their ~100 objects
    were cold (at 5,000 events/s encoding one took ~6.5 µs, decoding ~5.5 and freeing ~4.2,
    where a record in cache encodes in 0.5 and decodes in 2.3). Encoded at the end of each
    batch that changes them and decoded afresh by the next, they cost the codec a little more
    (~4 µs each way), and everything else that reads and changes them, working on objects
    decoded within the batch, enough less: −4.4% CPU per event.

    >>> held = HeldRecords(interval_s=0.5)
    >>> changes = BatchChanges()
    >>> record = {"l": 1}
    >>> changes.change(("user", b"u1"), record, 0, offset=7)
    >>> record["l"] = 2  # the batch's next event, in place
    >>> changes.change(("user", b"u1"), record, 0, offset=8)
    >>> changes.get(("user", b"u1")) is record, ("user", b"u1") in held
    (True, False)
    >>> changes.hold_all(held)
    >>> held.get(("user", b"u1")), held.unwritten_from(), len(changes)
    (b'{"l":2}', {0: 7}, 0)
    """

    @cython.ccall
    def change(self, key: tuple, record: dict, partition: int, offset: int) -> None:
        """``record`` as the event at ``offset`` of ``partition`` left it."""
        self._keep(key, record, partition, offset)

    @cython.ccall
    def hold_all(self, held: HeldRecords) -> None:
        """Encodes every record changed and holds it in ``held``; none is left here."""
        for key, (record, partition, offset) in self._records.items():
            held.hold(key, encode_record(record), partition, offset)
        self._records.clear()


@cython.cclass
class ShardPresence:
    """Which of the worker's owned partitions hold a shard of each sharded entity.

    An event reads its IP's, device's, merchant's and card's shards in every other
    partition the worker owns (three RocksDB reads per entity with four partitions on
    one worker), and most of those shards do not exist: an IP is mostly seen on the
    partitions of its few users. The partitions found holding one are kept per entity, a
    bitmask: found once by reading the stores, then kept up to date by ``add`` for every
    shard the worker writes. Only this worker writes its owned partitions, so a partition
    not in the mask holds no shard; one in it may (the expiry sweep may have deleted it:
    reading it then finds nothing). Cleared whenever ownership may change; forgotten
    altogether when ``capacity`` entities are kept.

    >>> stores = {0: {b"0|1.2.3.4"}, 1: set(), 2: set()}
    >>> presence = ShardPresence(capacity=10)
    >>> presence.partitions("ip", "1.2.3.4", [0, 1, 2], lambda entity, p, key: shard_key(p, key) in stores[p])
    1
    >>> presence.add("ip", "1.2.3.4", 2)
    >>> presence.partitions("ip", "1.2.3.4", [0, 1, 2], lambda entity, p, key: 1 / 0)  # known: no store read
    5
    """
    _masks = cython.declare(KeptPerEntity)  # entity -> key -> bit p set if partition p has a shard

    def __init__(self, capacity: int = SHARD_PRESENCE_ENTITIES):
        self._masks = KeptPerEntity(capacity)

    def __len__(self) -> int:
        return len(self._masks)

    @cython.ccall
    def partitions(self, entity: str, key: str, owned: Iterable[int], exists: Callable[[str, int, str], bool]) -> object:
        """The bitmask of the ``owned`` partitions with a shard of ``key``; ``exists(entity,
        partition, key)`` reads a store, for an entity not known yet."""
        mask = self._masks.get(entity, key)
        if mask is None:
            mask = 0
            for partition in owned:
                if exists(entity, partition, key):
                    mask |= 1 << partition
            self._masks.put(entity, key, mask)
        return mask

    @cython.ccall
    def add(self, entity: str, key: str, partition: int) -> None:
        """The worker wrote a shard of ``key`` in ``partition``."""
        mask = self._masks.get(entity, key)
        if mask is not None:
            self._masks.put(entity, key, mask | (1 << partition))

    @cython.ccall
    def clear(self) -> None:
        self._masks.clear()


_SHARDED = cython.declare(dict, {name: entity.sharded for name, entity in ENTITIES.items()})


@cython.cclass
class EntityReads:
    """What a worker's events read of entity state, and the changes they hold until written.

    ``store_of(entity, partition)`` reads a key of the worker's store of that table partition;
    ``replica_shards(entity, key, partitions)`` gives the replicated shards of the partitions
    the worker does not own (asked only when there are such partitions); ``reputation_of(entity,
    key)`` the entity's label-derived record, and ``reputations_kept``, if given, what it keeps
    (``None`` for an entity without one), read first: ``reputation_of`` is then asked only for
    an entity it does not keep (each was a Python call per entity per event, as was the replica's
    with no partition to read: 3.5% of a worker's scoring thread, docs/performance.md, round 41).
    Call ``begin_batch`` with the owned partitions before each batch (ownership never changes
    within one) and ``end_batch`` after it; ``forget_owned_stores`` whenever ownership may
    change. ``held`` is the records held until written; ``stored_bytes`` what the owned
    stores hold for the records read or written lately: tell it of every write
    (``written``) and deletion (``deleted``).
    """
    held = cython.declare(HeldRecords, visibility="readonly")
    stored_bytes = cython.declare(KeptPerEntity, visibility="readonly")
    _changes = cython.declare(BatchChanges)
    _presence = cython.declare(ShardPresence)
    _store_of = cython.declare(object)
    _replica_shards = cython.declare(object)
    _reputation_of = cython.declare(object)
    _reputations_kept = cython.declare(KeptPerEntity)  # may be None
    _partitions = cython.declare(cython.int)
    _owned = cython.declare(object)  # the owned partitions, as of the batch
    # per batch: for each partition with events, the other owned partitions (shards read from
    # the local stores) and the rest (from the replica), and each table partition's reader
    _layout = cython.declare(dict)
    _stores = cython.declare(dict)

    def __init__(self, store_of: Callable[[str, int], Callable[[bytes], bytes | None]],
                 replica_shards: Callable[[str, str, list[int]], tuple[bytes, ...]],
                 reputation_of: Callable[[str, str], bytes | None], partitions: int, interval_s: float,
                 stored_entries: int = STORED_BYTES_ENTRIES, clock: Callable[[], float] = time.monotonic,
                 reputations_kept: KeptPerEntity | None = None) -> None:
        self.held = HeldRecords(interval_s, clock=clock)
        self.stored_bytes = KeptPerEntity(stored_entries)
        self._changes = BatchChanges()
        self._presence = ShardPresence()
        self._store_of, self._replica_shards, self._reputation_of = store_of, replica_shards, reputation_of
        self._reputations_kept = reputations_kept
        self._partitions = partitions
        self._owned = frozenset()
        self._layout = {}
        self._stores = {}

    def begin_batch(self, owned: Iterable[int]) -> None:
        """Before a batch: the partitions the worker owns now."""
        self._owned = frozenset(owned)
        self._layout.clear()
        self._stores.clear()

    def end_batch(self) -> None:
        """After a batch (even one that raised): every record it changed held, encoded."""
        self._changes.hold_all(self.held)

    def forget_owned_stores(self) -> None:
        """What is kept of the owned partitions' stores (their shards' presence, their records'
        bytes) holds while only this worker writes them: forgotten whenever ownership may
        change (Faust then restores newly assigned partitions from their changelogs)."""
        self._presence.clear()
        self.stored_bytes.clear()

    @cython.ccall
    def table_key(self, entity: str, partition: int, key: str) -> bytes:
        """The key of an entity's record (of its shard in ``partition``) in its table."""
        return shard_key(partition, key) if _SHARDED[entity] else key.encode()

    @cython.ccall
    def _store(self, entity: str, partition: int) -> object:
        reader = self._stores.get((entity, partition))
        if reader is None:
            reader = self._stores[(entity, partition)] = self._store_of(entity, partition)
        return reader

    @cython.ccall
    def stored(self, entity: str, table_key: bytes, partition: int) -> object:
        """A record as an event must see it: as the batch changed it, else its held bytes or
        its stored bytes (kept in ``stored_bytes`` or read from the store) decoded. Not kept
        decoded beyond its batch: by its entity's next event its objects were cold, and
        decoding its bytes again cost less (docs/performance.md, rounds 19 and 28); the bytes
        spare the RocksDB read (round 22)."""
        held_key = (entity, table_key)
        changed = self._changes.get(held_key)
        if changed is not None:
            return changed
        raw = self.held.get(held_key)
        if raw is None:
            raw = self.stored_bytes.get(entity, table_key, _UNREAD)
            if raw is _UNREAD:
                raw = self._store(entity, partition)(table_key)
                self.stored_bytes.put(entity, table_key, raw)
        return None if raw is None else orjson.loads(raw)

    @cython.ccall
    def is_held(self, held_key: tuple) -> cython.bint:
        """Whether a record's latest change is not in its store yet."""
        return held_key in self._changes or held_key in self.held

    def shard_exists(self, entity: str, partition: int, key: str) -> bool:
        shard = shard_key(partition, key)
        return self.is_held((entity, shard)) or self._store(entity, partition)(shard) is not None

    @cython.ccall
    def states_for(self, keys: dict, partition: int) -> dict:
        """Each entity's ``EntityState`` for an event of ``partition`` with these entity ``keys``."""
        layout = self._layout.get(partition)
        if layout is None:
            owned = self._owned
            layout = self._layout[partition] = (
                [p for p in sorted(owned) if p != partition],
                [p for p in range(self._partitions) if p != partition and p not in owned])
        local_partitions, remote_partitions = layout
        states = {}
        for entity, key in keys.items():
            # decoded: extract updates it in place, and the batch's next events read it
            own = self.stored(entity, self.table_key(entity, partition, key), partition)
            others: tuple = ()
            if _SHARDED[entity]:
                with_shards = self._presence.partitions(entity, key, self._owned, self.shard_exists)
                local = []
                for p in local_partitions:
                    if with_shards >> p & 1:
                        shard = self.stored(entity, shard_key(p, key), p)
                        if shard is not None:
                            local.append(shard)
                others = tuple(local)
                if remote_partitions:
                    others = self._replica_shards(entity, key, remote_partitions) + others
            states[entity] = EntityState(None, others, self._reputation(entity, key), own)
        return states

    @cython.cfunc
    def _reputation(self, entity: str, key: str) -> object:
        if self._reputations_kept is not None:
            kept = self._reputations_kept.get(entity, key, _UNREAD)
            if kept is not _UNREAD:
                return kept
        return self._reputation_of(entity, key)

    @cython.ccall
    def extract(self, event: dict, partition: int, offset: int) -> tuple:
        """``features.extract`` of the event at ``offset`` of ``partition`` over the states it reads
        here, the records it changed held: ``(states, extraction)``. One call per event from the
        worker, whose own Python for the same steps (the keys, the holds) was 3.7% of its scoring
        thread (docs/performance.md, round 41)."""
        keys = entity_keys(event)
        states = self.states_for(keys, partition)
        extraction: Extraction = extract(event, states, (partition, offset), keys)
        for name, record in extraction.records.items():
            self.hold(name, partition, keys[name], record, offset)
        return states, extraction

    @cython.ccall
    def idle_among(self, entity: str, items: object, watermark_ms: int, limit: int, skip: bytes) -> tuple:
        """The expiry sweep's look at a slice of one of the owned stores: of the first ``limit``
        (key, stored bytes) of ``items`` (in key order), the keys of records idle at
        ``watermark_ms`` (``stored_is_idle``) that are not held, and where the slice ends: the
        last key taken if ``limit`` were, else None (the store's end). ``skip`` is a key that
        holds no record (Faust's offset key). One call per slice: the worker's Python loop over
        its keys, two an event, was most of the sweep's 1.8% of the scoring thread
        (docs/performance.md, round 41)."""
        idle = []
        kind = ENTITIES[entity]
        taken = 0
        for key, raw in items:
            taken += 1
            if key != skip and not self.is_held((entity, key)) and stored_is_idle(kind, raw, watermark_ms):
                idle.append(key)
            if taken >= limit:
                return idle, key
        return idle, None

    @cython.ccall
    def hold(self, entity: str, partition: int, key: str, record: dict, offset: int) -> None:
        """A record the event at ``offset`` changed: read by the next events, held once the batch ends."""
        self._changes.change((entity, self.table_key(entity, partition, key)), record, partition, offset)
        self._presence.add(entity, key, partition)

    @cython.ccall
    def written(self, entity: str, table_key: bytes, raw: object) -> None:
        """The store now holds ``raw`` (None: nothing) for this key."""
        self.stored_bytes.put(entity, table_key, raw)

    @cython.ccall
    def deleted(self, entity: str, table_key: bytes) -> None:
        """The store no longer holds this key (the expiry sweep deleted it)."""
        self.stored_bytes.forget(entity, table_key)
