"""Helpers of the mapping tests (`test_mapping_*.py`): golden files, placeholders, validation.

A golden file holds the entries a mapping makes of one record, as JSON with each `urn:uuid:`
placeholder replaced by a number in order of first use (`normalised`). Set `UPDATE_GOLDEN=1` to
write the golden files again from the mappings (then review the diff): the one flag for every
mapping's tests. Imported as `from golden import …`, as `conftest` is (pytest puts tests/ on
sys.path).
"""

import os
import re
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_server import fhir_json
from fhir_server.validation.resource import validate_resource

PLACEHOLDER = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def normalised(value: Any, token: str = "urn:uuid:{}") -> Any:
    """`value` as JSON would carry it, each placeholder replaced by `token` with n by first use."""
    tokens: dict[str, str] = {}
    text = fhir_json.dumps(value).decode()
    text = PLACEHOLDER.sub(
        lambda match: tokens.setdefault(match.group(0), token.format(len(tokens) + 1)), text
    )
    return fhir_json.loads(text.encode())


def assert_golden(got: Any, golden: Path) -> None:
    """`got` is what the golden file holds; with `UPDATE_GOLDEN` set, it is written there first."""
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_bytes(fhir_json.dumps(got, pretty=True) + b"\n")
    assert got == fhir_json.loads(golden.read_bytes())


def valid_resource(resource: dict[str, Any], ignore_id: bool = True) -> dict[str, Any]:
    """`resource` after the server's checks and the R4B model accepted it."""
    validate_resource(resource, resource["resourceType"], ignore_id=ignore_id)
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def valid(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`entries` after the server's checks and the R4B models accepted each resource, and the Bundle."""
    for entry in entries:
        valid_resource(entry["resource"])
    validate_resource({"resourceType": "Bundle", "type": "transaction", "entry": entries}, "Bundle")
    return entries


def first_identifier(resource: dict[str, Any]) -> dict[str, str] | None:
    """The resource's (first) identifier: QuestionnaireResponse has one Identifier, not a list."""
    identifier = resource.get("identifier")
    return identifier[0] if isinstance(identifier, list) else identifier


def code_systems_used(code_systems: list[dict[str, Any]], mapped: Any) -> list[tuple[str, str, str]]:
    """Checks our CodeSystems (valid, complete, every concept defined) and that each code of ours in
    `mapped` (entries) is one of them with its display; returns those (system, code, display)."""
    ours = {}
    for code_system in code_systems:
        validate_resource(code_system, "CodeSystem")
        get_fhir_model_class("CodeSystem").model_validate(code_system)
        assert code_system["url"].startswith("https://fhir-server.local/CodeSystem/")
        assert (code_system["status"], code_system["content"]) == ("active", "complete")
        assert code_system["count"] == len(code_system["concept"])
        assert all(concept["display"] and concept["definition"] for concept in code_system["concept"])
        ours[code_system["url"]] = {concept["code"]: concept["display"] for concept in code_system["concept"]}
    used = re.findall(
        r'"system":"(https://fhir-server\.local/[^"]+)","code":"([^"]+)","display":"([^"]+)"',
        fhir_json.dumps(mapped).decode(),
    )
    assert all(ours[system][code] == display for system, code, display in used)
    return used
