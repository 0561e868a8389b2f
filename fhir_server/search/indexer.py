"""Index values extracted from a resource when it is written, stored with the current version.

Flat arrays of normalised strings, queried by equality: the fast shape on MongoDB (multikey
index) and one the embedded server indexes too.
"""

from typing import Any


def token(system: str | None, code: str) -> list[str]:
    """Token forms matched by `code`, `system|code`, `|code` (no system) and `system|`."""
    if system:
        return [code, f"{system}|{code}", f"{system}|"]
    return [code, f"|{code}"]


def index_values(resource: dict[str, Any]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    identifiers = resource.get("identifier")
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    if isinstance(identifiers, list):
        tokens: list[str] = []
        for ident in identifiers:
            if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                tokens.extend(token(ident.get("system"), ident["value"]))
        if tokens:
            values["identifier"] = sorted(set(tokens))
    return values
