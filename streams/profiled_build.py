"""The detector's compiled modules built with a profile of the worker's own work (gcc's
profile-guided optimisation; ``make install`` runs it, ``PGO=0 make install`` skips it).

``setup.py`` compiles the modules once to count, in a training run, how often each branch and
call of their C code runs (``ABUSE_BUILD_PROFILE=generate``), then again with those counts
(``use``): gcc lays the hot paths out together and inlines and unrolls by what ran, where a
plain ``-O3`` build guesses. Cython's C is mostly branches (type checks, reference counts,
error exits) that almost never go the other way, so the guess costs instruction-cache space
and mispredictions (docs/performance.md, round 42).

The training run (``training_run``) is the worker's path without Kafka: simulated events and
labels decoded and checked, each event's features through ``EntityReads`` over in-memory stores
(four partitions, the shards merged), the batch scored with its JSON, the records held, written
and swept, the scores joined with their labels, and the models and reputations learning from the
examples, so that they are trained for most of the run, as a worker's are. Functions it never
runs are compiled as without a profile (``-fprofile-partial-training``), not for size.

Any failure leaves the plain build in place: a slower worker, never a broken or an instrumented one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import orjson

from detectors import BUILD_PROFILE_RECORD, PURE_PYTHON_ENV

PROFILE_ENV = "ABUSE_BUILD_PROFILE"  # read by setup.py: "generate" or "use", with PROFILE_DIR_ENV
PROFILE_DIR_ENV = "ABUSE_BUILD_PROFILE_DIR"
PARTITIONS = 4
BATCH_EVENTS = 500
SWEEP_EVERY_BATCHES = 8
ROOT = Path(__file__).resolve().parent.parent


def training_run(days: float = 1.0, seed: int = 42) -> dict[str, int]:
    """The worker's per-event work over ``days`` of simulated traffic, in process; returns counts."""
    from detectors.events import decode_event, decode_label
    from detectors.labels import on_label, on_score
    from detectors.lifecycle import ModelSet
    from detectors.pipeline import Detector
    from detectors.reputation import add_label_stored
    from detectors.worker_state import EntityReads
    from schemas import ContractViolation
    from streams.simulator import SimulationConfig, simulate

    detector = Detector(ModelSet.new(20))
    stores: dict[tuple[str, int], dict[bytes, bytes]] = {}
    reputations: dict[tuple[str, str], bytes] = {}
    reads = EntityReads(lambda entity, partition: stores.setdefault((entity, partition), {}).get,
                        lambda entity, key, partitions: (), lambda entity, key: reputations.get((entity, key)),
                        PARTITIONS, 0.0)
    pending: dict[str, Any] = {}
    counts = dict(events=0, rejected=0, labels=0, examples=0, alerts=0, swept=0)
    offsets = [0] * PARTITIONS

    def learn(example: dict[str, Any]) -> None:
        for delta in detector.learn(example, counts["examples"]):
            key = (delta.entity, delta.key)
            reputations[key] = add_label_stored(reputations.get(key), delta.label_ts, delta.delta)
        counts["examples"] += 1

    def join_label(raw: bytes) -> None:
        try:
            label = decode_label(raw, 1 << 16)
        except ContractViolation:
            counts["rejected"] += 1
            return
        counts["labels"] += 1
        pending[label["event_id"]], example = on_label(pending.get(label["event_id"]), label)
        if example is not None:
            learn(example)

    def score(batch: list[bytes], batches: int) -> None:
        reads.begin_batch(range(PARTITIONS))
        extracted = []
        for raw in batch:
            try:
                event = decode_event(raw, 1 << 16)
            except ContractViolation:
                counts["rejected"] += 1
                continue
            partition = zlib.crc32(event["user_id"].encode()) % PARTITIONS
            offsets[partition] += 1
            states, extraction = reads.extract(event, partition, offsets[partition])
            extracted.append((event, states, extraction, partition))
        results = detector.score_many([item[:3] for item in extracted], int(time.time() * 1000), with_json=True)
        for (event, _, extraction, partition), result in zip(extracted, results):
            for name, record in result.records.items():
                if name not in extraction.records:
                    reads.hold(name, partition, result.keys[name], record, offsets[partition])
            joined, example = on_score(pending.get(event["event_id"]), orjson.loads(result.risk_score_json))
            pending[event["event_id"]] = joined
            if example is not None:
                learn(example)
            counts["events"] += 1
            counts["alerts"] += result.alert is not None
        reads.end_batch()
        for (entity, key), raw, partition in reads.held.take_all():
            stores.setdefault((entity, partition), {})[key] = raw
            reads.written(entity, key, raw)
        if batches % SWEEP_EVERY_BATCHES == 0:
            watermark = max((event["ts"] for event, *_ in extracted), default=0)
            for (entity, partition), store in stores.items():
                idle, _ = reads.idle_among(entity, iter(sorted(store.items())), watermark, 1 << 30, b"")
                for key in idle:
                    del store[key]
                    reads.deleted(entity, key)
                counts["swept"] += len(idle)

    batch: list[bytes] = []
    batches = 0
    for record in simulate(SimulationConfig(seed=seed, days=days)):
        if record.kind == "label":
            join_label(record.value)
            continue
        batch.append(record.value)
        if len(batch) == BATCH_EVENTS:
            batches += 1
            score(batch, batches)
            batch = []
    if batch:
        score(batch, batches + 1)
    return counts


