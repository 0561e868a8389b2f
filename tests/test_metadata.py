"""CapabilityStatement, health probe, OpenAPI docs, request ids in logs."""

import json

import httpx
from conftest import ServerProcess, patient, post
from fhir.resources.R4B.capabilitystatement import CapabilityStatement


def test_capability_statement_is_valid_and_says_what_is_served(client: httpx.Client) -> None:
    response = client.get("/metadata")
    assert response.status_code == 200
    body = response.json()
    CapabilityStatement.model_validate(body)
    assert body["fhirVersion"] == "4.0.1"
    assert body["kind"] == "instance"
    assert "json" in body["format"] and not any("xml" in f for f in body["format"])
    rest = body["rest"][0]
    by_type = {r["type"]: r for r in rest["resource"]}
    assert len(by_type) >= 125
    assert "MedicinalProduct" not in by_type and "MedicinalProduct" in body["description"]
    patient_caps = by_type["Patient"]
    codes = {i["code"] for i in patient_caps["interaction"]}
    assert {"read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create"} <= codes
    assert patient_caps["versioning"] == "versioned-update"
    assert patient_caps["conditionalCreate"] and patient_caps["conditionalUpdate"]
    assert patient_caps["conditionalDelete"] == "single"
    assert {"_id", "identifier", "name", "birthdate", "_lastUpdated"} <= {p["name"] for p in patient_caps["searchParam"]}
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system", "search-system"}
    operations = {(o["name"], o["definition"]) for o in patient_caps["operation"]}
    assert ("everything", "http://hl7.org/fhir/OperationDefinition/Patient-everything") in operations
    assert ("validate", "http://hl7.org/fhir/OperationDefinition/Resource-validate") in operations
    assert ("export", "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export") in operations
    assert {o["name"] for o in by_type["Observation"]["operation"]} == {"validate"}
    assert {o["name"] for o in by_type["Group"]["operation"]} == {"validate", "export"}
    assert [o["definition"] for o in rest["operation"]] == ["http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"]
    assert body["implementation"]["url"].endswith("/fhir")


def test_health_reports_the_database(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_openapi_docs(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/docs").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/fhir/{resource_type}/{resource_id}" in spec["paths"]


def test_structured_access_log_carries_the_request_id(client: httpx.Client, server: ServerProcess) -> None:
    response = post(client, patient(), **{"X-Request-ID": "trace-me-123"})
    assert response.headers["x-request-id"] == "trace-me-123"
    lines = [json.loads(line) for line in server.log().splitlines() if "trace-me-123" in line]
    assert lines, "no access log line for the request"
    entry = lines[-1]
    assert entry["method"] == "POST" and entry["path"] == "/fhir/Patient" and entry["status"] == 201
    assert entry["duration_ms"] >= 0
