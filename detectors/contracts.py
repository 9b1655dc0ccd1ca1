"""The contracts' JSON Schemas as check trees: whether a decoded record honours its contract, fast.

Every input event is checked against its contract (``schemas/``). A schema is compiled once into
a tree of ``Check`` nodes, one per schema object, each holding the keywords it uses as C fields;
``accepts`` walks the tree. Compiled with Cython, an event takes ~0.8 µs where the code
fastjsonschema generates takes ~2.9 µs (docs/performance.md, round 39). It only answers yes or no:
a rejected record is explained by the reference validator (``schemas.check``), which is also
the final word.

The tree knows the keywords the contracts use, with the reference's meaning (draft 2020-12):
``type``, ``enum``, ``const``, ``minLength``/``maxLength`` (code points), ``minimum``/``maximum``,
``pattern`` (``schemas.pattern_regex``), ``required``, ``properties``, ``allOf``, ``anyOf`` and boolean schemas;
annotations are ignored. A schema using any other keyword is refused (``UnsupportedSchema``) and
its contract is checked by fastjsonschema instead, so a new keyword can never be skipped.

>>> check = compile_schema({"type": "object", "required": ["ts"],
...                         "properties": {"ts": {"type": "integer", "minimum": 0}}})
>>> check.accepts({"ts": 5}), check.accepts({"ts": 5.0}), check.accepts({"ts": True}), check.accepts({})
(True, True, False, False)
>>> compile_schema({"type": "string", "format": "email", "contentMediaType": "text/plain"})
Traceback (most recent call last):
...
detectors.contracts.UnsupportedSchema: keyword 'contentMediaType' is not compiled (at the root)
"""

from __future__ import annotations

from functools import cache
from typing import Any, Callable

import cython

import schemas

# type bits: what a JSON value is, in the reference's terms (an integral float is an integer too)
_NULL = cython.declare(cython.int, 1)
_BOOLEAN = cython.declare(cython.int, 2)
_INTEGER = cython.declare(cython.int, 4)
_NUMBER = cython.declare(cython.int, 8)
_STRING = cython.declare(cython.int, 16)
_ARRAY = cython.declare(cython.int, 32)
_OBJECT = cython.declare(cython.int, 64)
_TYPE_BITS = {"null": _NULL, "boolean": _BOOLEAN, "integer": _INTEGER, "number": _NUMBER, "string": _STRING,
              "array": _ARRAY, "object": _OBJECT}

# keywords that never reject (draft 2020-12 annotations; ``format`` asserts nothing in the reference)
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "default", "examples",
                          "deprecated", "readOnly", "writeOnly", "format"})
_COMPILED_KEYWORDS = frozenset({"type", "enum", "const", "minLength", "maxLength", "minimum", "maximum",
                                "pattern", "required", "properties", "allOf", "anyOf"})


class UnsupportedSchema(ValueError):
    """A schema uses a keyword (or a value of one) that ``compile_schema`` does not compile."""


@cython.cfunc
@cython.inline
def _type_of(value: object) -> cython.int:
    if isinstance(value, str):
        return _STRING
    if isinstance(value, bool):  # before int: a bool is an int in Python, not in JSON
        return _BOOLEAN
    if isinstance(value, int):
        return _INTEGER | _NUMBER
    if isinstance(value, float):
        return _INTEGER | _NUMBER if value.is_integer() else _NUMBER
    if value is None:
        return _NULL
    if isinstance(value, dict):
        return _OBJECT
    if isinstance(value, list):
        return _ARRAY
    return 0


