"""Rows as cache values: primary keys and their key text, column snapshots, detached instances.

An entity is cached as a *column snapshot*, a dict from column attribute to value, which
the cache's serializer encodes like any other value (JSON by default: datetimes,
Decimals, UUIDs and bytes round-trip). ORM instances are never pickled: a cached row
comes back as a new detached instance built through the mapper, without a database
round trip, or merged into a session with ``merge(load=False)``.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import json
import operator
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, select, tuple_
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper, Session, class_mapper, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import UnmappedClassError
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql import sqltypes

from cachekit.exceptions import ConfigurationError
from cachekit.keycodec import canonical_decimal

__all__ = ["Pk", "Rows", "Snapshot"]

M = TypeVar("M")

#: A row's column values by attribute key: what the cache stores for an entity.
Snapshot = dict[str, Any]

# Column value types no caller can change in place: entities share them with the cache.
_IMMUTABLE = frozenset({
    type(None), bool, int, float, str, bytes, decimal.Decimal,
    datetime.datetime, datetime.date, datetime.time, datetime.timedelta, uuid.UUID,
})  # fmt: skip


def _component(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, decimal.Decimal):
        value = canonical_decimal(value)  # 1.50 and 1.5 are one row: one text
    elif isinstance(value, float):
        value = repr(value + 0.0)  # -0.0 and 0.0 likewise
    return json.dumps(value if isinstance(value, str) else str(value))


class Pk(tuple[Any, ...]):
    """A primary key, normalized to a tuple in the mapper's column order.

    ``str()`` gives its key text: each component JSON-encoded, joined by ``":"``
    (``7``; ``1:"a:b"``). A JSON value's end is always known, so no two keys share a
    text, whatever their strings contain; and since every component has its column's
    Python type (see :meth:`Rows.pk`), equal keys share one text: ``Decimal("1.50")``
    and ``Decimal("1.5")`` are both ``"1.5"``.
    """

    __slots__ = ()

    def __str__(self) -> str:
        return ":".join(_component(value) for value in self)


class Rows(Generic[M]):
    """Everything about one mapped class that turns rows into cache values and back."""

    def __init__(self, model: type[M]) -> None:
        try:
            self.mapper: Mapper[M] = class_mapper(model)
        except (UnmappedClassError, NoInspectionAvailable) as exc:
            raise ConfigurationError(f"{model!r} is not a mapped class") from exc
        self.model = model
        self.table_name = self.mapper.local_table.name  # type: ignore[attr-defined]
        columns = self.mapper.primary_key
        self.pk_keys = [self.mapper.get_property_by_column(column).key for column in columns]
        self.column_keys = [attr.key for attr in self.mapper.column_attrs]
        self._pk_types = [_python_type(column.type) for column in columns]
        self._pk_spellings = [_spelling(column.type) for column in columns]

    # -- primary keys -------------------------------------------------------------------

    def pk(self, value: Any) -> Pk:
        """Normalize what a caller passes (``7``, ``(1, 2)``) to a :class:`Pk`.

        Each component is converted to its column's Python type first, so every
        spelling of one row's key is one cache key and one row tag, the ones a write of
        the row invalidates: ``"7"`` is ``7`` on an Integer key; ``"1.5"``, ``1.5`` and
        ``Decimal("1.50")`` are one Numeric key; a UUID may be its string. What the
        column type cannot take exactly is refused: a bool or a float on an Integer
        key, a non-finite number on a Numeric one, a datetime on a Date one.

        Raises:
            ValueError: a composite key with the wrong number of components, or a
                string that does not parse as its column's type.
            TypeError: a component of a type its column does not take.
        """
        parts = tuple(value) if isinstance(value, tuple | list) else (value,)
        if len(parts) != len(self._pk_types):
            raise ValueError(f"{self.model.__name__} keys have {len(self._pk_types)} parts")
        kinds = zip(self._pk_types, self._pk_spellings, parts, strict=True)
        return Pk(spell(_coerce(kind, part)) for kind, spell, part in kinds)

    def pk_of(self, snapshot: Mapping[str, Any]) -> Pk:
        return self.pk(tuple(snapshot[key] for key in self.pk_keys))

    def pk_of_instance(self, obj: Any) -> Pk | None:
        """The instance's key, or ``None`` while part of it is unknown (not flushed, or
        generated by the server and not returned)."""
        values = tuple(self.mapper.primary_key_from_instance(obj))
        return None if any(value is None for value in values) else self.pk(values)

    def public(self, pk: Pk) -> Any:
        """The key as callers write it: a scalar for a one-column key, else the tuple."""
        return pk[0] if len(pk) == 1 else tuple(pk)

    # -- snapshots and instances ----------------------------------------------------------

    def snapshot(self, obj: Any) -> Snapshot:
        """Every column of a loaded instance (a deferred column loads here)."""
        return {key: getattr(obj, key) for key in self.column_keys}

    def loaded(self, obj: Any) -> Snapshot:
        """The columns an instance holds in memory, without touching the database."""
        held = sa_inspect(obj).dict
        return {key: held[key] for key in self.column_keys if key in held}

    def unshared(self, snapshot: Mapping[str, Any]) -> Snapshot:
        """A copy of ``snapshot`` whose mutable values (a JSON column's dict, an ARRAY's
        list) are deep copies, so that changing an entity never changes the cache."""
        return {
            key: value if type(value) in _IMMUTABLE else copy.deepcopy(value)
            for key, value in snapshot.items()
        }

    def instance(self, snapshot: Mapping[str, Any]) -> M:
        """A detached instance with ``snapshot`` as its committed state: no SQL."""
        obj = self.mapper.class_manager.new_instance()
        for key in self.column_keys:
            if key in snapshot:
                set_committed_value(obj, key, snapshot[key])
        make_transient_to_detached(obj)
        return obj

    def attach(self, snapshot: Mapping[str, Any], session: Session) -> M:
        """The session's own instance of the row if it has one, else the snapshot
        merged in without a SELECT (``merge(load=False)``)."""
        existing = session.identity_map.get(identity_key(self.model, self.pk_of(snapshot)))
        if existing is not None:
            return existing
        return session.merge(self.instance(snapshot), load=False)

    # -- statements -----------------------------------------------------------------------

    def where_pks(self, pks: Iterable[Pk]) -> ColumnElement[bool]:
        """``pk IN (...)``, with row values for a composite key."""
        attrs = [getattr(self.model, key) for key in self.pk_keys]
        if len(attrs) == 1:
            single: ColumnElement[bool] = attrs[0].in_([pk[0] for pk in pks])
            return single
        return tuple_(*attrs).in_([tuple(pk) for pk in pks])

    def select_snapshots(self, pks: Iterable[Pk]) -> Select[Any]:
        """One SELECT of every column of the rows with these keys, labeled by attribute."""
        return self.select_rows(self.where_pks(pks))

    def select_entities(self, pks: Iterable[Pk]) -> Select[Any]:
        return select(self.model).where(self.where_pks(pks))

    def select_pks(self, condition: ColumnElement[bool]) -> Select[Any]:
        return select(*[getattr(self.model, key) for key in self.pk_keys]).where(condition)

    def select_rows(self, condition: ColumnElement[bool]) -> Select[Any]:
        """Every column of the rows matching ``condition``, labeled by attribute."""
        return select(*[getattr(self.model, key).label(key) for key in self.column_keys]).where(
            condition
        )


def _python_type(column_type: Any) -> type | None:
    try:
        kind: type = column_type.python_type
    except NotImplementedError:  # a custom type that does not say: taken as given
        return None
    return kind


def _spelling(column_type: Any) -> Callable[[Any], Any]:
    """The one spelling, among the values the database takes as equal, that keys a row:
    a UUID string canonical (``str(UUID(...))``, as the database returns it), a CHAR
    without the padding PostgreSQL returns, an aware datetime in UTC."""
    if isinstance(column_type, sqltypes.Uuid) and not column_type.as_uuid:
        return lambda value: str(uuid.UUID(value)) if isinstance(value, str) else value
    if isinstance(column_type, sqltypes.CHAR):
        return lambda value: value.rstrip(" ") if isinstance(value, str) else value
    if isinstance(column_type, sqltypes.DateTime):
        return _utc
    return _as_is


def _as_is(value: Any) -> Any:
    return value


def _utc(value: Any) -> Any:
    if isinstance(value, datetime.datetime) and value.utcoffset() is not None:
        return value.astimezone(datetime.UTC)
    return value


def _coerce(kind: type | None, value: Any) -> Any:
    if kind is None:
        return value
    if isinstance(value, bool) and kind is not bool:
        raise TypeError(f"a bool is not a {kind.__name__} primary key")
    convert = _CONVERTERS.get(kind)
    if convert is not None:
        return convert(value)
    if isinstance(value, kind) and not (
        kind is datetime.date and isinstance(value, datetime.datetime)
    ):
        return value
    raise TypeError(f"a {kind.__name__} primary key cannot be a {type(value).__name__}")


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        return int(value)
    try:
        return operator.index(value)  # int and numpy ints; a float 7.5 is refused
    except TypeError:
        raise TypeError(f"an int primary key cannot be a {type(value).__name__}") from None


def _to_decimal(value: Any) -> decimal.Decimal:
    if isinstance(value, float):
        value = repr(value)  # the float as written (0.1), not its binary expansion
    elif not isinstance(value, decimal.Decimal | int | str):
        raise TypeError(f"a Decimal primary key cannot be a {type(value).__name__}")
    try:
        number = decimal.Decimal(value)
    except decimal.InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not number.is_finite():
        raise ValueError(f"a primary key must be finite, not {value!r}")
    return number


def _to_float(value: Any) -> float:
    if not isinstance(value, float | int | str | decimal.Decimal):
        raise TypeError(f"a float primary key cannot be a {type(value).__name__}")
    return float(value)


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if type(value) is int:  # the text the database compares, as before
        return str(value)
    raise TypeError(f"a str primary key cannot be a {type(value).__name__}")


def _to_uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        return uuid.UUID(value)
    raise TypeError(f"a UUID primary key cannot be a {type(value).__name__}")


_CONVERTERS: dict[type, Callable[[Any], Any]] = {
    int: _to_int,
    decimal.Decimal: _to_decimal,
    float: _to_float,
    str: _to_str,
    uuid.UUID: _to_uuid,
}
