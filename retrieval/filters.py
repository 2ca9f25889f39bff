"""A small, typed payload filter that both adapters translate to Qdrant's own.

Build one from objects::

    Filter(must=[Match("split", "train"), MatchAny("pseudo_status", ["accepted", "review"])],
           must_not=[IsEmpty("label")])

or from a plain dict (what the CLI and the RPC layer take), where every entry
must hold::

    {"split": "train",                         # Match
     "pseudo_status": ["accepted", "review"],  # MatchAny
     "confidence": {"gte": 0.8},               # Range
     "label": None}                            # IsEmpty (missing, null or [])

A dict whose only keys are ``must`` / ``should`` / ``must_not`` is the
structured form, each value a flat dict as above (so a payload field cannot be
called ``must``, ``should`` or ``must_not`` in the dict form).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from retrieval.errors import InvalidFilterError
from retrieval.schema import INT64_MAX, INT64_MIN, ExternalId, _bad_unicode

Scalar = str | int | bool


# Qdrant's payload key path: dot-separated names (letters of any script with their combining marks, digits, "_",
# "-"), or double-quoted names ('"product name"'), each optionally followed by [] or [N]. Both adapters refuse
# what Qdrant's own parser refuses, with the same error: Qdrant Edge raised a bare ValueError (INTERNAL over gRPC,
# a traceback per call), and local mode accepted anything. The parser is Qdrant's (qdrant-edge, a dependency of
# this package): a regex of ours refused Hindi and Arabic keys the engine takes, and passed "tags[٣]".
QUOTE_HINT = (
    "dot-separated names of letters, digits, '_' or '-', each optionally followed by [] or [N]; quote a name "
    "with other characters ('\"product name\"')"
)


@functools.lru_cache(maxsize=4096)
def is_key_path(key: str) -> bool:
    """Whether ``key`` is a payload path Qdrant can parse."""
    import qdrant_edge as qe

    try:
        qe.FieldCondition(key=key, match=qe.MatchValue(""))
    except ValueError:
        return False
    return True


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidFilterError(f"filter key must be a non-empty string, got {key!r}")
    bad = _bad_unicode(key)
    if bad is not None:
        raise InvalidFilterError(f"filter key {key!r} is not valid Unicode (a lone surrogate at position {bad})")
    if not is_key_path(key):
        raise InvalidFilterError(f"filter key {key!r} is not a payload path: {QUOTE_HINT}")
    return key


def _check_scalar(key: str, value: Any) -> None:
    """A match value the engines can take: a string they can encode, an int within int64. Edge raised a bare
    TypeError / UnicodeEncodeError outside the store's errors; qdrant-client matched nothing, silently."""
    if isinstance(value, str):
        bad = _bad_unicode(value)
        if bad is not None:
            raise InvalidFilterError(
                f"filter on {key!r}: value {value!r} is not valid Unicode (a lone surrogate at position {bad})"
            )
    elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidFilterError(f"filter on {key!r}: {value} is outside the 64-bit integers a payload can hold")


@dataclass(frozen=True)
class Match:
    """Payload ``key`` equals ``value`` (a string, int or bool; use Range for floats)."""

    key: str
    value: Scalar

    def __post_init__(self) -> None:
        _check_key(self.key)
        if not isinstance(self.value, (str, int, bool)):
            raise InvalidFilterError(
                f"filter on {self.key!r}: match value must be a string, int or bool, got "
                f"{type(self.value).__name__} {self.value!r} (use a range for floats)"
            )
        _check_scalar(self.key, self.value)


@dataclass(frozen=True)
class MatchAny:
    """Payload ``key`` equals one of ``values`` (all strings or all ints)."""

    key: str
    values: tuple[Scalar, ...]

    def __init__(self, key: str, values: Iterable[Scalar]) -> None:
        object.__setattr__(self, "key", _check_key(key))
        vals = tuple(values)
        if not vals:
            raise InvalidFilterError(f"filter on {key!r}: match-any needs at least one value")
        if not (
            all(isinstance(v, str) for v in vals) or all(isinstance(v, int) and not isinstance(v, bool) for v in vals)
        ):
            raise InvalidFilterError(
                f"filter on {key!r}: match-any values must be all strings or all ints, got {vals!r}"
            )
        for v in vals:
            _check_scalar(key, v)
        object.__setattr__(self, "values", vals)


#: The largest integer a range bound may be: a 64-bit float (what Qdrant compares ranges in) holds every integer
#: up to 2**53 exactly, and a stored integer past 2**53 rounds to a double of 2**53 or more; so a bound below
#: 2**53 still orders every stored value right (measured on Edge: with 2**53 + 1 stored, gt 2**53 counted 0).
MAX_EXACT_RANGE_INT = 2**53 - 1


