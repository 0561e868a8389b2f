"""Plain server-rendered HTML for the login pages: no script, labelled fields, every piece of
user data escaped, and headers that keep the pages out of caches and frames."""

from collections.abc import Iterable, Mapping
from html import escape

from fastapi import Request
from fastapi.responses import HTMLResponse

MAX_FORM_BYTES = 16 * 1024
HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the pages' URLs may hold a mailed link's token
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
}
STYLE = """body{font-family:system-ui,sans-serif;max-width:32rem;margin:2rem auto;padding:0 1rem;line-height:1.5}
label{display:block;margin-top:1rem;font-weight:600}input{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}
button{margin-top:1.5rem;padding:.6rem 1.2rem;font-size:1rem}.error{color:#a00;border-left:4px solid #a00;padding-left:.5rem}
:focus{outline:3px solid #1a5fb4;outline-offset:2px}code{word-break:break-all}"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    """A whole page; `body` must be HTML already escaped."""
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
            f"<body><main><h1>{escape(title)}</h1>{body}</main></body></html>")
    return HTMLResponse(html, status, headers=HEADERS)


def message(title: str, text: str, status: int = 200) -> HTMLResponse:
    return page(title, f"<p>{escape(text)}</p>", status)


def error(text: str | None) -> str:
    """The form's error, read out by screen readers as it appears."""
    return f'<p class="error" role="alert" id="form-error">{escape(text)}</p>' if text else ""


def hidden(fields: Mapping[str, str]) -> str:
    return "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items())


def field(name: str, label: str, kind: str = "text", value: str = "", autocomplete: str = "", hint: str = "",
          failed: bool = False) -> str:
    """A labelled input; `failed` points it at the form's error."""
    described = " ".join(x for x in (f"{name}-hint" if hint else "", "form-error" if failed else "") if x)
    attributes = f' aria-describedby="{described}"' if described else ""
    attributes += ' aria-invalid="true"' if failed else ""
    attributes += f' autocomplete="{autocomplete}"' if autocomplete else ""
    shown = f' value="{escape(value)}"' if value and kind != "password" else ""
    help_text = f'<small id="{name}-hint">{escape(hint)}</small>' if hint else ""
    return (f'<label for="{name}">{escape(label)}</label>'
            f'<input id="{name}" name="{name}" type="{kind}" required{shown}{attributes}>{help_text}')


def form(action: str, inner: str, button: str, extra_buttons: Iterable[str] = ()) -> str:
    buttons = "".join(extra_buttons)
    return (f'<form method="post" action="{escape(action)}">{inner}'
            f'<button type="submit">{escape(button)}</button>{buttons}</form>')


async def form_items(request: Request, limit: int = MAX_FORM_BYTES) -> list[tuple[str, str]] | None:
    """A posted form's fields in order (application/x-www-form-urlencoded, at most `limit`
    bytes), or None for another body."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return None
    if len(await request.body()) > limit:
        return None
    return [(name, str(value)) for name, value in (await request.form()).multi_items()]


async def form_fields(request: Request) -> dict[str, str] | None:
    """The fields of a posted form (first value of each), or None for something else."""
    items = await form_items(request)
    if items is None:
        return None
    fields: dict[str, str] = {}
    for name, value in items:
        fields.setdefault(name, value)
    return fields
