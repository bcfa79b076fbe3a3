"""The HTML page a mailed verification link opens."""

from __future__ import annotations

import html

from service.store import DEACTIVATION, GENERATION

# The pages' one inline style (middleware.PAGE_CSP allows it by its hash).
PAGE_STYLE = "body{font-family:sans-serif;max-width:36em;margin:4em auto;text-align:center}"

_PAGES = {
    GENERATION: (
        "Email verified",
        "Your new API key has been sent to {email}. Any key this email had before is now deactivated.",
    ),
    DEACTIVATION: (
        "API key deactivated",
        "The API key of {email} has been deactivated. A confirmation has been mailed.",
    ),
}


def verified(kind: str, email: str) -> str:
    title, text = _PAGES[kind]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title} · Heartify</title><style>{PAGE_STYLE}</style></head>"
        "<body>"
        f"<h1>{title}</h1><p>{text.format(email=html.escape(email))}</p>"
        "<p>You can close this page.</p></body></html>"
    )
