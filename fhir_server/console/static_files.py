"""The console's own static files, and the installed plotly package's bundled plotly.js (served
from the package, not copied here), each with a content-derived ETag and long caching."""

import hashlib
import mimetypes
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
VENDOR = {"plotly.min.js": ("plotly", "package_data/plotly.min.js")}


@lru_cache(maxsize=32)
def _load(package: str, path: str) -> tuple[bytes, str] | None:
    try:
        data = (resources.files(package) / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, ModuleNotFoundError):
        return None
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _send(request: Request, name: str, found: tuple[bytes, str] | None) -> Response:
    if found is None:
        return Response("Not found", 404, media_type="text/plain")
    data, etag = found
    headers = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    suffix = "." + name.rsplit(".", 1)[-1]
    media = TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response(data, media_type=media, headers=headers)


@router.get("/static/vendor/{name}")
async def vendor(request: Request, name: str) -> Response:
    package, path = VENDOR.get(name, ("", ""))
    return _send(request, name, _load(package, path) if package else None)


@router.get("/static/{name}")
async def static(request: Request, name: str) -> Response:
    if "/" in name or name.startswith("."):
        return Response("Not found", 404, media_type="text/plain")
    return _send(request, name, _load("fhir_server.console", f"static/{name}"))
