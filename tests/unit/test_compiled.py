"""The compiled detector modules (setup.py) give exactly what their Python source gives."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import orjson
import pytest

import detectors
from detectors import BUILD_RECORD, PURE_PYTHON_ENV, modules_from_source, source_digest

REPO = Path(__file__).resolve().parents[2]
NOT_COMPILED = ("detectors are not compiled: install a C compiler and run `make install` "
                f"(or set {PURE_PYTHON_ENV}=1 to test the pure-Python reference alone)")
pure_python_run = pytest.mark.skipif(detectors.pure_python_requested(),
                                     reason=f"{PURE_PYTHON_ENV} is set: nothing compiled to compare")


def _setup_compiled() -> tuple[str, ...]:
    text = (REPO / "setup.py").read_text()
    start = text.index("COMPILED = (")
    return tuple(sorted(eval(text[start + len("COMPILED = "):text.index(")", start) + 1])))  # noqa: S307 - our own file


def _outputs_digest() -> str:
    """Scores, alerts and state updates of a simulated stream, in batches, with labels learned on the way."""
    import random

    from tests.unit.test_batch_scoring import CONFIG, _run
    from streams.simulator import simulate

    stream = [r for r in simulate(CONFIG) if r.kind in ("event", "label")]
    sizes = [random.Random(5).choice([1, 3, 50, 400]) for _ in range(200)]
    digest = hashlib.sha256()
    for line in _run(stream, sizes, batched=True):
        digest.update(line)
    return digest.hexdigest()


@pure_python_run
def test_the_per_event_modules_run_compiled():
    assert detectors.compiled_modules() == _setup_compiled(), NOT_COMPILED
    assert not importlib.import_module("detectors.entities").__file__.endswith(".py")


def _from_source(function: str) -> str:
    """What ``function`` of this module prints when every detector module runs from its source."""
    return subprocess.run(
        [sys.executable, "-c", f"from tests.unit.test_compiled import {function} as f; "
                               "import detectors; assert not detectors.compiled_modules(); print(f())"],
        cwd=REPO, env={**os.environ, PURE_PYTHON_ENV: "1"}, capture_output=True, text=True, check=True,
    ).stdout.strip()


@pure_python_run
def test_compiled_modules_score_byte_for_byte_like_their_python_source():
    assert detectors.compiled_modules(), NOT_COMPILED
    assert _outputs_digest() == _from_source("_outputs_digest")


def _texts(seed: int, count: int) -> list[str]:
    """Texts of every length class (shorter than a shingle or an n-gram, long, repetitive,
    non-ASCII, links, digits), then ``count`` random ones."""
    import random

    rng = random.Random(seed)
    texts = ["", "a", "ab", "abc", "abcd", "abcde", "Hello, world!", "x" * 500, "aaaa aaaa aaaa",
             "FREE phone http://x.example/1 now " * 40, "Ünïcödé wörds, 日本語 and\ttabs\nand lines"]
    return texts + ["".join(rng.choice("abcdefgh ijkZ9.é") for _ in range(rng.randint(0, 600))) for _ in range(count)]


def _fingerprints() -> list[int]:
    """``simhash`` of texts of every length class: the compiled build votes in C, the source with numpy."""
    import random

    from detectors.sketches import simhash

    long_text = "".join(random.Random(12).choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(70_000))
    return [simhash(text) for text in _texts(11, 500) + [long_text]]  # the last: > 65,535 shingles


@pure_python_run
def test_compiled_simhash_votes_like_the_numpy_reference():
    assert detectors.compiled_modules(), NOT_COMPILED
    assert str(_fingerprints()) == _from_source("_fingerprints")


@pure_python_run
def test_compiled_simhash_hands_unexpected_characters_to_the_reference():
    from detectors import sketches

    assert detectors.compiled_modules(), NOT_COMPILED
    for normalized in ("abc \u00e9 def", "UPPER case", "tab\there"):  # never what normalize_text makes
        assert sketches._simhash_compiled(normalized) == sketches._simhash_of_shingles(normalized)


@pure_python_run
def test_compiled_normaliser_matches_the_patterns_on_ascii_text():
    import random

    from detectors import sketches

    assert detectors.compiled_modules(), NOT_COMPILED
    rng = random.Random(4)
    pieces = [chr(c) for c in range(128)] + ["http://", "https://", "HTTP://", "hTtPs://", "x.example/", "a1"] * 8
    texts = ["", " ", "Visit https://x.example/path?q=1 NOW", "http:///x", "see:http://a.b/c/d", "http://http://a/b"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 24))) for _ in range(20_000)]
    for text in texts:
        assert sketches._normalize_ascii(text) == sketches._normalize_with_patterns(text), repr(text)


def _bucket_arithmetic() -> str:
    """Bucket values and window features on awkward amounts: the compiled build adds them as C doubles."""
    from detectors.catalog import ENTITIES
    from detectors.entities import _add, apply_event, entity_features, ring_buckets

    values = [0, 1, 3, 0.1, 0.2, 2.5, 0.005, 19.99, 123456.785, -3.75, 2.0 ** 53 - 1, 2.0 ** 53, 2.0 ** 53 + 2,
              2 ** 53 - 1, 2 ** 53 + 1, 2 ** 60 + 1, -2 ** 60, 10 ** 400, -10 ** 400, 1e300,
              float("inf"), float("-inf"), float("nan")]
    sums = []
    for a in values:
        for b in values:
            try:
                sums.append(repr(_add(a, b)))
            except OverflowError:  # e.g. 10 ** 400 + 1.0, as Python's own addition
                sums.append("OverflowError")
    features = []
    for entity in (ENTITIES["user"], ENTITIES["merchant"], ENTITIES["card"]):
        record, previous = None, None
        for i, amount in enumerate([19.99, 0.01, 1e6 + 0.005, 250, 0.1, 0.2, 7.125, 1e15, 3.3] * 3):
            event = {"event_id": f"p{i}", "type": "payment", "ts": 1_700_000_000_000 + i * 97_000, "user_id": "u1",
                     "amount": amount, "merchant_id": "m1", "card_fingerprint": "c1", "declined": i % 4 == 0}
            record, novelty = apply_event(entity, record, event)
            features.append(entity_features(entity, record, event, previous, novelty))
            previous = record["l"]
    # counts as JSON keeps them (ints), past a double's precision and past its range
    for count in (True, 7, 2 ** 53 + 1, 2 ** 60 + 1, -2 ** 62, 10 ** 400):
        view = json.loads(json.dumps(record))
        for key, ring in view["r"].items():
            view["r"][key] = ring = ring_buckets(ring)  # as lists: no packed ring holds most of these
            for bucket in ring:
                bucket[1:] = [count] * (len(bucket) - 1)
        try:
            features.append(entity_features(ENTITIES["card"], view, event, previous))
        except OverflowError:  # 10 ** 400: no double holds it, compiled or not
            features.append("OverflowError")
    return repr((sums, record, features))


@pure_python_run
def test_compiled_bucket_arithmetic_matches_the_source():
    assert detectors.compiled_modules(), NOT_COMPILED
    assert _bucket_arithmetic() == _from_source("_bucket_arithmetic")


def _package(tmp_path: Path, stale: tuple[str, ...] = ()) -> Path:
    """A package with two built modules, recorded as built from their sources except ``stale``."""
    recorded = {}
    for name in ("entities", "sketches"):
        (tmp_path / f"{name}.py").write_text(f"NAME = {name!r}\n")
        recorded[name] = "digest of an older source" if name in stale else source_digest(tmp_path / f"{name}.py")
    (tmp_path / BUILD_RECORD).write_text(json.dumps(recorded))
    return tmp_path


def test_a_module_whose_source_changed_since_its_build_runs_from_source(tmp_path, monkeypatch):
    monkeypatch.delenv(PURE_PYTHON_ENV, raising=False)
    package = _package(tmp_path, stale=("entities",))
    with pytest.warns(RuntimeWarning, match="entities changed since compiled.*make install"):
        assert modules_from_source(package, {"entities", "sketches"}) == {"entities"}


def test_up_to_date_builds_run_compiled_unless_pure_python_is_asked_for(tmp_path, monkeypatch):
    package = _package(tmp_path)
    monkeypatch.delenv(PURE_PYTHON_ENV, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert modules_from_source(package, {"entities", "sketches"}) == set()
    monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    assert modules_from_source(package, {"entities", "sketches"}) == {"entities", "sketches"}


def test_a_build_without_its_record_runs_from_source(tmp_path, monkeypatch):
    monkeypatch.delenv(PURE_PYTHON_ENV, raising=False)
    package = _package(tmp_path)
    (package / BUILD_RECORD).unlink()
    with pytest.warns(RuntimeWarning):
        assert modules_from_source(package, {"entities"}) == {"entities"}


@pure_python_run
def test_compiled_text_inputs_count_like_the_counter_reference():
    from detectors import content
    from detectors.sketches import normalize_text

    assert detectors.compiled_modules(), NOT_COMPILED
    for text in _texts(6, 3000):
        normalized = f" {normalize_text(text)} ".encode()
        # same buckets, same counts, same order (the order the stored scores and River see)
        assert list(content._counts_compiled(normalized).items()) == list(content._counts_of_ngrams(normalized).items())
    assert content._crc32_table()[:4] == [0, 0x77073096, 0xEE0E612C, 0x990951BA]  # zlib's


@pure_python_run
def test_compiled_anomaly_rows_score_and_learn_like_the_vector_reference():
    import copy

    import numpy as np

    from detectors.anomaly import AnomalyModel
    from detectors.catalog import FEATURE_NAMES

    assert detectors.compiled_modules(), NOT_COMPILED
    rng = np.random.default_rng(3)
    compiled = AnomalyModel(seed=7, window_size=50)
    reference = copy.deepcopy(compiled)
    scored = 0
    # batches across window ends, of one row, of _paths_of_few's and of the vector path's sizes
    for size in [1, 3, 8, 9, 50, 120, 1, 400, 2, 49] * 4:
        rows = rng.exponential(2.0, size=(size, len(FEATURE_NAMES)))
        for odd in (float("nan"), -3.0, 0.0, 1e300, float("inf")):  # log_feature_matrix leaves all of these
            rows[rng.random(rows.shape) < 0.04] = odd
        got, expected = compiled.score_then_learn_many(rows), reference._score_then_learn_vectors(rows)
        assert got.tobytes() == expected.tobytes()
        scored += int((got > 0).sum())
    assert scored > 1000  # past the first two windows, most rows score
    for name in ("_reference", "_latest"):
        assert getattr(compiled, name).tobytes() == getattr(reference, name).tobytes()
    assert (compiled.seen, compiled._in_window) == (reference.seen, reference._in_window)


@pure_python_run
def test_compiled_feature_matrix_converts_like_numpy():
    from collections import OrderedDict

    import numpy as np

    from detectors.catalog import FEATURE_NAMES
    from detectors.model import _feature_matrix, _feature_matrix_compiled, log_feature_matrix

    assert detectors.compiled_modules(), NOT_COMPILED
    full = {name: float(i) * 1.5 for i, name in enumerate(FEATURE_NAMES)}
    cases = [
        [full, dict(full, user_events_1m=2 ** 60 + 1)],  # ints, as stored examples may carry
        [full, {"user_events_1m": 3.0, "not_a_feature": 9.0}],  # a missing feature counts as 0
        # the catalogue's names as other string objects, or in another order: looked up by name
        [{name[:1] + name[1:]: value for name, value in full.items()}, dict(reversed(full.items()))],
        [dict(list(full.items())[:-1], not_a_feature=1.0)],  # as many keys, one not the catalogue's
        [dict(full, user_events_1m=float("nan")), dict(full, ip_events_1m=float("-inf"))],
        [],
    ]
    for rows in cases:
        compiled = _feature_matrix_compiled(rows)
        assert compiled is not None and compiled.tobytes() == _feature_matrix(rows).tobytes()
    for odd in ({**full, "user_events_1m": True}, {**full, "user_events_1m": None}, {**full, "user_events_1m": "2.5"},
                OrderedDict(full)):
        assert _feature_matrix_compiled([full, odd]) is None  # left to numpy's conversion
        expected = _feature_matrix([full, odd])
        np.log1p(expected, out=expected, where=expected > 0)
        assert log_feature_matrix([full, odd]).tobytes() == expected.tobytes()


@pure_python_run
def test_compiled_state_extraction_and_score_are_read_only_extension_types():
    from detectors.features import EntityState, Extraction, extract
    from detectors.pipeline import Scored

    assert detectors.compiled_modules(), NOT_COMPILED
    state = EntityState(b"{}", (b"{}",), None, None)
    with pytest.raises(AttributeError):
        state.own = b"changed"  # type: ignore[misc]
    result = extract({"event_id": "e", "type": "signup", "ts": 0, "user_id": "u", "device_id": "d"}, {})
    assert isinstance(result, Extraction) and result.updates is result.updates  # encoded once
    with pytest.raises(AttributeError):
        result.features = {}  # type: ignore[misc]
    scored = Scored({"user": {"l": 1}}, {"user": "u"}, {"score": 0.5}, None)
    assert type(scored).__module__ == "detectors.pipeline" and not hasattr(scored, "__dict__")
    assert scored.updates == {"user": b'{"l":1}'} and scored.updates is scored.updates
    with pytest.raises(AttributeError):
        scored.alert = {}  # type: ignore[misc]


@pure_python_run
def test_compiled_content_and_fusion_scores_are_rivers_predictions():
    import pickle
    import random

    from detectors.content import ContentModel, ngram_counts, text_inputs
    from detectors.fusion import FusionModel, fusion_inputs
    from detectors.model import HELD_WEIGHTS

    assert detectors.compiled_modules(), NOT_COMPILED
    rng = random.Random(8)
    content, fusion = ContentModel(min_labels_per_class=1), FusionModel(min_labels_per_class=1)

    def river(model: object, x: dict) -> str:
        return float(model.classifier.predict_proba_one(dict(x)).get(True, 0.0)).hex()  # type: ignore[attr-defined]

    texts = _texts(9, 400)
    for is_abuse in (True, False):  # the stacker scores once it has labels of both classes
        fusion.learn_one({"model": 0.5, "anomaly": 0.0, "rules": 0.0, "content": 0.5}, False, is_abuse)
    for step, text in enumerate(texts):
        is_abuse = rng.random() < 0.4
        scores = {"model": rng.random(), "anomaly": rng.random(), "rules": rng.choice([0.0, 0.6, 0.9]),
                  "content": rng.choice([0.0, 1.0, rng.random()])}  # logits clamped at both ends
        has_text = rng.random() < 0.5
        for _ in range(1 + 40 * (step % 97 == 5)):  # now and then far past the sigmoid's cut-offs
            content.learn_one(text_inputs(text), is_abuse)
            fusion.learn_one(scores, has_text, is_abuse)
        inputs = text_inputs(texts[step - 1])
        assert content.predict_proba_one(inputs).hex() == river(content, inputs), step
        assert content.predict_proba_counts(ngram_counts(texts[step - 1])).hex() == river(content, inputs), step
        scored = content.score_text(texts[step - 1], as_json=True)  # from the counting's arrays, no dict
        assert (scored[0].hex(), scored[1]) == (river(content, inputs), orjson.dumps(ngram_counts(texts[step - 1]))), step
        assert fusion.fuse(scores, True, True, has_text).hex() == river(fusion, fusion_inputs(scores, has_text)), step
        if step == 200:  # a checkpoint, restored: the held dicts are made again
            content, fusion = pickle.loads(pickle.dumps(content)), pickle.loads(pickle.dumps(fusion))
            assert HELD_WEIGHTS not in content.__dict__ and HELD_WEIGHTS not in fusion.__dict__
        if step == 300:  # River's weights replaced (a warm start): held again
            fusion.warm_start({"rules": 2.0, "model": 1.5}, -1.0, 60, 60)
    # logits on both sides of the sigmoid's cut-offs at ±30, and between them
    fusion.warm_start({"rules": 50.0, "model": 4.0, "has_text": -3.0}, -25.0, 60, 60)
    for intercept in (-60.0, -31.0, -29.0, -20.0, 0.0, 20.0, 29.0, 31.0, 60.0):
        content.classifier.intercept = intercept
        for text in texts[:30]:
            inputs = text_inputs(text)
            assert content.predict_proba_one(inputs).hex() == river(content, inputs), (intercept, text)
            assert content.predict_proba_counts(ngram_counts(text)).hex() == river(content, inputs), (intercept, text)
            assert content.score_text(text, as_json=True)[0].hex() == river(content, inputs), (intercept, text)
        for rules in (0.0, 0.1, 0.5, 0.9, 1.0):
            scores = {"model": rng.random(), "anomaly": rng.random(), "rules": rules, "content": rng.random()}
            assert fusion.fuse(scores, True, True, True).hex() == river(fusion, fusion_inputs(scores, True)), rules
    assert HELD_WEIGHTS in content.__dict__ and HELD_WEIGHTS in fusion.__dict__  # the C path ran


@pure_python_run
def test_compiled_reasons_pick_the_contributions_the_reference_picks():
    import numpy as np

    from detectors import model

    assert detectors.compiled_modules(), NOT_COMPILED
    rng = np.random.default_rng(4)
    names = tuple(f"feature_{i:03d}" for i in rng.permutation(40))  # names in no particular order
    compared = 0
    for case in range(300):
        rows, n = int(rng.integers(0, 30)), 40 if case % 10 else int(rng.integers(1, 6))
        # few distinct values, so equal contributions (ranked by name) are common, and zeros and negatives
        inputs = rng.choice([0.0, -0.0, 1.0, 2.0, -1.0, 0.5, 3.0, np.inf if case % 3 == 0 else 4.0], size=(rows, n))
        weights = rng.choice([0.0, 1.0, 2.0, -1.0, 0.25], size=n)
        with np.errstate(invalid="ignore"):
            products = inputs * weights  # inf times 0 is NaN: left to the reference
        for top in (0, 1, 3, 5, 8):
            expected = model._top_contributions_of_products(products, names[:n], top)
            got = model._top_contributions(inputs, weights, names[:n], top)
            assert got == (None if np.isnan(products).any() else expected), (case, top)
        compared += not np.isnan(products).any()
    assert compared > 100
    inputs = np.ones((3, 40))
    inputs[1, 7] = np.nan
    assert model._top_contributions(inputs, np.ones(40), names, 3) is None  # left to the reference


@pure_python_run
def test_compiled_learning_updates_the_model_as_rivers_learn_one(monkeypatch):
    import pickle

    import numpy as np

    from detectors import model as model_module
    from detectors.model import OnlineRiskModel

    assert detectors.compiled_modules(), NOT_COMPILED
    rng = np.random.default_rng(21)
    n = len(OnlineRiskModel().scaler.names)
    fast, river = OnlineRiskModel(learning_rate=0.01), OnlineRiskModel(learning_rate=0.003)
    river.learning_rate = fast.learning_rate
    river.classifier = pickle.loads(pickle.dumps(fast.classifier))

    def state(model: OnlineRiskModel) -> str:
        optimizer = model.classifier.optimizer
        dicts = [model.classifier._weights] + ([optimizer.m, optimizer.v] if optimizer.m is not None else [])
        return repr(([[(k, float(value).hex()) for k, value in d.to_dict().items()] for d in dicts],
                     float(model.classifier.intercept).hex(), optimizer.n_iterations, model.positives,
                     model.negatives))

    taken = []
    compiled_learn = model_module._learn_logistic_adam

    def counted(*args):
        taken.append(compiled_learn(*args))
        return taken[-1]

    for step in range(600):
        row = rng.normal(0, 3, size=n) * (rng.random(n) < 0.4)
        if step == 590:
            row[3] = np.nan  # left to River, which learns NaNs (and is NaN from then on)
        elif step % 89 == 7:
            row[4] = 1e200  # a gradient whose square overflows (left to River: Adam's moment goes to inf)
        elif step % 61 == 3:
            row *= 40  # saturated logits, both sides of the loss's cut-offs
        is_abuse = bool(rng.random() < 0.3)
        for model, learn in ((fast, counted), (river, lambda *args: False)):
            with monkeypatch.context() as patch:
                patch.setattr(model_module, "_learn_logistic_adam", learn)
                model.learn_scaled(row, is_abuse)
        assert state(fast) == state(river), step
        assert fast.predict_proba_scaled(row).hex() == river.predict_proba_scaled(row).hex(), step
        if step == 300:  # a checkpoint, restored: the held dicts are made again
            fast, river = pickle.loads(pickle.dumps(fast)), pickle.loads(pickle.dumps(river))
        if step in (450, 520):  # weights fitted offline (bootstrap), then in another order and missing some
            names = fast.scaler.names if step == 450 else tuple(reversed(fast.scaler.names[10:]))
            weights = {name: float(rng.normal()) for name in names}
            for model in (fast, river):
                model.warm_start(weights, 0.5, 40, 60)
            if step == 520:
                # all but each start's first step (Adam has no moments yet) and the NaN or overflowing rows
                assert sum(taken) > 480 and all(taken[-60:]), "the compiled path learns, again after a warm start"
                taken.clear()
    assert not any(taken), "weights in another order than the catalogue's are left to River"


@pure_python_run
def test_compiled_standardiser_learns_the_same_doubles_as_numpy():
    import numpy as np

    from detectors.model import Standardiser

    assert detectors.compiled_modules(), NOT_COMPILED
    rng = np.random.default_rng(8)
    batches = [rng.lognormal(0, 3, size=(n, 101)) * (rng.random((n, 101)) < 0.3) for n in (1, 7, 300, 2)]
    batches.append(np.full((3, 101), 1e300))
    compiled, reference = Standardiser(), Standardiser()
    for batch in batches:
        z = compiled.learn_transform_many(batch.copy())
        expected = np.empty_like(batch)
        with np.errstate(over="ignore", invalid="ignore"):  # the 1e300s overflow, in both
            for i, row in enumerate(batch):  # the numpy reference, row by row
                reference._learn(row)
                expected[i] = reference.transform_many(row[None, :])[0]
        assert z.tobytes() == expected.tobytes()
        for name in ("counts", "means", "variances"):
            assert getattr(compiled, name).tobytes() == getattr(reference, name).tobytes(), name


@pure_python_run
def test_compiled_rounding_gives_the_double_pythons_round_gives():
    """``rounded`` against ``round``, bit for bit: random doubles of every magnitude, numbers
    one ulp either side of a decimal halfway point (whose product may round onto it), exact
    ties (half to even), signed zeros, and what has no decimals to round."""
    import math
    import random
    import struct

    from detectors.rounding import rounded

    assert "rounding" in detectors.compiled_modules(), NOT_COMPILED
    rng = random.Random(18)
    cases = [(x, d) for x in (0.0, -0.0, 0.5, 1.5, 2.5, -3.5, 0.125, 0.375, 2.675, 1e-300, -1e-9, 5e-324, 2.0 ** 52,
                              2.0 ** 53 + 2, 1e300, math.inf, -math.inf, math.nan) for d in (0, 2, 3, 4, 6, 15)]
    for _ in range(100_000):
        digits = rng.choice((0, 2, 4, 6, 9, 15))
        halfway = (rng.randrange(10 ** 7) + 0.5) / 10 ** digits
        cases += [(math.nextafter(halfway, -math.inf), digits), (halfway, digits),
                  (math.nextafter(halfway, math.inf), digits), (-halfway, digits),
                  (struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0], digits),
                  (rng.random(), digits)]
    differ = [(x, d) for x, d in cases if struct.pack("d", rounded(x, d)) != struct.pack("d", round(x, d))
              and not (math.isnan(x))]
    assert not differ, differ[:5]
    assert math.isnan(rounded(math.nan, 6)) and rounded(7.123456789, 20) == round(7.123456789, 20)
