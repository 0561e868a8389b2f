"""The CapabilityStatement, generated from what the server really supports."""

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from fhir_server import __version__
from fhir_server.search.criteria import SUPPORTED_PARAMETERS
from fhir_server.validation.resource_types import (
    model_class,
    supported_types,
    unsupported_types,
)

_STARTED = datetime.now(UTC).isoformat(timespec="seconds")
INSTANCE_INTERACTIONS = ("read", "vread", "update", "patch", "delete", "history-instance")
TYPE_INTERACTIONS = ("create", "search-type", "history-type")
_SEARCH_PARAMS = {
    "_id": ("token", "http://hl7.org/fhir/SearchParameter/Resource-id"),
    "identifier": ("token", None),
}


def _resource(resource_type: str, has_identifier: bool) -> dict[str, Any]:
    params = [
        {"name": name, "type": _SEARCH_PARAMS[name][0]}
        | ({"definition": _SEARCH_PARAMS[name][1]} if _SEARCH_PARAMS[name][1] else {})
        for name in SUPPORTED_PARAMETERS
        if name == "_id" or has_identifier
    ]
    return {
        "type": resource_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
        "interaction": [{"code": c} for c in INSTANCE_INTERACTIONS + TYPE_INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "full-support",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "searchParam": params,
    }


@lru_cache(maxsize=8)
def capability_statement(base_url: str) -> dict[str, Any]:
    resources = []
    for resource_type in sorted(supported_types()):
        cls = model_class(resource_type)
        has_identifier = cls is not None and "identifier" in cls.model_fields
        resources.append(_resource(resource_type, has_identifier))
    left_out = ", ".join(unsupported_types())
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _STARTED,
        "publisher": "fhir-server",
        "kind": "instance",
        "software": {"name": "fhir-server", "version": __version__},
        "implementation": {"description": "FHIR R4 server on MongoDB", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json", "application/json"],
        "patchFormat": ["application/json-patch+json"],
        "description": (
            "JSON only: XML is answered with 406. Every R4 resource type with an R4B model is "
            f"served; these R4 types are not: {left_out}."
        ),
        "rest": [
            {
                "mode": "server",
                "resource": resources,
                "interaction": [{"code": "history-system"}],
            }
        ],
    }
