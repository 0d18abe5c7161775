"""The function spec's error messages: each problem pydantic reports becomes one line that
names the key by its dotted path (`autoscaling.keep_alive`), the value and how to fix it, with
the known keys (and the closest one) for a key that is not."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

MISSING_MODEL = "model: required; give it in the file or with --model"

_OWN_ERRORS = (
    "duration",
    "size",
    "min_above_max",
    "limit_below_default",
    "empty_model",
    "fallback_without_adaptive",
)


def describe(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per problem pydantic found validating `root` (the whole spec): the key's dotted
    path, the value and the fix."""
    return [_problem(error, root) for error in exc.errors(include_url=False)]


def _problem(error: Any, root: type[BaseModel]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    path = ".".join(loc) or "spec"
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{path}: {_unknown_key(root, loc)}"
    if kind == "missing":
        return MISSING_MODEL if loc == ("model",) else f"{path}: required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        known = ", ".join(_known_keys(root, loc))
        return f"{path}: {value!r} is not a mapping; indent keys under it (known keys: {known})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{path}: {value!r} is not a whole number; write one such as 4"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"{path}: {value!r} is not a number; write one such as 0.7"
    if kind == "string_type":
        return f"{path}: {value!r} is not text; write s3://bucket/prefix or a local path"
    if kind == "greater_than_equal":
        return f"{path}: {value!r} is too small; write a value >= {_number(ctx['ge'])}"
    if kind == "greater_than":
        return f"{path}: {value!r} is too small; write a value > {_number(ctx['gt'])}"
    if kind == "less_than_equal":
        return f"{path}: {value!r} is too large; write a value <= {_number(ctx['le'])}"
    if kind in _OWN_ERRORS:
        return f"{path}: {error['msg']}"
    return f"{path}: {value!r}: {error['msg']}"


def _number(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _unknown_key(root: type[BaseModel], loc: tuple[str, ...]) -> str:
    known = _known_keys(root, loc[:-1])
    text = f"unknown key; known keys here: {', '.join(known)}"
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    return f"{text}; did you mean {close[0]}?" if close else text


def _known_keys(root: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The YAML key names of the model at `loc` (a path of keys from `root`)."""
    cls = root
    for part in loc:
        field = _field_named(cls, part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        cls = annotation
    return [_yaml_key(name, info.validation_alias) for name, info in cls.model_fields.items()]


def _field_named(cls: type[BaseModel], key: str) -> Any:
    for name, info in cls.model_fields.items():
        if key in (name, info.validation_alias):
            return info
    return None


def _yaml_key(name: str, alias: object) -> str:
    return alias if isinstance(alias, str) else name
