"""Declarative rules and the alert policy, from one TOML file, validated on load.

A rule is a conjunction of threshold conditions on catalogue features; no
code is ever executed from the file. The ``[policy]`` table sets alert
thresholds per event type and the cooldown per account.

    version = "2026-11-25.1"

    [policy]
    threshold = 0.8                 # default alert threshold on the fused score
    cooldown_minutes = 30           # one alert per account per cooldown (event time)
    [policy.thresholds]             # per event type
    payment = 0.7

    [[rule]]
    name = "device_signup_burst"
    description = "more than 20 signups from one device in 10 minutes"
    event_types = ["signup"]        # optional; default all types
    severity = "high"               # low | medium | high | critical
    when = [{ feature = "device_signups_10m", op = ">", value = 20 }]

>>> rules = parse_rules('''
... version = "t1"
... [[rule]]
... name = "stuffing"
... description = "many failed logins from one IP"
... severity = "high"
... when = [{feature = "ip_login_failures_10m", op = ">=", value = 10}]
... ''')
>>> [r.name for r in rules.matches({"ip_login_failures_10m": 12.0}, "login")]
['stuffing']
>>> parse_rules('[[rule]]\\nname = "x"\\nseverity = "huge"\\nwhen = [{feature = "nope", op = "~", value = 1}]')
Traceback (most recent call last):
...
detectors.rules.RulesError: rules file is invalid:
  rule 'x': severity 'huge' is not one of low, medium, high, critical
  rule 'x': unknown feature 'nope' (see `abuse-detector features`)
  rule 'x': operator '~' is not one of !=, <, <=, ==, >, >=
"""

from __future__ import annotations

import hashlib
import operator
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import cython

from detectors.catalog import ALL_TYPES, FEATURE_NAMES

SEVERITY_SCORE = {"low": 0.5, "medium": 0.7, "high": 0.85, "critical": 0.95}
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
# OPERATORS as the ints _matching switches on (the same comparisons, of the same objects)
_OPERATOR_CODES = {">": 0, ">=": 1, "<": 2, "<=": 3, "==": 4, "!=": 5}
assert _OPERATOR_CODES.keys() == OPERATORS.keys(), "give each operator a code in _matching"
KNOWN_FEATURES = frozenset(FEATURE_NAMES)


class RulesError(ValueError):
    pass


@dataclass(frozen=True)
class Condition:
    feature: str
    op: str
    value: float

    def holds(self, features: dict[str, float]) -> bool:
        return OPERATORS[self.op](features.get(self.feature, 0.0), self.value)

    def describe(self, features: dict[str, float]) -> str:
        return f"{self.feature} = {features.get(self.feature, 0.0):g} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    severity: str
    conditions: tuple[Condition, ...]
    event_types: frozenset[str] = ALL_TYPES

    @property
    def score(self) -> float:
        return SEVERITY_SCORE[self.severity]

    def matches(self, features: dict[str, float], event_type: str) -> bool:
        return event_type in self.event_types and all(c.holds(features) for c in self.conditions)


@dataclass(frozen=True)
class Policy:
    threshold: float = 0.8
    thresholds: dict[str, float] = field(default_factory=dict)
    cooldown_ms: int = 30 * 60_000

    def threshold_for(self, event_type: str) -> float:
        return self.thresholds.get(event_type, self.threshold)


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    policy: Policy
    version: str

    def __post_init__(self) -> None:
        # Per event type, its rules' conditions as (feature, operator code, value): matching an
        # event is then a loop of comparisons, not a method call per rule and per condition.
        checks = {kind: tuple((rule, tuple((c.feature, _OPERATOR_CODES[c.op], c.value) for c in rule.conditions))
                              for rule in self.rules if kind in rule.event_types)
                  for kind in ALL_TYPES}
        object.__setattr__(self, "_checks", checks)

    def matches(self, features: dict[str, float], event_type: str) -> list[Rule]:
        """The rules whose conditions all hold for an event of ``event_type`` (``Rule.matches``)."""
        checks = self._checks.get(event_type)  # type: ignore[attr-defined]
        if checks is None:  # a type outside the catalogue: no rule names it
            return [r for r in self.rules if r.matches(features, event_type)]
        return _matching(checks, features)


