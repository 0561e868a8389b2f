"""Search paging carried through console URLs: the `_page` token of a Bundle's next/previous
link (the server's snapshot of the search) becomes the console page's `page` parameter."""

from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit


def page_token(url: str) -> str | None:
    values = parse_qs(urlsplit(url).query).get("_page")
    return values[0] if values else None


def links(bundle: dict[str, Any], path: str, params: dict[str, str]) -> dict[str, str]:
    """Console URLs of the Bundle's previous and next pages (`path` with `params` and `page`)."""
    found = {}
    for link in bundle.get("link", []):
        if link.get("relation") in ("next", "previous"):
            token = page_token(link.get("url", ""))
            kept = {k: v for k, v in params.items() if v and k != "page"}
            found[link["relation"]] = f"{path}?{urlencode({**kept, 'page': token} if token else kept)}"
    return found
