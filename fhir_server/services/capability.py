"""The CapabilityStatement, generated from what the server really supports."""

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from fhir_server import __version__
from fhir_server.search.registry import parameters
from fhir_server.validation.resource_types import supported_types, unsupported_types

_STARTED = datetime.now(UTC).isoformat(timespec="seconds")
INSTANCE_INTERACTIONS = ("read", "vread", "update", "patch", "delete", "history-instance")
TYPE_INTERACTIONS = ("create", "search-type", "history-type")
# Operations, with the canonical OperationDefinitions they implement.
VALIDATE = {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}
TYPE_OPERATIONS = {
    "Patient": [
        {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
        {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"},
    ],
    "Group": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}],
}
SYSTEM_OPERATIONS = [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}]


def _resource(resource_type: str) -> dict[str, Any]:
    params = [
        {"name": p.code, "definition": p.url, "type": p.type, "documentation": p.documentation or p.code}
        for p in sorted(parameters(resource_type).values(), key=lambda p: p.code)
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
        "searchInclude": ["*"] + [f"{resource_type}:{p['name']}" for p in params if p["type"] == "reference"],
        "searchRevInclude": ["*"],
        "searchParam": params,
        "operation": [VALIDATE, *TYPE_OPERATIONS.get(resource_type, [])],
    }


def security(issuer: str) -> dict[str, Any]:
    """`rest.security` of a server that needs SMART on FHIR tokens (SMART App Launch 2.0 §2.4:
    the oauth-uris extension; clients find the rest at /.well-known/smart-configuration)."""
    uris = [("token", "token"), ("introspect", "introspect"), ("revoke", "revoke"), ("authorize", "authorize")]
    return {
        "cors": True,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR"}], "text": "OAuth2 using SMART-on-FHIR profile"}],
        "description": "Every request needs a bearer access token (SMART on FHIR scopes); "
                       "discovery at .well-known/smart-configuration",
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": name, "valueUri": f"{issuer}/{path}"} for name, path in uris],
        }],
    }


@lru_cache(maxsize=8)
def capability_statement(base_url: str, issuer: str | None = None) -> dict[str, Any]:
    """The CapabilityStatement; `issuer`: the built-in authorization server's, when tokens are needed."""
    resources = []
    for resource_type in sorted(supported_types()):
        resources.append(_resource(resource_type))
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
            f"served; these R4 types are not: {left_out}. Search: every R4 search parameter "
            "except _text, _content, _query and two MolecularSequence variant-coordinate "
            "composites; _contained is refused."
        ),
        "rest": [
            {
                "mode": "server",
                "resource": resources,
                "interaction": [
                    {"code": "transaction"},
                    {"code": "batch"},
                    {"code": "history-system"},
                    {"code": "search-system"},
                ],
                "operation": SYSTEM_OPERATIONS,
                "searchParam": [
                    {"name": p.code, "definition": p.url, "type": p.type, "documentation": p.documentation}
                    for p in sorted(parameters("Patient").values(), key=lambda p: p.code)
                    if p.code.startswith("_")
                ],
                **({"security": security(issuer)} if issuer else {}),
            }
        ],
    }
