"""Cheap text signals for content events (posts, comments, messages).

>>> url_count("buy now http://x.io and https://y.io/z")
2
>>> signature("WIN a FREE phone!!! code 12345") == signature("win a free phone code 98")
True
"""

from __future__ import annotations

import hashlib
import re

_URL = re.compile(r"https?://|www\.", re.IGNORECASE)
_NOT_LETTERS = re.compile(r"[^a-z]+")


def url_count(text: str) -> int:
    return len(_URL.findall(text))


def signature(text: str) -> str:
    """A short hash of the text with case, digits, punctuation and spacing removed.

    Spam campaigns vary numbers, punctuation and spacing between copies; those
    copies share a signature, so counting equal signatures counts near-duplicates.
    """
    normalized = _NOT_LETTERS.sub(" ", text.lower()).strip()
    return hashlib.blake2b(normalized.encode(), digest_size=6).hexdigest()
