"""Models learned in one place and scored with in another: the handoffs between them.

A worker scores on its own thread and learns in a process of its own (``streams/learner.py``).
The learner applies every training example to its ``ModelSet`` and hands the scorer what
scoring reads (``models_handoff``), a round of examples at a time:

* the risk models (champion and challenger) and the stacker whole, their weights and
  optimizer state (a few KB), *without* their scaler;
* the content model's weights: all of them in a full handoff (a platform's vocabulary fills
  most of its 262,144 buckets), then only those of the n-grams learned since the last one;
* the metrics, promotions, example count and offset.

The scaler is the one part the scorer learns: it standardises features by the traffic the
worker scores. So it travels the other way (``scalers_handoff``): the scorer keeps its own
and hands a copy to the learner, which scales the next examples with it, as the worker
scaled them when it learned on its own thread. Only the first handoff a scorer takes
brings scalers with it: those of the checkpoint the learner started from.

>>> learner, scorer = ModelSet.new(min_labels_per_class=1), ModelSet.new(min_labels_per_class=1)
>>> take_models(scorer, models_handoff(learner, changed_ngrams=None), own_scalers=False)
>>> example = {"label": "abuse", "previous_label": None, "features": {"user_events_1m": 9.0},
...            "detectors": {"model": 0.5, "anomaly": 0.0, "rules": 0.0, "content": 0.5},
...            "text": {"12": 3, "7": 1}}
>>> learner.learn(example, offset=0)
>>> take_models(scorer, models_handoff(learner, changed_ngrams=example["text"]), own_scalers=True)
>>> scorer.offset, scorer.champion.version == learner.champion.version
(0, True)
>>> scorer.content.predict_proba_counts({"12": 1}) == learner.content.predict_proba_counts({"12": 1})
True
"""

from __future__ import annotations

import copy
import pickle
from typing import Iterable

from detectors.lifecycle import ModelSet
from detectors.model import OnlineRiskModel

HANDOFF_FORMAT = 1


def _without_scaler(model: OnlineRiskModel) -> OnlineRiskModel:
    stripped = copy.copy(model)  # shallow: the classifier is pickled as it is
    stripped.scaler = None
    return stripped


def models_handoff(models: ModelSet, changed_ngrams: Iterable[str] | None) -> bytes:
    """What ``take_models`` needs to score as ``models`` do. ``changed_ngrams=None`` makes a full
    handoff (the content model whole, the scalers with it); otherwise the content model's
    weights of ``changed_ngrams`` only: those of every text learned since the last handoff."""
    full = changed_ngrams is None
    content = models.content
    if full:
        content_part: object = content
    else:
        weights = content.classifier._weights
        content_part = {"weights": {ngram: weights.get(ngram, 0.0) for ngram in changed_ngrams},
                        "intercept": content.classifier.intercept,
                        "positives": content.positives, "negatives": content.negatives}
    return pickle.dumps({
        "format": HANDOFF_FORMAT,
        "full": full,
        "champion": models.champion if full else _without_scaler(models.champion),
        "challenger": models.challenger if full else _without_scaler(models.challenger),
        "content": content_part,
        "fusion": models.fusion,
        "champion_metrics": models.champion_metrics,
        "challenger_metrics": models.challenger_metrics,
        "examples": models.examples,
        "offset": models.offset,
        "promotions": models.promotions,
        "bootstrap": models.bootstrap,
    }, protocol=pickle.HIGHEST_PROTOCOL)


def take_models(models: ModelSet, raw: bytes, own_scalers: bool) -> None:
    """Makes ``models`` score as the learner's did when it made ``raw`` (``models_handoff``).
    With ``own_scalers`` (every handoff but a scorer's first) the risk models keep the scalers
    ``models`` has; else they take a full handoff's."""
    handoff = pickle.loads(raw)  # from the worker's own learner process, never from users
    if handoff.get("format") != HANDOFF_FORMAT:
        raise ValueError(f"model handoff format {handoff.get('format')} is not {HANDOFF_FORMAT}")
    champion, challenger = handoff["champion"], handoff["challenger"]
    if own_scalers or not handoff["full"]:
        scalers = {model.name: model.scaler for model in (models.champion, models.challenger)}
        for model in (champion, challenger):
            model.scaler = scalers.get(model.name, models.champion.scaler)
    content = handoff["content"]
    if handoff["full"]:
        models.content = content
    else:
        models.content.classifier._weights.update(content["weights"])
        models.content.classifier.intercept = content["intercept"]
        models.content.positives, models.content.negatives = content["positives"], content["negatives"]
    models.champion, models.challenger, models.fusion = champion, challenger, handoff["fusion"]
    models.champion_metrics, models.challenger_metrics = handoff["champion_metrics"], handoff["challenger_metrics"]
    models.examples, models.offset = handoff["examples"], handoff["offset"]
    models.promotions, models.bootstrap = handoff["promotions"], handoff["bootstrap"]


def scalers_handoff(models: ModelSet) -> bytes:
    """The scorer's scalers, by the name of the model each standardises for (one object when shared)."""
    return pickle.dumps({model.name: model.scaler for model in (models.champion, models.challenger)},
                        protocol=pickle.HIGHEST_PROTOCOL)


def take_scalers(models: ModelSet, raw: bytes) -> None:
    """Gives the learner's models the scorer's scalers (``scalers_handoff``): the next examples
    are scaled as the scorer now scales events."""
    scalers = pickle.loads(raw)
    for model in (models.champion, models.challenger):
        if model.name in scalers:
            model.scaler = scalers[model.name]
