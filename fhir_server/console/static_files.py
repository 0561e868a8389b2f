"""The console's own static files, and the installed plotly package's bundled plotly.js (served
from the package, not copied here), each with a content-derived ETag and long caching."""

import hashlib
import mimetypes
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
VENDOR = {"plotly.min.js": ("plotly", "package_data/plotly.min.js")}
# plotly.js adds its stylesheet from script (a <style> element), which the server's
# Content-Security-Policy refuses: the same rules are read out of the installed bundle and served
# as a file. They are an object literal {"X .main-svg": "position:absolute;…", …}, X and Y
# standing for the plot's and the notifier's selectors.
STYLE_TABLE = re.compile(r'\{"X,X div":.*?\}', re.S)
STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''
STYLE_RULE = re.compile(rf"({STRING})\s*:\s*({STRING})")


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


def plotly_css(script: bytes) -> bytes:
    """The CSS rules plotly.js would inject, from its bundle (empty if they cannot be found)."""
    table = STYLE_TABLE.search(script.decode("utf-8", "replace"))
    rules = []
    for selector, style in STYLE_RULE.findall(table.group(0) if table else ""):
        selector = selector[1:-1].replace("X", ".js-plotly-plot .plotly").replace("Y", ".plotly-notifier")
        if selector.startswith(","):
            selector = " " + selector
        rules.append(f"{selector}{{{style[1:-1]}}}")
    return "\n".join(rules).encode()


@lru_cache(maxsize=1)
def _plotly_css() -> tuple[bytes, str] | None:
    script = _load("plotly", "package_data/plotly.min.js")
    if script is None:
        return None
    data = plotly_css(script[0])
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


@router.get("/static/vendor/plotly.css")
async def plotly_style(request: Request) -> Response:
    return _send(request, "plotly.css", _plotly_css())


@router.get("/static/vendor/{name}")
async def vendor(request: Request, name: str) -> Response:
    package, path = VENDOR.get(name, ("", ""))
    return _send(request, name, _load(package, path) if package else None)


@router.get("/static/{name}")
async def static(request: Request, name: str) -> Response:
    if "/" in name or name.startswith("."):
        return Response("Not found", 404, media_type="text/plain")
    return _send(request, name, _load("fhir_server.console", f"static/{name}"))
