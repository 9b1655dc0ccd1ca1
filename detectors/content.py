"""Online text classifier for posts, comments and messages.

Character 4-grams of the normalised text are hashed into 2^18 buckets (no
vocabulary to grow) and fed to a River logistic regression trained from labels
of content events. It learns with AdaGrad, whose step works on the text's own
n-grams only: River's Adam step computes its moments over every weight ever
seen, measured 4.7 ms per label at 13,000 weights and 107 ms at 126,000 (a
platform's real vocabulary fills most of the 262,144 buckets), against
0.19-0.28 ms for AdaGrad. On the simulator both rank texts alike (content PR AUC
0.994 for both; 0.661 against 0.649 on a harder seed).

>>> m = ContentModel(min_labels_per_class=1)
>>> spam, ham = "get a FREE phone now visit http://x.example", "lovely walk in the park today"
>>> for _ in range(30):
...     m.learn_one(text_inputs(spam), True); m.learn_one(text_inputs(ham), False)
>>> m.predict_proba_one(text_inputs("FREE phone now!!! http://y.example")) > 0.5 > m.predict_proba_one(text_inputs("walk in the park"))
True
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Mapping

from river import linear_model, optim

from detectors.sketches import normalize_text

BUCKETS = 1 << 18
NGRAM = 4


def text_inputs(text: str) -> dict[str, float]:
    """Hashed character n-gram counts: the content model's input, stored with each score."""
    normalized = f" {normalize_text(text)} ".encode()  # ASCII: bytes and characters are one
    crc32, mask = zlib.crc32, BUCKETS - 1
    counts = Counter([crc32(normalized[i:i + NGRAM]) & mask for i in range(max(1, len(normalized) - NGRAM + 1))])
    total = counts.total()
    return {str(bucket): n / total for bucket, n in counts.items()}


LEARNING_RATE = 0.1


class ContentModel:
    version = "text-logreg/2"

    def __init__(self, min_labels_per_class: int = 20, learning_rate: float = LEARNING_RATE):
        self.classifier = linear_model.LogisticRegression(optimizer=optim.AdaGrad(learning_rate), l2=0.0)
        self.min_labels_per_class = min_labels_per_class
        self.positives = self.negatives = 0

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if not isinstance(self.classifier.optimizer, optim.AdaGrad):  # a checkpoint of text-logreg/1 (Adam)
            self.classifier.optimizer = optim.AdaGrad(LEARNING_RATE)

    @property
    def ready(self) -> bool:
        return min(self.positives, self.negatives) >= self.min_labels_per_class

    def predict_proba_one(self, inputs: Mapping[str, float]) -> float:
        return float(self.classifier.predict_proba_one(dict(inputs)).get(True, 0.0))

    def learn_one(self, inputs: Mapping[str, float], is_abuse: bool) -> None:
        if is_abuse:
            self.positives += 1
        else:
            self.negatives += 1
        self.classifier.learn_one(dict(inputs), is_abuse)
