"""Canonical key text for argument values: by type and value, the same in every process.

:func:`encode` writes a value as text that depends only on its type and value, never on
``id()``, ``hash()`` or insertion order, so every process and every ``PYTHONHASHSEED``
builds the same key, and two values share a text only if they are equal and of the same
type, component by component (``1``, ``1.0``, ``True`` and ``"1"`` are four texts):

- ``None``, ``True``, ``False``; ints in decimal (``-7``); floats by ``repr`` (``7.0``,
  ``inf``; ``-0.0`` is ``0.0``); strings quoted (``'a\\'b'``); bytes in hex (``x'00ff'``);
- ``(...)`` tuples, ``[...]`` lists, ``{k:v,...}`` dicts and ``set(...)``/``frozenset(...)``,
  items encoded in turn, dict entries and set items sorted by their text;
- ``name(...)`` for other types, ``name`` being the class's module and qualified name: an
  object whose class has ``__cache_key__(self)`` (the encoding of what it returns), enum
  members (by name), dataclasses (their fields), classes (by name), ``Decimal``
  (normalised: ``1.50`` is ``1.5``), ``Fraction``, ``complex``, ``UUID``, dates, times,
  ``timedelta``, paths, and subclasses of the builtins above that add no state;
- numpy's int, float and bool scalars are keyed as the Python value they equal.

Anything else (an object with the default ``repr``, a function, a file, a lock) raises
:class:`~cachekit.exceptions.KeyEncodingError` rather than produce a text that could
name two values. :func:`render` and :class:`Template` build template and view keys on
the same encoding, in an alphabet that no literal separator can be confused with.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import pathlib
import re
import string
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from cachekit.exceptions import ConfigurationError, KeyEncodingError

__all__ = ["Template", "canonical_decimal", "encode", "quote", "render"]

# Decimal digits of one chunk when an int is too long for str() (sys.set_int_max_str_digits
# may be as low as 640); the text is the same decimal either way.
_CHUNK = 500
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.<>@]*")
_TYPE_NAMES: dict[type, str] = {}
_TYPE_NAMES_KEPT = 1024


def quote(text: str) -> str:
    """A string's key text: single quotes, with ``\\`` and ``'`` escaped."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def encode(value: Any) -> str:
    """The canonical key text of ``value`` (see the module docstring).

    Raises:
        KeyEncodingError: the value, or something inside it, has no stable encoding.
    """
    kind = type(value)
    if kind is str:  # quote(), inlined: the common case
        text: str = value
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if kind is int:
        try:
            return str(value)
        except ValueError:  # longer than sys.get_int_max_str_digits()
            return _int(value)
    try:
        return _encode(value)
    except RecursionError:
        raise KeyEncodingError(
            f"a {kind.__name__} nested too deeply (or containing itself), which has no key text"
        ) from None


def _encode(value: Any) -> str:
    kind = type(value)
    exact = _EXACT.get(kind)
    if exact is not None:
        return exact(value)
    hook = getattr(kind, "__cache_key__", None)
    if hook is not None:
        inner = hook(value)
        if inner is value:
            raise KeyEncodingError(f"a {_type_name(kind)} whose __cache_key__ returns itself")
        return f"{_type_name(kind)}({_encode(inner)})"
    for base, encoder in _BY_BASE:
        if isinstance(value, base):
            return encoder(value)
    if dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        return _tagged(kind, [_encode(getattr(value, field.name)) for field in fields])
    return _subclass_or_numpy(value)


def _subclass_or_numpy(value: Any) -> str:
    kind = type(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.integer | numpy.floating | numpy.bool_):
        plain = value.item()
        if type(plain) in (int, float, bool):
            return _encode(plain)
    for base, plain in _SUBCLASSABLE.items():
        if isinstance(value, base) and _stateless(value, base):
            return _tagged(kind, [_EXACT[base](plain(value))])
    raise KeyEncodingError(f"a {_type_name(kind)}, which has no stable key encoding")


def _stateless(value: Any, base: type) -> bool:
    """Whether a builtin subclass instance holds nothing but its builtin value: every
    class above ``base`` is defined in Python, declares no slots, and the instance's
    ``__dict__`` is empty (a C subclass such as ``defaultdict`` keeps hidden state)."""
    for cls in type(value).__mro__:
        if cls is base:
            return not getattr(value, "__dict__", None)
        if not cls.__flags__ & (1 << 9) or cls.__dict__.get("__slots__", ()) not in ((), ""):
            return False  # 1 << 9 is Py_TPFLAGS_HEAPTYPE: a class statement made it
    return False


def _type_name(kind: type) -> str:
    name = _TYPE_NAMES.get(kind)
    if name is None:
        name = f"{kind.__module__}.{kind.__qualname__}"
        if "<locals>" in kind.__qualname__:  # a factory may make two under one name
            name += _defined_at(kind)
        if not _NAME.fullmatch(name):
            name = quote(name)
        if len(_TYPE_NAMES) < _TYPE_NAMES_KEPT:  # bounded: classes made at run time
            _TYPE_NAMES[kind] = name
    return name


