"""How a config is declared and checked; each params section's config is in its own module of `llm/configs/`.

`llm` never reads params.yaml: `stages` loads it and hands each section to `from_mapping`. A config is a frozen
dataclass whose fields declare what they accept: the type (a `Literal` for a choice), and bounds beside the default
(`lr: float = param(1e-3, gt=0)`). Every config checks itself when it is constructed (Validated): each field against
its declaration, in one function (`_coerce`), then the class's `validate` for the rules that tie fields together.
So a config object that exists is a valid one, and an error names the dotted key (`train.lr`): the section that
`from_mapping` was given, or the class's own when it is built directly.
"""

import dataclasses
import functools
import importlib.util
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from llm.errors import ConfigError

EOT = "<|endoftext|>"
# The largest vocabulary a tokenizer may be trained to. Shards store ids as uint32 (2**32), but `tokenizers`' BPE
# trainer allocates for the requested size up front (2**24 costs ~30 MB; 2**26 and up abort the process on an
# allocation failure in a few GB), and the largest vocabularies in use are ~2**18 (Gemma: 262,144).
MAX_VOCAB = 2**20
MAX_BLOCK_SIZE = 1 << 16  # positions (learned or rotary tables) are allocated up front
MAX_INT = 2**63 - 1  # every integer param fits an int64 (seeds reach numpy and torch generators)


class FieldError(ConfigError):
    """An invalid value of one field, named without its section (`lr`, `special_tokens[1]`): the config
    prefixes the section it belongs to."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What a field's value must satisfy beyond its type: an interval, or not being empty."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False  # a string with more than whitespace, a list with an item
    note: str = ""  # said after the bounds in an error: what a bound value means ("0 turns it off")

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, or None."""
        if self.nonempty and not (value.strip() if isinstance(value, str) else value):
            return "must not be empty"
        low_ok = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        high_ok = (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if low_ok and high_ok:
            return None
        note = f" ({self.note})" if self.note else ""
        if (self.ge, self.gt) != (None, None) and (self.le, self.lt) != (None, None):
            opening = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}"
            closing = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})"
            return f"must be in {opening}, {closing}{note}, got {value}"
        (symbol, bound) = next((symbol, bound) for symbol, bound in
                               ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if bound is not None)
        return f"must be {symbol} {_num(bound)}{note}, got {value}"


_SHOWN = reprlib.Repr()  # Python 3.11's Repr takes no arguments
(_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict, _SHOWN.maxset, _SHOWN.maxstring, _SHOWN.maxother) = (
    3, 4, 4, 4, 4, 60, 60)


def shown(value: Any, limit: int = 80, *, quote: bool = True) -> str:
    """`value` as an error message shows it: one line of at most `limit` characters, however long or deep it is
    (the repr of a YAML value whose aliases share one list a billion times would take minutes and all memory).
    `quote=False` shows a printable string as it is (a key, a section name), anything else as its repr."""
    if not quote and isinstance(value, str) and value.isprintable():
        text = value
    else:
        try:
            text = _SHOWN.repr(value)
        except ValueError:  # an int too long for repr (over 4,300 digits)
            text = f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def param(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, nonempty: bool = False, note: str = "") -> Any:
    """A config field with its default and the bounds its value must keep: `lr: float = param(1e-3, gt=0)`."""
    return dataclasses.field(default=default, metadata={"bounds": Bounds(ge, gt, le, lt, nonempty, note)})


@functools.cache
def _declared(cls: type) -> tuple[tuple[str, Any, Bounds], ...]:
    """(name, type, bounds) of each field of config class `cls`."""
    hints = typing.get_type_hints(cls)
    return tuple((field.name, hints[field.name], field.metadata.get("bounds", Bounds()))
                 for field in dataclasses.fields(cls))


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check one value against a field's type; ints are accepted for floats, lists become tuples, a Literal's
    value must be one of its choices."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(option for option in options if option is not type(None))
        origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise FieldError(key, f"must be one of {', '.join(map(str, typing.get_args(kind)))}, got {shown(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise FieldError(key, f"must be a list, got {type(value).__name__}")
        (item_kind, _) = typing.get_args(kind)
        return tuple(_coerce(f"{key}[{i}]", item, item_kind) for i, item in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise FieldError(key, f"must be {kind.__name__}, got {type(value).__name__} {shown(value)}")
    if kind is float and not math.isfinite(value):
        raise FieldError(key, f"must be a finite number, got {value}")
    if kind is int and not -MAX_INT <= value <= MAX_INT:
        raise FieldError(key, f"must be an integer within +-2**63, got {value}")
    return value


def _checked(name: str, value: Any, kind: Any, bounds: Bounds) -> Any:
    """`value` as field `name` (of type `kind`, within `bounds`) holds it, or FieldError."""
    value = _coerce(name, value, kind)
    problem = None if value is None else bounds.problem(value)
    if problem:
        raise FieldError(name, problem)
    return value


def check_field(cls: type, name: str, value: Any, key: str) -> None:
    """Check `value` as config `cls` checks its field `name`, for a value that comes from elsewhere (a command-line
    flag): an error names `key`."""
    (kind, bounds) = next((kind, bounds) for field, kind, bounds in _declared(cls) if field == name)
    try:
        _checked(name, value, kind, bounds)
    except FieldError as err:
        raise ConfigError(key, err.problem) from None


class Validated:
    """Checks a config at construction. Each config dataclass declares `section: InitVar[str] = "<its params
    section>"`, the prefix of its error keys; from_mapping passes the section it read instead.

    The order: every field against its declaration (type, choices, bounds; ints become floats, lists tuples),
    then `resolve` (fields derived from others), then `validate` (rules that tie fields together). Both raise
    FieldError with the bare field name."""

    def __post_init__(self, section: str) -> None:
        try:
            for name, kind, bounds in _declared(type(self)):
                object.__setattr__(self, name, _checked(name, getattr(self, name), kind, bounds))
            self.resolve()
            self.validate()
        except FieldError as err:
            raise ConfigError(f"{section}.{err.key}", err.problem) from None

    def resolve(self) -> None:
        """Fill the fields that default to others' values; runs after the fields are checked."""

    def validate(self) -> None:
        """Cross-field rules; a violation raises FieldError naming one of the fields."""


Engine = Literal["local", "ray"]  # where clean and tokenize run their per-batch work (llm/engine.py)


def check_engine(engine: str, field: str = "engine") -> None:
    """An `engine` param: `ray` needs its package, an optional dependency."""
    if engine == "ray" and importlib.util.find_spec("ray") is None:
        raise FieldError(field, "the ray engine needs the ray package: pip install -e '.[ray]'")


T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any], section: str, *, require_all: bool = True) -> T:
    """Build config `cls` from `values`, section `section` of its file; unknown keys, missing keys, wrong types
    and invalid values are errors naming `section.key`."""
    if not isinstance(values, Mapping):
        raise ConfigError(section, f"must be a mapping of keys, got {type(values).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{section}.{shown(unknown[0], quote=False)}", f"unknown key (known: {', '.join(fields)})")
    # A key whose default is None (null: "from the preset", "off") may be left out.
    missing = [name for name, field in fields.items() if name not in values and field.default is not None]
    if require_all and missing:
        raise ConfigError(f"{section}.{missing[0]}", "missing key")
    return cls(**values, section=section)
