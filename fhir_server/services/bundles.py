"""Bundles built from stored versions: history and searchset, with paging links."""

from typing import Any
from urllib.parse import urlencode

from fhir_server.storage.repository import Version, instant


def page_url(base: str, path: str, params: list[tuple[str, str]], **override: str | None) -> str:
    """`base/path?params` with some parameters replaced (a None value removes one)."""
    kept = [(k, v) for k, v in params if k not in override]
    kept += [(k, v) for k, v in override.items() if v is not None]
    query = urlencode(kept)
    return f"{base}/{path}" + (f"?{query}" if query else "")


def _links(self_url: str, next_url: str | None) -> list[dict[str, str]]:
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return links


def history_bundle(
    base: str, versions: list[Version], total: int | None, self_url: str, next_url: str | None
) -> dict[str, Any]:
    entries = []
    for v in versions:
        entry: dict[str, Any] = {"fullUrl": f"{base}/{v.type}/{v.id}"}
        if v.resource is not None:
            entry["resource"] = v.resource
        entry["request"] = {
            "method": v.method,
            "url": v.type if v.method == "POST" else f"{v.type}/{v.id}",
        }
        entry["response"] = {
            "status": "201 Created" if v.created else "200 OK",
            "etag": f'W/"{v.vid}"',
            "lastModified": instant(v.ts),
        }
        entries.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
    if total is not None:
        bundle["total"] = total
    bundle["link"] = _links(self_url, next_url)
    if entries:  # FHIR JSON has no empty arrays
        bundle["entry"] = entries
    return bundle


def searchset_bundle(
    base: str, versions: list[Version], total: int, self_url: str, next_url: str | None
) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": _links(self_url, next_url),
    }
    if versions:
        bundle["entry"] = [
            {"fullUrl": f"{base}/{v.type}/{v.id}", "resource": v.resource, "search": {"mode": "match"}}
            for v in versions
        ]
    return bundle
