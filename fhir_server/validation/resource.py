"""Validate an incoming resource: FHIR JSON rules, the R4B model, and what the models leave out.

The model checks structure, cardinality and primitive formats. This module adds the checks the
models skip: `resourceType` and `id` against the URL, the id syntax, FHIR's ban on empty and null
values and control characters, and the closed code lists of coded elements (`gender: "robot"`
passes the model). Those lists are `data/required_codes.json`, built from the R4 value sets by
`build_required_codes`.
"""

import datetime
import json
import re
import types
import typing
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

from bson.decimal128 import Decimal128
from pydantic import BaseModel, ValidationError

from fhir_server.errors import BadRequest, Issue, NotFound
from fhir_server.validation.resource_types import model_class, supported_types

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# FHIR strings exclude control characters other than tab, carriage return and line feed.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# Far deeper than real resources need (nested Questionnaire items, extensions), within MongoDB's
# 100 levels for the stored document (which wraps the resource), and shallow enough that validating
# it cannot exhaust the interpreter's stack.
MAX_DEPTH = 90
MAX_ISSUES = 50


def check_type(resource_type: str) -> None:
    """404 for a type this server does not serve (unknown, or without an R4B model)."""
    if resource_type not in supported_types():
        raise NotFound(f"Unknown resource type '{resource_type}'")


def check_id(resource_id: str, expression: str = "id") -> None:
    if not ID_PATTERN.fullmatch(resource_id):
        raise BadRequest(
            f"Invalid id '{resource_id[:80]}': ids are 1-64 characters of A-Z a-z 0-9 - .",
            expression=expression,
        )


def validate_resource(
    body: Any,
    resource_type: str,
    *,
    url_id: str | None = None,
    ignore_id: bool = False,
) -> dict[str, Any]:
    """Check `body` as a `resource_type` resource and return it; raise BadRequest listing problems.

    `url_id` is the id from the URL of an update: the body must carry the same id. `ignore_id`
    (create): the body's id is dropped unchecked, as the specification says.
    """
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object holding a FHIR resource")
    found_type = body.get("resourceType")
    if found_type != resource_type:
        raise BadRequest(
            f"resourceType '{found_type}' does not match the type '{resource_type}' in the URL",
            expression="resourceType",
        )
    body_id = body.get("id")
    if url_id is not None:
        if body_id is None:
            raise BadRequest("An update must carry the resource's id", expression=f"{resource_type}.id")
        if body_id != url_id:
            raise BadRequest(
                f"The id '{body_id}' in the body does not match the id '{url_id}' in the URL",
                expression=f"{resource_type}.id",
            )
    if body_id is not None and not ignore_id:
        if not isinstance(body_id, str):
            raise BadRequest("id must be a string", expression=f"{resource_type}.id")
        check_id(body_id, f"{resource_type}.id")
    elif ignore_id:
        body = {k: v for k, v in body.items() if k != "id"}

    issues: list[Issue] = []
    _check_json(body, resource_type, issues, 0)
    if any(issue.code == "too-costly" for issue in issues):
        raise BadRequest(issues[0].diagnostics, issues=issues[:1])
    cls = model_class(resource_type)
    assert cls is not None
    try:
        model = cls.model_validate(body)
    except ValidationError as exc:
        issues.extend(_model_issues(exc, resource_type))
    except (LookupError, TypeError, ValueError, AttributeError) as exc:
        # The models resolve nested resources (contained, Bundle.entry.resource) by name and
        # raise plain errors for names they do not know.
        issues.append(Issue(f"Invalid content: {type(exc).__name__}: {exc}"[:300], "structure", expression=resource_type))
    else:
        _check_elements(model, body, resource_type, issues)
    if issues:
        raise BadRequest(issues[0].diagnostics, issues=issues[:MAX_ISSUES])
    return body


