"""Unsubscribe compliance beyond the headers: provider quirks and bulk-sender rules, checked before sending.

Microsoft Graph and iCloud grants drop `List-Unsubscribe` custom headers, so for their
senders the body's link is the only unsubscribe that works: `check_body_link`
makes it required (unless `unsubscribe.require_body_link = false`).
`build_unsubscribe_warnings` lists what `preview` warns about: those senders, a domain
over Gmail's 5,000-a-day bulk line without one-click, no `mailto:` (Outlook.com acts
only on it), an unsubscribe host off the sending domain, a store not yet created.
Pure, except that it notices whether a configured store file exists; it never sends.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit

from markupsafe import escape

from campaign.errors import TemplateError
from campaign.manifest import HEADERLESS_PROVIDERS, Manifest, SenderSettings
from campaign.models import Message
from campaign.plan import daily_capacity
from campaign.unsubscribe import list_store_paths, store_exists

__all__ = [
    "BULK_SENDER_PER_DAY",
    "HEADERLESS_PROVIDERS",
    "build_unsubscribe_warnings",
    "check_body_link",
    "has_body_link",
    "needs_body_link",
]

# Gmail: a bulk sender sends close to 5,000 or more messages a day to personal accounts, per domain.
BULK_SENDER_PER_DAY = 5000
_HREF = re.compile(r"""\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)
# How far before a printed URL its `href="` is looked for (room for spaces around the "=").
_LOOK_BACK = 40
_ESCAPED = re.compile("[&<>\"']")  # what autoescaping changes (markupsafe.escape)
# Two-letter country domains whose registrations sit one level down (example.co.uk).
_SECOND_LEVEL = re.compile(r"^(?:co|com|org|net|ac|gov|edu|ne|or)$")


def has_body_link(message: Message, url: str) -> bool:
    """Whether the message body links to `url`: an HTML body with an href whose value is `url` (wherever
    `href=` stands: this reads no HTML structure), or a text-only body holding the URL."""
    body = message.html
    if body is None:
        return message.text is not None and url in message.text
    return _href_where_printed(body, url) or any(_links_to(match, url) for match in _hrefs(body))


def _href_where_printed(body: str, url: str) -> bool:
    """Whether an href just before where `url` is printed (autoescaped, as a template prints it, or as
    is) holds it: one search for the URL instead of reading every href, which cost a Microsoft
    sender's message a third of its check. False leaves it to reading every href (other spellings)."""
    spellings = (str(escape(url)), url) if _ESCAPED.search(url) else (url,)
    for printed in spellings:
        at = body.find(printed)
        while at >= 0:
            start = max(0, at - _LOOK_BACK)
            before = body[start:at].lower()
            found = before.rfind("href")
            if found >= 0 and len(before) == at - start:  # else a lower case changed the positions
                match = _HREF.match(body, start + found)
                if match is not None and _links_to(match, url):
                    return True
            at = body.find(printed, at + 1)
    return False


def _hrefs(body: str) -> Iterator[re.Match[str]]:
    r"""Every match of `_HREF` in `body`, wherever one starts (one inside another's value too), tried only
    where "href" is: the pattern's case-insensitive `\b` made the engine's own scan most of a check's
    time (47 µs a message, against 4)."""
    lower = body.lower()
    if len(lower) != len(body):  # a character whose lower case is longer: positions would not match
        at = 0
        while (match := _HREF.search(body, at)) is not None:
            yield match
            at = match.start() + 1
        return
    at = 0
    while (at := lower.find("href", at)) >= 0:
        match = _HREF.match(body, at)
        if match is not None:
            yield match
        at += 1


def _links_to(match: re.Match[str], url: str) -> bool:
    target = match[match.lastindex or 0]  # the one quoting alternative that matched
    return html.unescape(target).strip() == url


def needs_body_link(manifest: Manifest, sender: SenderSettings) -> bool:
    """Whether `sender`'s messages must link to unsubscribe in their body: it is a Microsoft/iCloud
    sender (no List-Unsubscribe headers) of a campaign with [unsubscribe] and `require_body_link`."""
    settings = manifest.unsubscribe
    return settings is not None and settings.require_body_link and sender.provider in HEADERLESS_PROVIDERS


def check_body_link(manifest: Manifest, message: Message, sender: SenderSettings) -> None:
    """Raise TemplateError when a Microsoft/iCloud sender's message (from `sender`) has no unsubscribe
    link in its body.

    Nothing is checked without [unsubscribe], for other senders, or when `require_body_link` is false.
    """
    if not needs_body_link(manifest, sender):
        return
    url = message.unsubscribe_url
    if url is None or has_body_link(message, url):
        return
    body = "HTML body" if message.html is not None else "text body"
    link = '<a href="{{ unsubscribe_url }}">' if message.html is not None else "{{ unsubscribe_url }}"
    raise TemplateError(
        f"sender {message.sender!r} (provider {sender.provider}) sends no List-Unsubscribe "
        f"headers (its provider does not take them), so the {body} must link to unsubscribe_url; "
        f"add {link} (templates/base.html.j2 has one in its footer) or set "
        "unsubscribe.require_body_link = false",
        row=message.row,
    )


