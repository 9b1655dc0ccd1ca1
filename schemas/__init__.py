"""Versioned data contracts (JSON Schema draft 2020-12).

Files live in ``schemas/v<N>/<name>.json``; each has ``$id``
``urn:abuse-detector:schemas:v<N>:<name>`` so contracts can reference each
other. Input events: ``envelope`` plus one schema per event type. Outputs:
``risk_score``, ``alert``, ``dead_letter``; input ``label``.

>>> check("label", {"event_id": "e1", "label": "abuse", "source": "moderator",
...                 "ts": 1, "schema_version": 1})
>>> check("label", {"event_id": "e1", "label": "maybe", "source": "moderator",
...                 "ts": 1, "schema_version": 1})
Traceback (most recent call last):
...
schemas.ContractViolation: invalid_field: label: 'maybe' is not one of ['abuse', 'benign']
"""

from __future__ import annotations

import json
import logging
import re
from functools import cache
from importlib import resources
from typing import Any, Callable

import copy

import fastjsonschema
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource

CURRENT_VERSION = 1
log = logging.getLogger(__name__)
EVENT_TYPES = ("signup", "login", "post", "comment", "message", "follow", "like", "report", "payment")
CONTENT_TYPES = ("post", "comment", "message")
OUTPUT_CONTRACTS = ("risk_score", "alert", "dead_letter")


class ContractViolation(ValueError):
    """A record broke its contract. ``reason`` is a dead-letter reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def urn(name: str, version: int = CURRENT_VERSION) -> str:
    return f"urn:abuse-detector:schemas:v{version}:{name}"


@cache
def load(name: str, version: int = CURRENT_VERSION) -> dict[str, Any]:
    """The schema document ``name`` of contract version ``version``."""
    path = resources.files("schemas").joinpath(f"v{version}/{name}.json")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyError(f"no contract {name!r} in version {version}") from None


@cache
def _registry(version: int) -> Registry:
    folder = resources.files("schemas").joinpath(f"v{version}")
    docs = [json.loads(p.read_text()) for p in folder.iterdir() if p.name.endswith(".json")]
    return Registry().with_resources((d["$id"], Resource.from_contents(d)) for d in docs)


@cache
def pattern_regex(pattern: str) -> re.Pattern:
    """A contract's ``pattern`` as Python compiles it, with ``$`` as ECMA-262 (which JSON Schema
    names) reads it: the end of the string only, where Python's ``$`` also matches before a last
    newline ("USD\\n" would pass ``^[A-Z]{3}$``). Other escapes keep Python's meaning.

    >>> bool(pattern_regex("^[A-Z]{3}$").search("USD\\n")), bool(pattern_regex("^[$]+$").search("$$"))
    (False, True)
    """
    out, escaped, in_class = [], False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "$" and not in_class:
            out.append(r"\Z")
            continue
        out.append(char)
    return re.compile("".join(out))


def _ecma_pattern(checker: Any, pattern: str, instance: Any, schema: Any) -> Any:
    if checker.is_type(instance, "string") and not pattern_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# The reference: draft 2020-12 as python-jsonschema implements it, ``pattern`` read as above.
Reference = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})


@cache
def validator(name: str, version: int = CURRENT_VERSION) -> Draft202012Validator:
    """The reference validator of contract ``name``: the final word on a record, and what explains a rejection."""
    schema = load(name, version)
    Reference.check_schema(schema)
    return Reference(schema, registry=_registry(version))


def bundled(name: str, version: int = CURRENT_VERSION) -> dict[str, Any]:
    """The schema with every ``urn:`` reference inlined: one self-contained document."""

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("urn:abuse-detector:schemas:"):
                target = {k: v for k, v in copy.deepcopy(load(ref.rsplit(":", 1)[1], version)).items()
                          if k not in ("$id", "$schema")}
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline({"allOf": [target, rest]} if rest else target)
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    doc = inline(copy.deepcopy(load(name, version)))
    doc.pop("$schema", None)
    doc.pop("$id", None)
    return doc


@cache
def _fast(name: str, version: int = CURRENT_VERSION) -> Any:
    # Code-generated validator (~3 µs per event instead of ~60 µs); the contracts
    # only use keywords whose meaning is the same in draft 7 and 2020-12.
    return fastjsonschema.compile(bundled(name, version), use_formats=False)


@cache
def fast_acceptor(name: str, version: int = CURRENT_VERSION) -> Callable[[Any], bool]:
    """Whether a record honours contract ``name``, by fastjsonschema's generated validator
    (the input events' hot path uses ``detectors.contracts``' check trees instead)."""
    validate = _fast(name, version)

    def accepts(record: Any) -> bool:
        try:
            validate(record)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return accepts


def _path(error: Any) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(record)"


def check(name: str, record: Any, version: int = CURRENT_VERSION,
          accepts: Callable[[Any], bool] | None = None) -> None:
    """Raises :class:`ContractViolation` naming the first problem, or returns None.

    ``accepts`` answers yes or no fast (default: fastjsonschema's ``fast_acceptor``; the input
    events' hot path gives ``detectors.contracts``' check tree). A record it rejects is explained
    by the reference validator, the final word: one the reference accepts is accepted, with a
    warning, as the two disagree.
    """
    if not (accepts or fast_acceptor(name, version))(record):
        explain(name, record, version)
        log.warning("the %s contract's fast check rejected a record its reference validator accepts "
                    "(accepted; please report it): %.300r", name, record)


def explain(name: str, record: Any, version: int = CURRENT_VERSION) -> None:
    """Raises :class:`ContractViolation` naming the first problem the reference validator finds in
    ``record``; returns None if it finds none (the reference is the contract's final word)."""
    error = next(iter(sorted(validator(name, version).iter_errors(record), key=_error_rank)), None)
    if error is None:
        return
    if error.context:  # anyOf/oneOf: name the branch that came closest, not the whole record
        error = best_match(error.context)
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    if error.validator == "required":
        raise ContractViolation("missing_field", f"{_path(error)}: {message}")
    raise ContractViolation("invalid_field", f"{_path(error)}: {message}")


def _error_rank(error: Any) -> tuple[int, str]:
    # Report a missing field before the type errors it may cause elsewhere.
    return (0 if error.validator == "required" else 1, _path(error))