def _defined_at(kind: type) -> str:
    """What tells a class made inside a function from its namesakes: the line of the
    first method of its own body or, without one, its bases and own attribute values.

    Raises:
        KeyEncodingError: it has an attribute with no stable encoding, and no method.
    """
    lines = []
    for member in vars(kind).values():
        function = member
        for _ in range(8):  # through classmethod/staticmethod and decorators' wrappers
            function = getattr(function, "__func__", None) or getattr(
                function, "__wrapped__", function
            )
        code = getattr(function, "__code__", None)
        # Generated code (a dataclass's __init__, from "<string>") tells nothing.
        if (
            code is not None
            and not code.co_filename.startswith("<")
            and function.__qualname__.startswith(kind.__qualname__ + ".")
        ):
            lines.append(int(code.co_firstlineno))
    if lines:
        return f"@{min(lines)}"
    bases = ",".join(_type_name(base) for base in kind.__bases__)
    own = sorted((k, v) for k, v in vars(kind).items() if not k.startswith("_"))
    try:
        # An enum's members are instances of the class being named: by name only.
        attributes = ",".join(k if isinstance(v, kind) else f"{k}={_encode(v)}" for k, v in own)
    except KeyEncodingError:
        raise KeyEncodingError(
            f"{kind.__qualname__} is defined inside a function, and neither a method nor its"
            " attributes tell it from another class of that name: define it at module"
            " level, or give it a __cache_key__ method"
        ) from None
    return f"<{bases};{attributes}>"


def _enum_member(value: enum.Enum) -> str:
    """A member by name; an unnamed flag combination (``Flag(0)``) by its value."""
    try:
        name = value.name
    except AttributeError:  # a pseudo-member of a Flag with boundary=KEEP
        name = None
    return quote(name) if isinstance(name, str) else _encode(value.value)


def _tagged(kind: type, items: list[str]) -> str:
    return f"{_type_name(kind)}({','.join(items)})"


