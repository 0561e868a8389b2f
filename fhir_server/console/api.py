"""The console's client of our own FHIR and DICOMweb APIs, called in-process through the whole
ASGI app with the signed-in user's bearer token: authorization, scopes, audit and every check
apply exactly as for any other client, and the console never reads the database itself."""

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx
from fastapi import Request

T = TypeVar("T")
TIMEOUT_S = 60.0
# httpx logs each request at INFO: the access log already has every in-process call, with its duration.
logging.getLogger("httpx").setLevel(logging.WARNING)


class ApiError(Exception):
    """An answer that was not a success: its status and the OperationOutcome's diagnostics."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.body = status, message, body


def outcome_text(body: Any, fallback: str) -> str:
    """The diagnostics (or details) of an OperationOutcome, else `fallback`."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        texts = [i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code", "")
                 for i in body.get("issue", [])]
        found = "; ".join(t for t in texts if t)
        if found:
            return found
    if isinstance(body, dict) and body.get("error_description"):
        return str(body["error_description"])
    return fallback


class Api:
    """One page's calls; `token` None sends no Authorization header (before sign-in)."""

    def __init__(self, request: Request, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=request.app, client=_peer(request)),
                                      base_url=str(request.base_url).rstrip("/"), headers=headers, timeout=TIMEOUT_S)

    async def __aenter__(self) -> "Api":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The raw answer, whatever its status."""
        return await self.http.request(method, checked_path(path), **kwargs)

    async def fhir(self, method: str, path: str, params: Any = None, json: Any = None, **kwargs: Any) -> dict[str, Any]:
        """A FHIR interaction's JSON; ApiError for anything but 2xx."""
        headers = {"Accept": "application/fhir+json", **kwargs.pop("headers", {})}
        if json is not None:
            headers["Content-Type"] = "application/fhir+json"
        answer = await self.http.request(method, checked_path(f"/fhir/{path.lstrip('/')}"), params=params,
                                         json=json, headers=headers, **kwargs)
        return checked(answer)

    async def read(self, path: str, params: Any = None) -> dict[str, Any]:
        return await self.fhir("GET", path, params)

    async def search(self, resource_type: str, params: Any) -> dict[str, Any]:
        """A search Bundle (GET)."""
        return await self.read(resource_type, params)

    async def count(self, resource_type: str, params: list[tuple[str, str]] | None = None) -> int:
        bundle = await self.read(resource_type, [*(params or []), ("_summary", "count")])
        return int(bundle.get("total", 0))


def checked_path(path: str) -> str:
    """A path built from what a page was given (ids, types) stays where it was meant to go: a
    `.` or `..` segment (which the client would resolve: `Patient/..` is `/fhir/`) or a
    backslash is refused (ApiError 400) rather than sent."""
    segments = path.split("?", 1)[0].split("/")
    if any(s in (".", "..") for s in segments) or "\\" in path or "%2f" in path.lower():
        raise ApiError(400, "Not a valid resource type, id or path.")
    return path


def checked(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json() if answer.content else {}
    except ValueError:
        body = None
    if answer.status_code >= 300:
        raise ApiError(answer.status_code, outcome_text(body, f"HTTP {answer.status_code}"), body)
    return body if isinstance(body, dict) else {}


def _peer(request: Request) -> tuple[str, int]:
    """The browser's address, so that the API's access log and audit trail name it."""
    return (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)


async def gather(*calls: Awaitable[T]) -> list[T | ApiError]:
    """Independent calls run together; a failed one is its ApiError (shown in place), others
    still answer."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, ApiError):
            raise result
    return list(results)  # type: ignore[arg-type]


def entries(bundle: dict[str, Any], mode: str | None = "match") -> list[dict[str, Any]]:
    """The resources of a search Bundle (of one search mode, or all with None)."""
    return [e["resource"] for e in bundle.get("entry", [])
            if "resource" in e and (mode is None or e.get("search", {}).get("mode", "match") == mode)]