def build_unsubscribe_warnings(manifest: Manifest, per_sender: Mapping[str, int]) -> tuple[str, ...]:
    """What preview should warn about unsubscribing, given how many messages each sender has to send."""
    settings = manifest.unsubscribe
    found: list[str] = []
    active = [sender for sender in manifest.senders if per_sender.get(sender.name, 0) > 0]
    if settings is not None:
        for sender in active:
            if sender.provider in HEADERLESS_PROVIDERS:
                off = "" if settings.require_body_link else " (unsubscribe.require_body_link is off)"
                found.append(
                    f"sender {sender.name!r} (provider {sender.provider}) sends no List-Unsubscribe headers: "
                    f"only the unsubscribe link in the body works for its messages{off}"
                )
    found.extend(_bulk_warnings(manifest, active, per_sender))
    if settings is not None and settings.mailto is None:
        found.append(
            "unsubscribe.mailto is not set: Outlook.com acts only on a mailto: unsubscribe; "
            'add one, e.g. mailto = "unsubscribe@your-domain"'
        )
    if (
        settings is not None
        and settings.mailto is not None
        and not _read_by_a_pull(manifest, settings.mailto)
    ):
        found.append(
            f"unsubscribe.mailto {settings.mailto} is not the address of a sender with a grant, so no "
            "command reads the unsubscribe requests mailed to it: read that mailbox and record them with "
            "`campaign suppress add`, or set mailto to a sender's address (`campaign events pull` and "
            "runs with follow-ups then record them)"
        )
    if settings is not None:
        found.extend(_host_warnings(settings.url, active))
    for path in list_store_paths(manifest):
        if not store_exists(path):
            found.append(
                f"unsubscribe store {path} does not exist yet, so it suppresses no one; it is created "
                "when `campaign unsubscribe serve --store` starts or by `campaign suppress add`"
            )
    if settings is not None and not list_store_paths(manifest):
        found.append(
            "no unsubscribe store is read back: set unsubscribe.store to the store your endpoint "
            "writes (`campaign unsubscribe serve --store …`) so unsubscribes are honoured"
        )
    return tuple(found)


def _read_by_a_pull(manifest: Manifest, mailto: str) -> bool:
    """Whether requests mailed to `mailto` land in an inbox `campaign events pull` walks: a grant's."""
    return any(
        sender.grant_id is not None and sender.email is not None and sender.email.lower() == mailto.lower()
        for sender in manifest.senders
    )


def _bulk_warnings(
    manifest: Manifest, active: list[SenderSettings], per_sender: Mapping[str, int]
) -> list[str]:
    """Domains that send more than the bulk line in a day while some of their messages lack one-click."""
    per_domain: dict[str, list[SenderSettings]] = {}
    for sender in active:
        if sender.email is not None:
            per_domain.setdefault(_domain(sender.email), []).append(sender)
    found: list[str] = []
    for domain, senders in per_domain.items():
        a_day = sum(min(float(per_sender[s.name]), daily_capacity(s)) for s in senders)
        if a_day <= BULK_SENDER_PER_DAY:
            continue
        if manifest.unsubscribe is None:
            why = "add an [unsubscribe] section"
        else:
            headerless = [s.name for s in senders if s.provider in HEADERLESS_PROVIDERS]
            if not headerless:
                continue
            why = f"senders {', '.join(headerless)} (Microsoft/iCloud) cannot carry the one-click header"
        found.append(
            f"{domain} would send about {int(a_day):,} messages a day, over Gmail's "
            f"{BULK_SENDER_PER_DAY:,}-a-day bulk-sender line, not all with one-click unsubscribe: {why}"
        )
    return found


def _host_warnings(url_template: str, active: list[SenderSettings]) -> list[str]:
    """The unsubscribe URL's host, when it is not under the domain of a sender that has messages."""
    literal = url_template.split("{", 1)[0]
    # The host is known only when the literal part goes past it (a template may supply the host).
    complete = literal == url_template or any(c in literal.removeprefix("https://") for c in "/?#:")
    host = urlsplit(literal).hostname if complete else None
    if not host:
        return []  # the host itself comes from a template variable: nothing to compare
    domains = sorted({_domain(s.email) for s in active if s.email is not None})
    foreign = [domain for domain in domains if _organisation(domain) != _organisation(host)]
    if not foreign:
        return []
    return [
        f"the unsubscribe URL's host {host} is not under the sending domain {', '.join(foreign)}: "
        "receivers and readers trust a link on the sender's own domain; serve the endpoint from "
        f"e.g. unsubscribe.{foreign[0]}"
    ]


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _organisation(host: str) -> str:
    """The registrable part of a host name, approximately (example.com, example.co.uk)."""
    labels = host.lower().rstrip(".").split(".")
    keep = 3 if len(labels) >= 3 and len(labels[-1]) == 2 and _SECOND_LEVEL.match(labels[-2]) else 2
    return ".".join(labels[-keep:])
