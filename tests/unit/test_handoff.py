"""Models learned in a learner process and scored with on the worker's thread
(detectors/handoff.py): the scorer must score exactly as one ModelSet doing both would."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from detectors.catalog import FEATURE_NAMES
from detectors.content import ngram_counts
from detectors.handoff import models_handoff, scalers_handoff, take_models, take_scalers
from detectors.lifecycle import ModelSet
from detectors.model import log_feature_matrix

WORDS = "free phone now visit win cash lovely walk park today meet friends http://x.example".split()


def _features(rng: random.Random) -> dict[str, float]:
    return {name: float(rng.randint(0, 40)) for name in rng.sample(FEATURE_NAMES, 12)}


def _example(rng: random.Random) -> dict:
    text = " ".join(rng.choices(WORDS, k=rng.randint(2, 8))) if rng.random() < 0.6 else None
    return {"label": "abuse" if rng.random() < 0.3 else "benign", "previous_label": None,
            "features": _features(rng), "text": ngram_counts(text) if text else None,
            "detectors": {"model": rng.random(), "anomaly": rng.random(), "rules": rng.random(),
                          "content": rng.random()}}


def _scores(models: ModelSet, rows: list[dict], texts: list[dict]) -> list:
    champion, challenger, _ = models.observe_and_score_many(log_feature_matrix(rows))
    return [champion.tolist(), challenger.tolist(), [models.content.predict_proba_counts(t) for t in texts],
            models.fusion.weights(), models.fusion.classifier.intercept, models.champion.version,
            models.challenger.version, models.report()]


def test_a_scorer_fed_by_handoffs_scores_as_one_model_set_that_learns_itself():
    rng = random.Random(33)
    alone = ModelSet.new(min_labels_per_class=3)  # scores and learns on one thread, as before round 33
    learner, scorer = pickle.loads(pickle.dumps(alone)), ModelSet.new(min_labels_per_class=99)
    take_models(scorer, models_handoff(learner, changed_ngrams=None), own_scalers=False)
    offset = -1
    for round_ in range(40):
        rows = [_features(rng) for _ in range(rng.randint(1, 30))]
        texts = [ngram_counts(" ".join(rng.choices(WORDS, k=5))) for _ in range(3)]
        assert _scores(scorer, rows, texts) == _scores(alone, rows, texts)  # the scalers learn these rows too

        take_scalers(learner, scalers_handoff(scorer))  # the reply to the last handoff
        changed: set[str] = set()
        for _ in range(rng.randint(0, 12)):
            example, offset = _example(rng), offset + 1
            alone.learn(example, offset)
            learner.learn(example, offset)
            changed.update(example["text"] or ())
        if round_ == 20:
            alone.promote()
            learner.promote()
        take_models(scorer, models_handoff(learner, changed_ngrams=changed), own_scalers=True)

    assert alone.champion.ready and alone.content.ready and alone.promotions
    assert scorer.content.classifier._weights.to_dict() == alone.content.classifier._weights.to_dict()
    assert scorer.report() == alone.report()


def test_a_restarted_learners_full_handoff_leaves_the_scorer_its_scalers():
    rng = random.Random(5)
    learner, scorer = ModelSet.new(min_labels_per_class=1), ModelSet.new(min_labels_per_class=1)
    take_models(scorer, models_handoff(learner, changed_ngrams=None), own_scalers=False)
    assert scorer.champion.scaler is not learner.champion.scaler  # a copy, shared by both risk models
    assert scorer.champion.scaler is scorer.challenger.scaler
    scorer.observe_and_score_many(log_feature_matrix([_features(rng) for _ in range(50)]))
    seen = scorer.champion.scaler.counts.copy()

    restarted = ModelSet.new(min_labels_per_class=1)  # its checkpoint's scaler saw none of it
    take_models(scorer, models_handoff(restarted, changed_ngrams=None), own_scalers=True)
    assert np.array_equal(scorer.champion.scaler.counts, seen) and scorer.challenger.scaler is scorer.champion.scaler


def test_a_handoff_of_another_format_is_refused():
    raw = pickle.dumps({"format": 0})
    with pytest.raises(ValueError, match="handoff format 0"):
        take_models(ModelSet.new(), raw, own_scalers=True)
