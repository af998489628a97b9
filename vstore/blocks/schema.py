"""Declared schemas of JSON documents (msgspec), and the one check of a document against its
declaration (DESIGN invariant 5: bad bytes give a clear error and change nothing; SPEC §4, where
every document a site reads from a peer or a file is untrusted).

Keeps true: `validate(schema, doc, what)` returns `doc` converted to `schema` (a `msgspec.Struct`
or a container of them, declared next to the code that owns the document), or raises one
`FormatError` that names the key path and what is allowed there: the expected type or range, the
known keys of an object, the allowed values of an enumeration. Nothing else escapes it: a value
nested too deeply, a number of a thousand digits, a key of any length all become that one error,
with untrusted names shown briefly.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from vstore.blocks.errors import FormatError, brief

T = TypeVar("T")

Count = Annotated[int, msgspec.Meta(ge=0)]
"""A non-negative integer (never a bool, never a float)."""
Positive = Annotated[int, msgspec.Meta(ge=1)]

_AT = re.compile(r"(?s)^(.*?)(?: - at (.*))?$")
_UNKNOWN = re.compile(r"(?s)^Object contains unknown field `(.*)`$")
_MISSING = re.compile(r"(?s)^Object missing required field `(.*)`$")
_ENUM = re.compile(r"(?s)^Invalid enum value (.*)$")
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([^\]]*)\]")
_LONG = re.compile(r"`([^`]{40})[^`]+`")
MESSAGE_LIMIT = 400


def validate(schema: type[T] | Any, doc: object, what: str, *, str_keys: bool = False) -> T:
    """`doc` as its declared type `schema`; FormatError "<what>: at <path>: <what is allowed>".
    `str_keys`: the document came from JSON, so integer keys are spelled as strings."""
    try:
        return msgspec.convert(doc, schema, strict=True, str_keys=str_keys)
    except msgspec.ValidationError as err:
        raise FormatError(_message(schema, str(err), what)) from None
    except RecursionError:
        raise FormatError(f"{what}: values nested too deeply to be a valid document") from None


def _message(schema: Any, text: str, what: str) -> str:
    detail, where = _AT.match(text).groups()  # type: ignore[union-attr]
    path = (where or "`$`").replace("`", "")
    place = _place(path)
    if m := _UNKNOWN.match(detail):
        keys = _known_keys(_type_at(schema, path))
        known = f"; known keys: {', '.join(keys)}" if keys else ""
        detail = f"unknown key {brief(m.group(1))}{known}"
    elif m := _MISSING.match(detail):
        detail = f"missing key {brief(m.group(1))}"
    elif m := _ENUM.match(detail):
        allowed = _allowed_values(_type_at(schema, path))
        detail = f"{brief(m.group(1).strip(chr(39)))} is not allowed" + (f"; use one of {allowed}" if allowed else "")
    else:
        detail = _LONG.sub(r"`\1...`", detail)
        described = _description(_type_at(schema, path, plain=False))
        if described:
            detail = re.sub(r"(?s)^(Expected `\w+`).*?(, got.*|$)", lambda m: f"{m[1]} ({described}){m[2]}", detail)
        detail = detail[:1].lower() + detail[1:]
    return f"{what}: {place}: {detail}"[:MESSAGE_LIMIT]


def _place(path: str) -> str:
    """`$.host.mirror` -> "at key host.mirror"; `key in $.m` -> "at a key of m"."""
    if path.startswith("key in "):
        inner = path[len("key in "):].removeprefix("$").lstrip(".")
        return f"at a key of {inner or 'the document'}"
    inner = path.removeprefix("$").lstrip(".")
    return f"at key {_LONG.sub('...', inner)[:120]}" if inner else "at the top level"


def _plain(tp: Any) -> Any:
    """The type itself: Annotated and Optional/unions stripped to their first Struct, dict or list."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            structs = [a for a in members if isinstance(a, type) and issubclass(a, msgspec.Struct)]
            tp = (structs or members or [Any])[0]
        else:
            return tp


def _type_at(schema: Any, path: str, *, plain: bool = True) -> Any:
    """The declared type at a msgspec error path (None when the path leaves the declaration);
    `plain=False` keeps its `Annotated` constraints."""
    if path.startswith("key in "):
        return None
    tp = schema
    for name, index in _SEGMENT.findall(path.removeprefix("$")):
        tp = _plain(tp)
        if name:
            fields = _struct_fields(tp)
            if name not in fields:
                return None
            tp = fields[name]
        else:
            args = typing.get_args(tp)
            origin = typing.get_origin(tp)
            if origin is dict and len(args) == 2:
                tp = args[1]
            elif origin is tuple and args and index.isdigit():
                tp = args[min(int(index), len(args) - 1)]
            elif args:
                tp = args[0]
            else:
                return None
    return _plain(tp) if plain else tp


def _description(tp: Any) -> str:
    """The `msgspec.Meta(description=...)` of an annotated type, if any."""
    if typing.get_origin(tp) is Annotated:
        for meta in typing.get_args(tp)[1:]:
            if isinstance(meta, msgspec.Meta) and meta.description:
                return meta.description
    return ""


def _struct_fields(tp: Any) -> dict[str, Any]:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp, include_extras=True)
        return {f.encode_name: hints.get(f.name, f.type) for f in msgspec.structs.fields(tp)}
    return {}


def _known_keys(tp: Any) -> list[str]:
    return list(_struct_fields(tp))


def _allowed_values(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return ", ".join(repr(v) for v in typing.get_args(tp))
    if isinstance(tp, type) and hasattr(tp, "__members__"):
        return ", ".join(repr(m.value) for m in tp.__members__.values())
    return ""
