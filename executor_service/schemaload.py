"""``schema.load`` for the bodies that pass, without marshmallow's machinery (E1).

marshmallow's ``load`` of an /execute body took ~14 us, a sixth of the executor's own
cost per call. :func:`compile_load` reads a schema's declared fields once and returns
a function that loads a body the way ``schema.load`` does, calling the fields' own
validators and the schema's ``@validates_schema`` methods, so the rules stay in the
schema (one home). It only decides the plain case: a value of the JSON type a field
takes, every validator passing. Anything else - a missing required field, a wrong
type, a failing validator, a key the schema does not know - goes to ``schema.load``,
which raises the error with marshmallow's messages, word for word. A schema using a
feature this module does not know (another field type, ``data_key``, pre/post-load
hooks, ...) is not compiled: ``compile_load`` returns ``schema.load`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, missing

Load = Callable[[Any], Any]


class _Unsure(Exception):
    """The fast path cannot decide: ``schema.load`` will."""


def _unsure() -> Any:
    raise _Unsure


def _value_loader(field: fields.Field) -> Callable[[Any], Any] | None:
    """What ``field._deserialize`` does for the JSON values it surely accepts."""
    kind = type(field)
    if kind is fields.String:
        return lambda v: v if type(v) is str else _unsure()
    if kind is fields.Integer:
        return lambda v: v if type(v) is int else _unsure()
    if kind is fields.Float:
        allow_nan = field.allow_nan  # type: ignore[attr-defined]

        def load_float(v: Any) -> float:
            if type(v) is not float and type(v) is not int:
                raise _Unsure
            try:
                f = float(v)
            except OverflowError:
                raise _Unsure from None
            if not allow_nan and not math.isfinite(f):
                raise _Unsure
            return f

        return load_float
    if kind is fields.List:
        inner = _field_loader(field.inner)  # type: ignore[attr-defined]
        if inner is None:
            return None
        return lambda v: [inner(item) for item in v] if type(v) is list else _unsure()
    if kind is fields.Nested:
        if field.only or field.exclude or field.many or field.unknown:  # type: ignore[attr-defined]
            return None
        nested = field.schema  # type: ignore[attr-defined]
        compiled = _compile(nested)
        if compiled is None:
            return None
        return lambda v: compiled(v) if type(v) is dict else _unsure()
    return None


def _field_loader(field: fields.Field) -> Callable[[Any], Any] | None:
    """``field.deserialize`` for a present value: None, or the value and its validators."""
    value_loader = _value_loader(field)
    if value_loader is None:
        return None
    validators = list(field.validators)
    allow_none = field.allow_none

    def load(v: Any) -> Any:
        if v is None:
            if allow_none:
                return None
            raise _Unsure
        out = value_loader(v)
        for validate in validators:
            validate(out)
        return out

    return load


def _compile(schema: Schema) -> Load | None:
    hooks = {name for name, entries in schema._hooks.items() if entries}
    if hooks - {"validates_schema"} or schema.unknown != RAISE or schema.many:
        return None
    plan: list[tuple[str, Callable[[Any], Any], bool, Any]] = []
    for name, field in schema.load_fields.items():
        if field.data_key not in (None, name) or field.attribute not in (None, name):
            return None
        load = _field_loader(field)
        if load is None:
            return None
        plan.append((name, load, field.required, field.load_default))
    names = {name for name, *_ in plan}
    validators = []
    for attr, pass_original, _kwargs in schema._hooks.get("validates_schema", []):
        if pass_original:
            return None
        validators.append(getattr(schema, attr))

    def load_dict(data: Any) -> dict[str, Any]:
        if type(data) is not dict:
            raise _Unsure
        for key in data:
            if key not in names:
                raise _Unsure  # an unknown field: marshmallow names it
        out: dict[str, Any] = {}
        for name, load, required, default in plan:
            if name in data:
                out[name] = load(data[name])
            elif required:
                raise _Unsure
            elif default is not missing:
                out[name] = default() if callable(default) else default
        for validate in validators:
            validate(out, partial=None, many=False, unknown=RAISE)
        return out

    return load_dict


def compile_load(schema: Schema) -> Load:
    """A function that returns ``schema.load(data)`` and raises what it raises, faster
    for the bodies that pass (see the module's docstring)."""
    compiled = _compile(schema)
    if compiled is None:
        return schema.load

    def load(data: Any) -> Any:
        try:
            return compiled(data)
        except (_Unsure, ValidationError):
            return schema.load(data)  # the canonical answer, errors and all

    return load
