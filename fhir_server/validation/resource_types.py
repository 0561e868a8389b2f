"""The R4 resource types this server accepts: every R4 type that has an R4B model."""

import json
from functools import cache
from importlib import resources

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel


@cache
def r4_resource_types() -> tuple[str, ...]:
    text = resources.files("fhir_server").joinpath("data/resource_types.json").read_text()
    return tuple(json.loads(text))


@cache
def model_class(resource_type: str) -> type[BaseModel] | None:
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError):
        return None


@cache
def supported_types() -> frozenset[str]:
    return frozenset(t for t in r4_resource_types() if model_class(t) is not None)


@cache
def unsupported_types() -> tuple[str, ...]:
    """R4 types with no R4B model (R4B dropped or reshaped them)."""
    return tuple(t for t in r4_resource_types() if t not in supported_types())
