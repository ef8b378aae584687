"""Logical keys of a decorated function's calls: signature analysis once, a key per call.

A default key is ``module.qualname:`` and the canonical encoding of every bound
argument (:mod:`cachekit.keycodec`), ``self`` and ``cls`` included, so two instances
or a subclass never share an entry by accident; a closure's captured values are part
of the prefix, so two closures from one factory never share one either, and so is the
line of a nested function's definition, so two functions a factory defines under one
name do not. Keys are
built without ``inspect.Signature.bind`` whenever a call passes exactly the declared
positional parameters (the common case); any other call shape binds once, fills in
defaults, and yields the same key.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, cast

from cachekit.exceptions import KeyEncodingError
from cachekit.keycodec import Template, encode, quote

__all__ = ["KeyMaker", "KeySpec", "TagSpec"]

#: A key template over the parameters (``"user:{user_id}"``) or a callable taking the
#: function's arguments and returning the key.
KeySpec = str | Callable[..., str]

#: Key sets of a result: a list, or ``tags(result, *args, **kwargs) -> list``.
TagSpec = Iterable[str] | Callable[..., Iterable[str]]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_SELF_NAMES = ("self", "cls")
# Captured values longer than this are keyed by their SHA-256 instead.
_CLOSURE_TEXT = 64
_FIX = (
    "pass key= to @cache.cached (a template or a callable), or give the class a"
    " __cache_key__(self) method returning what identifies the value (str, int, tuple, ...)"
)


class KeyMaker:
    """Builds the logical key of one call of ``func``.

    Raises:
        ConfigurationError: a template names something that is not a parameter, or is
            ambiguous (see :class:`~cachekit.keycodec.Template`).
        KeyEncodingError: a default key is asked of a lambda, or of a closure whose
            captured values have no stable encoding.
    """

    def __init__(
        self, func: Callable[..., Any], spec: KeySpec | None, tags: TagSpec | None = None
    ) -> None:
        self.func = func
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        self.names = tuple(p.name for p in params)
        # Exactly the declared positional parameters, passed positionally: no binding.
        self.arity = len(params) if all(p.kind in _POSITIONAL for p in params) else -1
        # A method binds its controls to the instance (decorators._CachedMethod).
        self.is_method = bool(params) and params[0].name in _SELF_NAMES
        self.spec = spec
        self.tags = tags
        self.template = Template(spec, self.names) if isinstance(spec, str) else None
        self.name = getattr(func, "__qualname__", None) or repr(func)
        self.prefix = f"{getattr(func, '__module__', None)}.{self.name}"
        if spec is None:
            if not hasattr(func, "__qualname__"):
                raise KeyEncodingError(
                    f"{func!r} has no qualified name to key by (a partial, or a callable"
                    " object): pass key= to @cache.cached, or decorate a function"
                )
            # A wrapper made with functools.wraps stands for the function it wraps: its
            # own closure (the decorator's) says nothing about which function it is.
            inner = inspect.unwrap(func)
            self.prefix += _definition_text(inner) + _closure_text(inner)
        self.prefix += ":"

    def tags_of(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[Any], Iterable[str]] | None:
        """The tags function of one call's result, or ``None`` for an untagged function."""
        tags = self.tags
        if tags is None:
            return None
        if callable(tags):
            return lambda result: tags(result, *args, **kwargs)
        fixed = list(tags)
        return lambda result: fixed

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        try:
            return self._key(args, kwargs)
        except KeyEncodingError as exc:
            raise self._explain(args, kwargs, exc) from None

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        template = self.template
        if template is not None:
            if not kwargs and len(args) == self.arity:
                return template.render(dict(zip(self.names, args, strict=True)))
            return template.render(self._bind(args, kwargs).arguments)
        spec = self.spec
        if spec is None:
            if not kwargs and len(args) == self.arity:
                return self.prefix + ",".join(map(encode, args))
            return self.prefix + ",".join(self._bound_parts(args, kwargs))
        key = cast("Callable[..., object]", spec)(*args, **kwargs)  # a str made self.template
        if not isinstance(key, str):
            raise TypeError(f"key callable returned {type(key).__name__}, expected str")
        return key

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound

    def _bound_parts(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
        # Positional values in order, then name=value; a value's text never starts with
        # "name=", so the call shapes of one signature cannot collide.
        parts: list[str] = []
        params = self.signature.parameters
        for name, value in self._bind(args, kwargs).arguments.items():
            kind = params[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                parts.extend(map(encode, value))
            elif kind is inspect.Parameter.VAR_KEYWORD:
                parts.extend(sorted(f"{quote(k)}={encode(v)}" for k, v in value.items()))
            elif kind is inspect.Parameter.KEYWORD_ONLY:
                parts.append(f"{name}={encode(value)}")
            else:
                parts.append(encode(value))
        return parts

    def _explain(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], exc: KeyEncodingError
    ) -> KeyEncodingError:
        """The error naming the first argument that has no encoding, and the fix."""
        where = f"{self.name}()"
        template = self.template
        for name, value in self._bind(args, kwargs).arguments.items():
            if template is not None and name not in template.names:
                continue
            try:
                encode(value)
            except KeyEncodingError as inner:
                fix = _FIX
                if name in _SELF_NAMES:
                    fix += (
                        "; a stateless class whose instances may share entries returns a constant"
                    )
                return KeyEncodingError(f"cannot key {where}: argument {name!r}: {inner}; {fix}")
        return KeyEncodingError(f"cannot key {where}: {exc}; {_FIX}")


def _definition_text(func: Callable[..., Any]) -> str:
    """For a function defined inside another, the line of its definition: two functions
    a factory defines under one name (in the branches of an ``if``) share a qualname."""
    code = getattr(func, "__code__", None)
    if "<locals>" not in func.__qualname__ or code is None:
        return ""
    return f"@{code.co_firstlineno}"


def _closure_text(func: Callable[..., Any]) -> str:
    """What makes this closure's keys its own: its captured values, encoded.

    Raises:
        KeyEncodingError: a lambda, or a captured value with no stable encoding.
    """
    name = getattr(func, "__name__", "")
    if name == "<lambda>":
        raise KeyEncodingError(
            "a lambda has no name of its own to key by (two lambdas would share entries):"
            " use def, or pass key= to @cache.cached"
        )
    code, cells = getattr(func, "__code__", None), getattr(func, "__closure__", None)
    if code is None or not cells:
        return ""
    captured: dict[str, Any] = {}
    for var, cell in zip(code.co_freevars, cells, strict=True):
        # __class__ is the class of super() (self or cls is in the key); a cell named
        # like the function is a recursive closure's reference to itself.
        if var in ("__class__", name):
            continue
        try:
            captured[var] = cell.cell_contents
        except ValueError:  # not assigned yet
            raise KeyEncodingError(
                f"{func.__qualname__} captures {var!r}, which is not assigned yet when it is"
                " decorated; pass key= to @cache.cached"
            ) from None
        try:
            encode(captured[var])
        except KeyEncodingError as exc:
            raise KeyEncodingError(
                f"{func.__qualname__} is a closure, and closures made by one factory share"
                f" a name, so what they capture is part of their keys; but {var!r} is {exc}:"
                " pass key= to @cache.cached, or give that class a __cache_key__(self) method"
            ) from None
    text = encode(captured) if captured else ""
    if len(text) > _CLOSURE_TEXT:
        text = "#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return text
