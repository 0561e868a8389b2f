"""Bundles built from stored versions: history and searchset, with paging links."""

from typing import Any
from urllib.parse import urlencode

from fhir_server.search.registry import element_name, summary_elements
from fhir_server.storage.repository import Version, instant


def page_url(base: str, path: str, params: list[tuple[str, str]], **override: str | None) -> str:
    """`base/path?params` with some parameters replaced (a None value removes one)."""
    kept = [(k, v) for k, v in params if k not in override]
    kept += [(k, v) for k, v in override.items() if v is not None]
    query = urlencode(kept)
    return f"{base}/{path}".rstrip("/") + (f"?{query}" if query else "")


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


SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
ALWAYS_KEPT = ("resourceType", "id", "meta")


def shape(resource: dict[str, Any] | None, summary: str | None, elements: tuple[str, ...] | None) -> dict[str, Any] | None:
    """`_summary` (true, text, data) and `_elements`: a subset, tagged SUBSETTED as the spec asks."""
    if resource is None or (summary is None and not elements):
        return resource
    resource_type = resource["resourceType"]
    summary_set, required = summary_elements(resource_type)  # JSON names: `deceasedBoolean`
    if summary == "true":
        kept = {k: v for k, v in resource.items() if k in ALWAYS_KEPT or k.removeprefix("_") in summary_set}
    elif summary == "text":
        kept = {k: v for k, v in resource.items() if k in ALWAYS_KEPT or k == "text" or k.removeprefix("_") in required}
    elif summary == "data":
        kept = {k: v for k, v in resource.items() if k != "text"}
    else:
        wanted = set(elements or ()) | {element_name(resource_type, r) for r in required}
        kept = {k: v for k, v in resource.items() if k in ALWAYS_KEPT or element_name(resource_type, k) in wanted}
    meta = dict(kept.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    kept["meta"] = meta
    return kept


def searchset_bundle(
    base: str,
    entries: list[tuple[Version, dict[str, Any] | None, str]],
    total: int | None,
    links: list[tuple[str, str]],
    outcome: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`entries`: (version, the resource as shown, search mode: match or include)."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        bundle["total"] = total
    bundle["link"] = [{"relation": rel, "url": url} for rel, url in links]
    items = [
        {"fullUrl": f"{base}/{v.type}/{v.id}", "resource": resource, "search": {"mode": mode}}
        for v, resource, mode in entries
    ]
    if outcome is not None:
        items.append({"resource": outcome, "search": {"mode": "outcome"}})
    if items:
        bundle["entry"] = items
    return bundle