@cython.cfunc
def _json_equal(a: object, b: object) -> cython.bint:
    """Equality as the reference has it for scalars: a bool equals only a bool, 1 equals 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


@cython.cclass
class Check:
    """One schema object, compiled: the keywords it uses as fields, its subschemas as nodes."""
    never = cython.declare(cython.bint)  # the schema ``false``
    types = cython.declare(cython.int)  # type bits allowed; 0 when the schema has no ``type``
    min_length = cython.declare(cython.Py_ssize_t)  # -1: no bound
    max_length = cython.declare(cython.Py_ssize_t)
    minimum = cython.declare(object)  # None: no bound
    maximum = cython.declare(object)
    pattern = cython.declare(object)  # a compiled re.Pattern, or None
    equals_any = cython.declare(tuple)  # one tuple of allowed values per ``const`` or ``enum``
    required = cython.declare(tuple)  # of str
    properties = cython.declare(tuple)  # of (name, Check)
    all_of = cython.declare(tuple)  # of Check
    any_of = cython.declare(tuple)  # of Check

    def __init__(self) -> None:
        self.never, self.types, self.min_length, self.max_length = False, 0, -1, -1
        self.minimum = self.maximum = self.pattern = None
        self.equals_any = self.required = self.properties = self.all_of = self.any_of = ()

    @cython.ccall
    @cython.locals(kind=cython.int, n=cython.Py_ssize_t, child="Check", allowed=tuple, found=cython.bint)
    def accepts(self, value: object) -> cython.bint:
        """Whether ``value`` (decoded JSON) honours this schema."""
        if self.never:
            return False
        kind = _type_of(value)
        if self.types and not (self.types & kind):
            return False
        if kind == _STRING:
            if self.min_length >= 0 or self.max_length >= 0:
                n = len(value)
                if n < self.min_length or (self.max_length >= 0 and n > self.max_length):
                    return False
            if self.pattern is not None and self.pattern.search(value) is None:
                return False
        elif kind & _NUMBER:
            if self.minimum is not None and value < self.minimum:
                return False
            if self.maximum is not None and value > self.maximum:
                return False
        elif kind == _OBJECT:
            for name in self.required:
                if name not in value:
                    return False
            for name, child in self.properties:
                member = value.get(name, _ABSENT)
                if member is not _ABSENT and not child.accepts(member):
                    return False
        for allowed in self.equals_any:
            found = False
            for candidate in allowed:
                if _json_equal(value, candidate):
                    found = True
                    break
            if not found:
                return False
        for child in self.all_of:
            if not child.accepts(value):
                return False
        if self.any_of:
            for child in self.any_of:
                if child.accepts(value):
                    return True
            return False
        return True


_ABSENT = object()


def compile_schema(schema: Any, where: str = "the root") -> Check:
    """``schema`` (a self-contained document: see ``schemas.bundled``) as a check tree;
    ``UnsupportedSchema`` if it uses anything the tree does not compile."""
    check = Check()
    if schema is True or schema is False:
        check.never = schema is False
        return check
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"a schema must be an object or a boolean ({where})")
    unknown = sorted(k for k in schema if k not in _COMPILED_KEYWORDS and k not in _ANNOTATIONS)
    if unknown:
        raise UnsupportedSchema(f"keyword {unknown[0]!r} is not compiled (at {where})")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not names or any(name not in _TYPE_BITS for name in names):
            raise UnsupportedSchema(f"type {schema['type']!r} (at {where})")
        for name in names:
            check.types |= _TYPE_BITS[name]
    check.min_length, check.max_length = _length(schema, "minLength", where), _length(schema, "maxLength", where)
    check.minimum, check.maximum = _number(schema, "minimum", where), _number(schema, "maximum", where)
    if "pattern" in schema:
        check.pattern = schemas.pattern_regex(schema["pattern"])
    allowed = []
    if "const" in schema:
        allowed.append((_scalar(schema["const"], "const", where),))
    if "enum" in schema:
        if not isinstance(schema["enum"], list):
            raise UnsupportedSchema(f"enum {schema['enum']!r} (at {where})")
        allowed.append(tuple(_scalar(v, "enum", where) for v in schema["enum"]))
    check.equals_any = tuple(allowed)
    if "required" in schema:
        if not isinstance(schema["required"], list) or not all(isinstance(n, str) for n in schema["required"]):
            raise UnsupportedSchema(f"required {schema['required']!r} (at {where})")
        check.required = tuple(schema["required"])
    if "properties" in schema:
        if not isinstance(schema["properties"], dict):
            raise UnsupportedSchema(f"properties {schema['properties']!r} (at {where})")
        check.properties = tuple((name, compile_schema(sub, f"{where}.properties.{name}"))
                                 for name, sub in schema["properties"].items())
    check.all_of = _each(schema, "allOf", where)
    check.any_of = _each(schema, "anyOf", where)
    if "anyOf" in schema and not check.any_of:
        raise UnsupportedSchema(f"an empty anyOf (at {where})")
    return check


def _length(schema: dict, keyword: str, where: str) -> int:
    """A length bound, -1 if the schema has none."""
    if keyword not in schema:
        return -1
    bound = schema[keyword]
    if type(bound) is not int or bound < 0:
        raise UnsupportedSchema(f"{keyword} {bound!r} (at {where})")
    return bound


def _number(schema: dict, keyword: str, where: str) -> Any:
    """A numeric bound, None if the schema has none."""
    if keyword not in schema:
        return None
    bound = schema[keyword]
    if type(bound) not in (int, float):
        raise UnsupportedSchema(f"{keyword} {bound!r} (at {where})")
    return bound


def _scalar(value: Any, keyword: str, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise UnsupportedSchema(f"{keyword} value {value!r} is not a scalar (at {where})")


def _each(schema: dict, keyword: str, where: str) -> tuple:
    subs = schema.get(keyword, [])
    if not isinstance(subs, list):
        raise UnsupportedSchema(f"{keyword} {subs!r} (at {where})")
    return tuple(compile_schema(sub, f"{where}.{keyword}[{i}]") for i, sub in enumerate(subs))


@cache
def acceptor(name: str, version: int = schemas.CURRENT_VERSION) -> Callable[[Any], bool]:
    """Whether a record honours contract ``name``: its check tree's ``accepts``, or for a contract
    the tree cannot compile, fastjsonschema's validator (``schemas.fast_acceptor``)."""
    try:
        return compile_schema(schemas.bundled(name, version)).accepts
    except UnsupportedSchema:
        return schemas.fast_acceptor(name, version)