@dataclass(frozen=True)
class Range:
    """Numeric payload ``key`` within the given bounds (any subset of gt/gte/lt/lte)."""

    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    def __post_init__(self) -> None:
        _check_key(self.key)
        bounds = {"gt": self.gt, "gte": self.gte, "lt": self.lt, "lte": self.lte}
        given = {k: v for k, v in bounds.items() if v is not None}
        if not given:
            raise InvalidFilterError(f"filter on {self.key!r}: a range needs at least one of gt, gte, lt, lte")
        for k, v in given.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidFilterError(f"filter on {self.key!r}: range bound {k} must be a finite number, got {v!r}")
            if isinstance(v, int) and abs(v) > MAX_EXACT_RANGE_INT:
                # measured on Edge and qdrant-client alike: with 2**60 + 1 and 2**60 + 3 stored, gte 2**60 + 2 and
                # gte 2**60 + 4 both counted both (and 10**400 raised a bare OverflowError here)
                raise InvalidFilterError(
                    f"filter on {self.key!r}: range bound {k}={v} is 2**53 or more in size; Qdrant compares ranges as "
                    "64-bit floats, which hold integers exactly only up to 2**53, so such bounds (and stored values) "
                    "round and the answer would be wrong without a word. Store the field in a coarser unit (ns -> "
                    "ms), or match it exactly instead"
                )
            if not math.isfinite(v):
                raise InvalidFilterError(f"filter on {self.key!r}: range bound {k} must be a finite number, got {v!r}")


@dataclass(frozen=True)
class IsEmpty:
    """Payload ``key`` is missing, null or an empty list."""

    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclass(frozen=True)
class HasId:
    """The point is one of these external ids."""

    ids: tuple[ExternalId, ...]

    def __init__(self, ids: Iterable[ExternalId]) -> None:
        vals = tuple(ids)
        if not vals:
            raise InvalidFilterError("has-id filter needs at least one id")
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise InvalidFilterError(f"has-id filter: ids must be strings or ints, got {v!r}")
        object.__setattr__(self, "ids", vals)


Condition = Union[Match, MatchAny, Range, IsEmpty, HasId, "Filter"]
_CONDITION_TYPES = (Match, MatchAny, Range, IsEmpty, HasId)


@dataclass(frozen=True)
class Filter:
    """All of ``must``, at least one of ``should`` (if any), none of ``must_not``."""

    must: tuple[Condition, ...] = field(default_factory=tuple)
    should: tuple[Condition, ...] = field(default_factory=tuple)
    must_not: tuple[Condition, ...] = field(default_factory=tuple)

    def __init__(
        self,
        must: Iterable[Condition] = (),
        should: Iterable[Condition] = (),
        must_not: Iterable[Condition] = (),
    ) -> None:
        for name, conds in (("must", must), ("should", should), ("must_not", must_not)):
            conds = tuple(conds)
            for c in conds:
                if not isinstance(c, (*_CONDITION_TYPES, Filter)):
                    raise InvalidFilterError(f"filter {name}: not a condition: {c!r}")
            object.__setattr__(self, name, conds)

    def is_empty(self) -> bool:
        return not (self.must or self.should or self.must_not)


FilterLike = Filter | Mapping[str, Any] | None
_STRUCTURED = {"must", "should", "must_not"}


def as_filter(spec: FilterLike) -> Filter | None:
    """Turn a Filter, a dict (see module doc) or None into a Filter (None when empty)."""
    if spec is None:
        return None
    if isinstance(spec, Filter):
        return None if spec.is_empty() else spec
    if not isinstance(spec, Mapping):
        raise InvalidFilterError(f"a filter must be a Filter, a dict or None, got {type(spec).__name__}")
    if set(spec) & _STRUCTURED and not set(spec) <= _STRUCTURED:
        fields = sorted(str(k) for k in set(spec) - _STRUCTURED)
        raise InvalidFilterError(
            f"a filter dict mixes must/should/must_not with field names {fields}: put the fields inside 'must' "
            "(or use only field names)"
        )
    if spec and set(spec) <= _STRUCTURED:
        parts = {}
        for name, flat in spec.items():
            if not isinstance(flat, Mapping):
                raise InvalidFilterError(f"filter {name!r} must be a dict of field conditions, got {flat!r}")
            parts[name] = _flat_conditions(flat)
        result = Filter(**parts)
    else:
        result = Filter(must=_flat_conditions(spec))
    return None if result.is_empty() else result


def _flat_conditions(flat: Mapping[str, Any]) -> list[Condition]:
    conds: list[Condition] = []
    for key, value in flat.items():
        _check_key(key)
        if value is None:
            conds.append(IsEmpty(key))
        elif isinstance(value, Mapping):
            unknown = set(value) - {"gt", "gte", "lt", "lte"}
            if unknown == set(value):  # no bound at all: a nested match, written as a nested dict
                first = sorted(unknown, key=str)[0]
                raise InvalidFilterError(
                    f"filter on {key!r}: a dict value is a range (gt, gte, lt, lte); to match a field inside "
                    f"{key!r}, use a dotted key, e.g. {{{f'{key}.{first}'!r}: {value[first]!r}}}"
                )
            if unknown:
                raise InvalidFilterError(
                    f"filter on {key!r}: unknown range bound(s) {sorted(unknown)}; use gt, gte, lt, lte"
                )
            conds.append(Range(key, **value))
        elif isinstance(value, (list, tuple, set, frozenset)):
            conds.append(MatchAny(key, value))
        else:
            conds.append(Match(key, value))
    return conds
