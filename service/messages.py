"""What the mails say: the link and key mails, as HTML with a plain-text part."""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

PRODUCT = "Heartify Denoising API"
LINK_TTL = timedelta(hours=24)  # how long a mailed link works, as the mails say
LINK_LIFE = f"The link works once and expires in {LINK_TTL.total_seconds() / 3600:g} hours."


@dataclass(frozen=True)
class Mail:
    recipient: str
    subject: str
    text: str
    html: str


def _page(title: str, *paragraphs: str) -> str:
    """Minimal HTML body; paragraphs are already-escaped HTML."""
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
        f'<body style="font-family:sans-serif;max-width:36em;margin:auto">'
        f"<h2>{html.escape(title)}</h2>{body}</body></html>"
    )


def _link_mail(email: str, link: str, subject: str, action: str, ignore: str) -> Mail:
    text = f"{action}, open this link:\n\n{link}\n\n{LINK_LIFE} {ignore}\n\n-- {PRODUCT}\n"
    href = html.escape(link)
    body = _page(
        subject,
        f"{html.escape(action)}, open this link:",
        f'<a href="{href}">{href}</a>',
        f"{LINK_LIFE} {html.escape(ignore)}",
    )
    return Mail(email, f"{PRODUCT}: {subject}", text, body)


def key_request_mail(email: str, link: str) -> Mail:
    return _link_mail(
        email,
        link,
        "verify your email",
        "To verify your email and receive your API key",
        "If you did not ask for a key, ignore this mail.",
    )


def deactivation_request_mail(email: str, link: str) -> Mail:
    return _link_mail(
        email,
        link,
        "confirm API key deactivation",
        "To deactivate your API key",
        "If you did not ask for this, ignore this mail and your key keeps working.",
    )


def new_key_mail(email: str, key: str) -> Mail:
    text = (
        f"Your API key: {key}\n\n"
        "Send it in the x-api-key header of every denoising request. Keep it secret: we store "
        "only its hash and cannot show it again. Any key you had before is now deactivated.\n\n"
        f"-- {PRODUCT}\n"
    )
    body = _page(
        "your API key",
        f"Your API key: <code>{html.escape(key)}</code>",
        "Send it in the <code>x-api-key</code> header of every denoising request. Keep it secret: "
        "we store only its hash and cannot show it again. Any key you had before is now deactivated.",
    )
    return Mail(email, f"{PRODUCT}: your API key", text, body)


def deactivated_mail(email: str) -> Mail:
    text = f"Your API key has been deactivated. You can request a new one at any time.\n\n-- {PRODUCT}\n"
    body = _page("API key deactivated", "Your API key has been deactivated. You can request a new one at any time.")
    return Mail(email, f"{PRODUCT}: API key deactivated", text, body)


def compose(mail: Mail, sender: str) -> EmailMessage:
    """multipart/alternative: the plain-text part first, the HTML part preferred by readers."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = mail.recipient
    message["Subject"] = mail.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain="heartify.local")
    message.set_content(mail.text)
    message.add_alternative(mail.html, subtype="html")
    return message