@cython.locals(code=cython.int, holds=cython.bint, matched=list, conditions=tuple)
def _matching(checks: tuple, features: dict) -> list:
    """The rules of ``checks`` (see ``RuleSet.__post_init__``) whose conditions all hold."""
    matched = []
    for rule, conditions in checks:
        holds = True
        for feature, code, value in conditions:
            actual = features.get(feature, 0.0)
            if code == 0:
                holds = actual > value
            elif code == 1:
                holds = actual >= value
            elif code == 2:
                holds = actual < value
            elif code == 3:
                holds = actual <= value
            elif code == 4:
                holds = actual == value
            else:
                holds = actual != value
            if not holds:
                break
        if holds:
            matched.append(rule)
    return matched


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_rules(text: str, source: str = "rules file") -> RuleSet:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source} is not valid TOML: {exc}") from None
    problems: list[str] = []
    rules: list[Rule] = []
    seen: set[str] = set()
    unknown_top = set(doc) - {"version", "policy", "rule"}
    if unknown_top:
        problems.append(f"unknown top-level keys {sorted(unknown_top)}")
    for i, raw in enumerate(doc.get("rule", [])):
        name = raw.get("name") or f"#{i + 1}"
        where = f"rule {name!r}"
        if not raw.get("name"):
            problems.append(f"{where}: needs a name")
        elif name in seen:
            problems.append(f"{where}: the name is used twice")
        seen.add(name)
        unknown = set(raw) - {"name", "description", "severity", "when", "event_types"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        severity = raw.get("severity", "medium")
        if severity not in SEVERITY_SCORE:
            problems.append(f"{where}: severity {severity!r} is not one of {', '.join(SEVERITY_SCORE)}")
        types = raw.get("event_types", sorted(ALL_TYPES))
        bad_types = [t for t in types if t not in ALL_TYPES]
        if bad_types:
            problems.append(f"{where}: unknown event types {bad_types}")
        conditions = []
        when = raw.get("when")
        if not isinstance(when, list) or not when:
            problems.append(f"{where}: needs at least one condition in `when`")
            when = []
        for c in when:
            feature, op, value = c.get("feature"), c.get("op"), c.get("value")
            if feature not in KNOWN_FEATURES:
                problems.append(f"{where}: unknown feature {feature!r} (see `abuse-detector features`)")
            if op not in OPERATORS:
                problems.append(f"{where}: operator {op!r} is not one of {', '.join(sorted(OPERATORS))}")
            if not _number(value):
                problems.append(f"{where}: value {value!r} must be a number")
            if feature in KNOWN_FEATURES and op in OPERATORS and _number(value):
                conditions.append(Condition(feature, op, float(value)))
        if not problems:
            rules.append(Rule(name, raw.get("description", name), severity, tuple(conditions), frozenset(types)))
    raw_policy = doc.get("policy", {})
    threshold = raw_policy.get("threshold", 0.8)
    thresholds = raw_policy.get("thresholds", {})
    cooldown = raw_policy.get("cooldown_minutes", 30)
    if not _number(threshold) or not 0 < threshold <= 1:
        problems.append(f"policy: threshold {threshold!r} must be in (0, 1]")
    for kind, value in thresholds.items():
        if kind not in ALL_TYPES or not _number(value) or not 0 < value <= 1:
            problems.append(f"policy: threshold for {kind!r} must be an event type with a value in (0, 1]")
    if not _number(cooldown) or cooldown < 0:
        problems.append(f"policy: cooldown_minutes {cooldown!r} must be a number >= 0")
    if problems:
        raise RulesError(f"{source} is invalid:\n  " + "\n  ".join(problems))
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    version = f"{doc.get('version', 'unversioned')}#{digest}"
    policy = Policy(float(threshold), {k: float(v) for k, v in thresholds.items()}, int(cooldown * 60_000))
    return RuleSet(tuple(rules), policy, version)


def load_rules(path: Path | None) -> RuleSet:
    """The rules at ``path``, or the rules shipped with the package."""
    if path is None:
        text = resources.files("detectors").joinpath("default_rules.toml").read_text()
        return parse_rules(text, "the default rules")
    return parse_rules(Path(path).read_text(), str(path))


class RulesWatcher:
    """Reloads a rules file when it changes; a broken edit keeps the last good rules."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.rules = load_rules(self.path)
        self.error: str | None = None
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def poll(self) -> bool:
        """True if new rules were loaded."""
        stamp = self._current_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.rules = load_rules(self.path)
        except (RulesError, OSError) as exc:
            self.error = str(exc)
            return False
        self.error = None
        return True