def _check_json(value: Any, path: str, issues: list[Issue], depth: int) -> None:
    """FHIR JSON: no empty strings, objects or arrays; null only inside arrays (primitive
    extensions); no control characters in strings; a bounded depth."""
    if depth > MAX_DEPTH:
        if not any(issue.code == "too-costly" for issue in issues):
            issues.append(Issue(f"Nested more than {MAX_DEPTH} levels deep", "too-costly", expression=path[:200]))
        return
    if isinstance(value, dict):
        if not value:
            issues.append(Issue("Empty objects are not allowed in FHIR JSON", expression=path))
        nested_type = value.get("resourceType") if depth else None
        if nested_type is not None and (not isinstance(nested_type, str) or nested_type not in supported_types()):
            issues.append(Issue(f"Unknown or unsupported resource type {str(nested_type)[:64]!r}", expression=f"{path}.resourceType"))
        for key, item in value.items():
            if item is None:
                issues.append(Issue(f"'{key}' is null: leave the element out instead", expression=f"{path}.{key}"))
            else:
                _check_json(item, f"{path}.{key}", issues, depth + 1)
    elif isinstance(value, list):
        if not value:
            issues.append(Issue("Empty arrays are not allowed in FHIR JSON", expression=path))
        elif all(item is None for item in value):
            issues.append(Issue("An array of only nulls is not allowed", expression=path))
        for index, item in enumerate(value):
            if item is not None:
                _check_json(item, f"{path}[{index}]", issues, depth + 1)
    elif isinstance(value, Decimal):
        try:
            Decimal128(value)
        except (ArithmeticError, ValueError):
            issues.append(Issue("A number with more than 34 significant digits, or out of range", expression=path))
    elif isinstance(value, str):
        if not value.strip():
            issues.append(Issue("Empty or blank strings are not allowed in FHIR JSON", expression=path))
        elif CONTROL_CHARACTERS.search(value):
            issues.append(Issue("Control characters are not allowed in FHIR strings", expression=path))


def _expression(resource_type: str, loc: tuple[int | str, ...]) -> str:
    path = resource_type
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _model_issues(exc: ValidationError, resource_type: str) -> list[Issue]:
    issues = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc", ())
        expression = _expression(resource_type, loc)
        kind = error.get("type", "")
        if kind == "extra_forbidden":
            message = f"Unknown element '{loc[-1] if loc else '?'}'"
            code = "structure"
        elif kind == "missing":
            message = f"Missing required element '{loc[-1] if loc else '?'}'"
            code = "required"
        else:
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            code = "value"
        issues.append(Issue(f"{expression}: {message}", code, expression=expression))
    return issues


@cache
def _required_codes() -> dict[str, frozenset[str]]:
    text = resources.files("fhir_server").joinpath("data/required_codes.json").read_text()
    return {element: frozenset(codes) for element, codes in json.loads(text).items()}


@cache
def _fields(cls: type[BaseModel]) -> tuple[tuple[str, str, frozenset[str] | None, tuple[type, ...] | None], ...]:
    """(attribute, JSON name, closed codes or None, JSON types a primitive takes or None)."""
    table = _required_codes()
    return tuple(
        (attr, info.alias or attr, table.get(f"{cls.__name__}.{info.alias or attr}"), _json_types(info.annotation))
        for attr, info in cls.model_fields.items()
    )


def _json_types(annotation: Any) -> tuple[type, ...] | None:
    """The JSON value types of a primitive field (unwrapping Optional, List, Annotated)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return None
            annotation = args[0]
        elif origin in (list, typing.Annotated):
            annotation = typing.get_args(annotation)[0]
        else:
            break
    if annotation is bool:
        return (bool,)
    if annotation is int:
        return (int,)
    if annotation is Decimal:
        return (int, Decimal)
    if annotation in (str, bytes, datetime.date, datetime.datetime, datetime.time):
        return (str,)
    return None


_JSON_NAMES = {bool: "a JSON boolean", int: "a JSON integer", Decimal: "a JSON number", str: "a JSON string"}


def _check_elements(model: BaseModel, raw: dict[str, Any], path: str, issues: list[Issue]) -> None:
    """Walk the validated model beside the JSON it came from: the models coerce `"true"` to true
    and `"5"` to 5, but FHIR JSON wants the real types; and closed code lists."""
    fields_set = model.model_fields_set
    for attr, name, codes, json_types in _fields(type(model)):
        if attr not in fields_set:
            continue
        value, raw_value = getattr(model, attr), raw.get(name)
        if isinstance(value, list) and isinstance(raw_value, list):
            for index, (item, raw_item) in enumerate(zip(value, raw_value, strict=False)):
                _check_element(item, raw_item, codes, json_types, f"{path}.{name}[{index}]", issues)
        else:
            _check_element(value, raw_value, codes, json_types, f"{path}.{name}", issues)


def _check_element(
    value: Any,
    raw: Any,
    codes: frozenset[str] | None,
    json_types: tuple[type, ...] | None,
    path: str,
    issues: list[Issue],
) -> None:
    if isinstance(value, BaseModel):
        if isinstance(raw, dict):
            _check_elements(value, raw, path, issues)
        return
    if raw is None:
        return
    if json_types is not None and (type(raw) not in json_types):
        issues.append(Issue(f"{path}: must be {_JSON_NAMES[json_types[-1]]}", "value", expression=path))
    elif codes is not None and isinstance(raw, str) and raw not in codes:
        issues.append(
            Issue(
                f"{path}: '{raw}' is not one of the required codes ({', '.join(sorted(codes))})",
                "code-invalid",
                expression=path,
            )
        )