def _int(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        sign, rest, chunks = "-" if value < 0 else "", abs(value), []
        while rest:
            rest, chunk = divmod(rest, 10**_CHUNK)
            chunks.append(chunk)
        tail = "".join(f"{chunk:0{_CHUNK}d}" for chunk in reversed(chunks[:-1]))
        return f"{sign}{chunks[-1]}{tail}"


def _float(value: float) -> str:
    return repr(value + 0.0)  # + 0.0 turns -0.0 into 0.0; NaNs all print as nan


def _dict(value: Mapping[Any, Any]) -> str:
    return "{" + ",".join(sorted(f"{_encode(k)}:{_encode(v)}" for k, v in value.items())) + "}"


def canonical_decimal(value: decimal.Decimal) -> decimal.Decimal:
    """The one spelling of a Decimal among those equal to it (``1.50``, ``15E-1``: ``1.5``;
    ``-0.00``: ``0``); built from the digits, not with ``normalize()``, which rounds to
    the context's precision."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN and infinities
        return value
    while len(digits) > 1 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    if digits == (0,):
        sign, exponent = 0, 0
    return decimal.Decimal((sign, digits, exponent))


def _datetime(value: datetime.datetime | datetime.time) -> str:
    zone = value.tzinfo
    if zone is None or type(zone) is datetime.timezone:
        return _tagged(type(value), [quote(value.isoformat())])
    key = getattr(zone, "key", None)  # zoneinfo.ZoneInfo: its IANA name
    if type(zone).__module__ == "zoneinfo" and isinstance(key, str):
        return _tagged(type(value), [quote(value.isoformat()), quote(key)])
    raise KeyEncodingError(
        f"a {type(value).__name__} with a {_type_name(type(zone))} tzinfo, which has no"
        " stable key encoding (use a ZoneInfo or a datetime.timezone)"
    )


_EXACT: dict[type, Callable[[Any], str]] = {
    int: _int,
    str: quote,
    type(None): lambda value: "None",
    bool: lambda value: "True" if value else "False",
    float: _float,
    bytes: lambda value: f"x'{value.hex()}'",
    bytearray: lambda value: f"bytearray(x'{value.hex()}')",
    tuple: lambda value: "(" + ",".join(map(_encode, value)) + ")",
    list: lambda value: "[" + ",".join(map(_encode, value)) + "]",
    dict: _dict,
    set: lambda value: "set(" + ",".join(sorted(map(_encode, value))) + ")",
    frozenset: lambda value: "frozenset(" + ",".join(sorted(map(_encode, value))) + ")",
    complex: lambda value: f"complex({_float(value.real)},{_float(value.imag)})",
    decimal.Decimal: lambda value: _tagged(decimal.Decimal, [quote(str(canonical_decimal(value)))]),
    fractions.Fraction: lambda value: _tagged(fractions.Fraction, [quote(str(value))]),
    uuid.UUID: lambda value: _tagged(uuid.UUID, [quote(value.hex)]),
    datetime.datetime: _datetime,
    datetime.time: _datetime,
    datetime.date: lambda value: _tagged(datetime.date, [quote(value.isoformat())]),
    datetime.timedelta: lambda value: _tagged(
        datetime.timedelta, [str(value.days), str(value.seconds), str(value.microseconds)]
    ),
}
# Checked in order, after the exact types and __cache_key__.
_BY_BASE: tuple[tuple[type, Callable[[Any], str]], ...] = (
    (enum.Enum, lambda value: _tagged(type(value), [_enum_member(value)])),
    (type, lambda value: f"type({quote(_type_name(value))})"),
    (pathlib.PurePath, lambda value: _tagged(type(value), [quote(str(value))])),
)
# Builtins whose stateless subclasses are keyed as their value, and how to take that value
# without calling a method the subclass may override (__str__, __repr__).
_SUBCLASSABLE: dict[type, Callable[[Any], Any]] = {
    int: int.__int__,
    float: float.__float__,
    str: str.__str__,
    bytes: bytes.__bytes__,
    tuple: tuple,
    list: list,
    dict: dict,
    set: set,
    frozenset: frozenset,
}


# -- templates and views --------------------------------------------------------------------

# What a rendered value may contain; a template separator needs one character outside it.
_RENDERED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_%~")
_PLAIN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_PLAIN_STR = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)?")


def _escape(text: str) -> str:
    """Percent-encode the UTF-8 of ``text``, all but ``[A-Za-z0-9_]``."""
    raw = text.encode("utf-8", "surrogatepass")
    return "".join(chr(byte) if byte in _PLAIN_BYTES else f"%{byte:02X}" for byte in raw)


def render(value: Any) -> str:
    """A value as it appears in a template or view key.

    A non-negative int is its digits (``7``); a string is percent-encoded, leaving
    ``[A-Za-z0-9_]`` as is except a leading digit (``"7"`` is ``%37``, ``"a:b"`` is
    ``a%3Ab``); anything else is ``~`` and its escaped :func:`encode` text (``7.0`` is
    ``~7%2E0``, ``True`` is ``~True``). Renderings differ for different values and
    contain only ``[A-Za-z0-9_%~]``.

    Raises:
        KeyEncodingError: as :func:`encode`.
    """
    kind = type(value)
    if kind is int and value >= 0:
        return _int(value)
    if kind is str:
        text: str = value
        if _PLAIN_STR.fullmatch(text):
            return text
        escaped = _escape(text)
        return f"%{ord(escaped[0]):02X}{escaped[1:]}" if escaped[0].isdigit() else escaped
    return "~" + _escape(encode(value))


class Template:
    """A key template over a function's parameters (``"member:{org}:{user}"``).

    Each placeholder names a parameter (``{user}``), or an attribute or item of one
    (``{user.id}``, ``{ids[0]}``), and is replaced by :func:`render` of its value. Since
    renderings use only ``[A-Za-z0-9_%~]``, a key names one argument tuple as long as
    the text between two placeholders has a character outside that set; templates where
    it does not (``"{a}{b}"``, ``"{a}_{b}"``) are refused, as are format specs and
    conversions (``{id:04d}``, ``{id!r}``), which would bypass the encoding.
    """

    def __init__(self, template: str, parameters: tuple[str, ...]) -> None:
        self.template = template
        self.parts: list[tuple[str, str | None]] = []  # (literal, field) pairs
        self.names: set[str] = set()  # the parameters it uses
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigurationError(f"key template {template!r}: {exc}") from None
        for number, (literal, field, spec, conversion) in enumerate(parsed):
            if field is not None:
                self._check_field(field, spec, conversion, parameters)
                if number and not set(literal) - _RENDERED:
                    raise ConfigurationError(
                        f"key template {template!r} is ambiguous: put a character other than"
                        f" A-Z, a-z, 0-9, '_', '%', '~' between {{{parsed[number - 1][1]}}}"
                        f" and {{{field}}} (e.g. ':')"
                    )
            self.parts.append((literal, field))
        self.simple = all(field is None or field.isidentifier() for _, field in self.parts)

    def _check_field(
        self, field: str, spec: str | None, conversion: str | None, parameters: tuple[str, ...]
    ) -> None:
        if spec or conversion:
            raise ConfigurationError(
                f"key template {self.template!r}: {{{field}}} has a format spec or conversion;"
                " cachekit encodes each value itself, so write just {name}"
            )
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        self.names.add(root)
        if root not in parameters:
            raise ConfigurationError(
                f"key template {self.template!r} names {root!r}, which is not a parameter;"
                f" the parameters are: {', '.join(parameters) or '(none)'}"
            )

    def render(self, arguments: Mapping[str, Any]) -> str:
        """The key for these bound arguments (every parameter present)."""
        if self.simple:
            return "".join(
                literal if field is None else literal + render(arguments[field])
                for literal, field in self.parts
            )
        formatter = string.Formatter()
        return "".join(
            literal
            if field is None
            else literal + render(formatter.get_field(field, (), arguments)[0])
            for literal, field in self.parts
        )