def _setup_env(profile: str, profile_dir: str) -> dict[str, str]:
    """The environment in which setup.py compiles with gcc's profile flags for ``profile`` ("": none)."""
    env = {key: value for key, value in os.environ.items() if key not in (PROFILE_ENV, PROFILE_DIR_ENV)}
    if profile:
        env.update({PROFILE_ENV: profile, PROFILE_DIR_ENV: profile_dir})
    return env


def _build(profile: str, profile_dir: str = "") -> None:
    """Compiles the detector's modules in place (setup.py), with gcc's profile flags for ``profile``."""
    # gcc's warnings about Cython's C (dozens with a profile, all harmless) are shown only on a failure
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force"], cwd=ROOT,
                   env=_setup_env(profile, profile_dir), check=True, capture_output=True, text=True)


_TRAINING_SCRIPT = """
import json, sys
from pathlib import Path
from detectors import BUILD_RECORD, compiled_modules
from streams.profiled_build import training_run
counts = training_run(float(sys.argv[1]))
built = set(json.loads((Path("detectors") / BUILD_RECORD).read_text()))
missing = built - set(compiled_modules())
if missing:
    sys.exit(f"these modules ran from their source, not their build: {sorted(missing)}")
print(json.dumps(counts))
"""


def _train(days: float) -> dict[str, int]:
    """The training run in a fresh interpreter, whose counts gcc's runtime writes as it exits. Every
    module must run compiled: one run from its source would leave its build without counts."""
    env = {key: value for key, value in os.environ.items() if key != PURE_PYTHON_ENV}
    done = subprocess.run([sys.executable, "-c", _TRAINING_SCRIPT, str(days)], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True)
    return orjson.loads(done.stdout.strip().splitlines()[-1])


def _instrumented() -> list[Path]:
    """Builds that still count (gcc's profiling runtime linked in): never left in place."""
    return [built for built in (ROOT / "detectors").glob("*.so") if b"__gcov_" in built.read_bytes()]


def _plain_build() -> None:
    """The build without a profile; failing that, none (the modules run from their source),
    never an instrumented one, whose counts would go nowhere."""
    try:
        _build("")
        print("built the detector modules without a profile", file=sys.stderr)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"building the detector modules failed too ({exc}): they run from their source", file=sys.stderr)
    for built in _instrumented():
        built.unlink()


def _differ_from_the_tree(wheel: Path) -> list[str]:
    """The wheel's compiled modules that are not, byte for byte, the ones built in place."""
    with zipfile.ZipFile(wheel) as archive:
        return [name for name in archive.namelist() if name.startswith("detectors/") and name.endswith(".so")
                and archive.read(name) != (ROOT / name).read_bytes()]


def _wheel(wheel_dir: Path, profile_dir: str) -> Path:
    """The project's wheel, its modules compiled with the counts in ``profile_dir`` as the in-place
    build was ("": without a profile). gcc files the counts under each object's path, which the
    wheel's build shares with the in-place one (setup.py's build_temp, the same directory) and,
    failing that, silently compiles without them (``-Wno-missing-profile``): so each module in
    the wheel must be the in-place build's."""
    for earlier in (*(ROOT / "build").glob("lib.*"), *(ROOT / "build").glob("bdist.*")):
        shutil.rmtree(earlier)  # setuptools would take an earlier build found there as up to date
    with tempfile.TemporaryDirectory(prefix="abuse-wheel-") as built_dir:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", built_dir,
                        "."], cwd=ROOT, env=_setup_env("use" if profile_dir else "", profile_dir), check=True,
                       capture_output=True, text=True)
        (wheel,) = Path(built_dir).glob("*.whl")
        differ = _differ_from_the_tree(wheel) if profile_dir else []
        if differ:
            raise RuntimeError(f"the wheel's modules were not compiled with the counts: {differ}")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheel, wheel_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.profiled_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=1.0, help="days of simulated traffic the training run scores")
    parser.add_argument("--wheel", type=Path, metavar="DIR",
                        help="also write the project's wheel, built with the profile, to DIR (the Docker image's build)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="abuse-build-profile-") as profile_dir:
        try:
            _build("generate", profile_dir)
            counts = _train(args.days)
            if not any(Path(profile_dir).rglob("*.gcda")):
                raise RuntimeError(f"the training run left no counts in {profile_dir}")
            _build("use", profile_dir)
            if _instrumented():  # setup.py skips a module that fails to compile: its last build stays
                raise RuntimeError(f"not rebuilt with the counts: {[path.name for path in _instrumented()]}")
            # in the wheel too, which setup.py rebuilds from the tree: written before it
            (ROOT / "detectors" / BUILD_PROFILE_RECORD).write_bytes(
                orjson.dumps({"days": args.days, "training_run": counts}))
            wheel = _wheel(args.wheel, profile_dir) if args.wheel else None
        except (subprocess.CalledProcessError, RuntimeError, OSError, ValueError) as exc:
            detail = (getattr(exc, "stderr", None) or "").strip()[-4000:]  # the end says what failed
            print(f"profile-guided build failed: {exc}\n{detail}", file=sys.stderr)
            _plain_build()
            if args.wheel:
                print(f"wrote {_wheel(args.wheel, '')}, built without a profile", file=sys.stderr)
            return 0
    shutil.rmtree(ROOT / "build" / "profiled", ignore_errors=True)
    print(f"built the detector modules with the profile of a training run ({counts}) in "
          f"{time.monotonic() - started:.0f} s" + (f"; wrote {wheel}" if wheel else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
