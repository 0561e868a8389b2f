"""Raw FHIR JSON as escaped HTML, indented as `json.dumps` would, with each reference to a
resource (`Type/id`, relative or under this server's FHIR base, or a Binary's url) a link to
the resource browser. Pure."""

import json
import re
from html import escape
from typing import Any

from markupsafe import Markup

from fhir_server.console.session import PREFIX

REFERENCE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(/_history/[0-9]{1,12})?")
LINKED_KEYS = frozenset({"reference", "url", "fullUrl"})


def target(text: str, base: str) -> str | None:
    """The console address of a reference, or None for anything else."""
    local = text.removeprefix(base.rstrip("/") + "/") if base and text.startswith(base) else text
    if REFERENCE.fullmatch(local):
        return f"{PREFIX}/browse/{local}"
    return None


def _string(value: str, key: str | None, base: str) -> str:
    shown = escape(json.dumps(value, ensure_ascii=False))
    link = target(value, base) if key in LINKED_KEYS else None
    return f'<a href="{escape(link)}">{shown}</a>' if link else shown


def _render(value: Any, key: str | None, base: str, depth: int) -> str:
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{escape(json.dumps(k))}: {_render(v, k, base, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + ",\n".join(f"{inner}{_render(v, key, base, depth + 1)}" for v in value) + f"\n{pad}]"
    if isinstance(value, str):
        return _string(value, key, base)
    return escape(json.dumps(value))


def to_html(value: Any, base: str = "") -> Markup:
    return Markup(_render(value, None, base, 0))
