"""Tests for rendering: variables, strict undefined, escaping, template lookup, header safety, fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from campaign.errors import HeaderError, InputFileError, ManifestError, TemplateError
from campaign.manifest import Manifest
from campaign.manifest._load import parse_manifest
from campaign.models import Address, Message, Recipient, Tracking
from campaign.render import Composer, build_composer
from campaign.unsubscribe import TokenClaims, verify_token

SECRETS = (b"render-test-secret-0123456789",)
UNSUBSCRIBE = """
[unsubscribe]
url = 'https://example.com/unsubscribe?t={{ unsubscribe_token }}'
mailto = "unsubscribe@example.com"
"""


def _manifest(
    folder: Path,
    *,
    files: dict[str, str],
    subject: str = "Hello {{ first_name }}",
    html: str | None = None,
    text: str | None = None,
    extra_message: str = "",
    unsubscribe: str = UNSUBSCRIBE,
    sender: str = 'email = "alice@example.com"\nfrom_name = "Alice Example"',
) -> Manifest:
    """Write `files` under `folder` and parse a manifest that uses them."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    bodies = "".join(f"{key} = {value!r}\n" for key, value in (("html", html), ("text", text)) if value)
    toml = f"""
[campaign]
name = "spring"

[recipients]
source = "recipients.csv"
name_column = "name"

[message]
subject = {subject!r}
{bodies}{extra_message}
{unsubscribe}
[[senders]]
name = "alice"
grant_id = "grant-1"
{sender}
"""
    return parse_manifest(toml, path=folder / "campaign.toml")


def _recipient(row: int = 3, *, name: str | None = "Ann Lee", **fields: str) -> Recipient:
    email = fields.pop("email", "ann@example.com")
    columns = {"email": email, "name": name or "", "first_name": "Ann", "city": "Oslo", **fields}
    return Recipient(key=email.lower(), row=row, address=Address(email, name), fields=columns)


def _render(manifest: Manifest, recipient: Recipient | None = None) -> Message:
    composer = build_composer(manifest, secrets=SECRETS if manifest.unsubscribe else None)
    return composer.render(recipient or _recipient(), manifest.senders[0])


def _composer(manifest: Manifest) -> Composer:
    return build_composer(manifest, secrets=SECRETS if manifest.unsubscribe else None)


# --- variables --------------------------------------------------------------------------------------------


def test_every_documented_variable_is_available(tmp_path):
    """Columns, recipient.*, sender.*, campaign.name and unsubscribe_* all render."""
    body = (
        "{{ first_name }}|{{ city }}|{{ recipient.email }}|{{ recipient.name }}|{{ recipient.key }}|"
        "{{ recipient.row }}|{{ sender.name }}|{{ sender.email }}|{{ sender.from_name }}|{{ campaign.name }}|"
        "{{ unsubscribe_token }}|{{ unsubscribe_url }}"
    )
    manifest = _manifest(tmp_path, files={"body.txt.j2": body}, text="body.txt.j2")
    message = _render(manifest)
    assert message.text is not None
    parts = message.text.split("|")
    token = parts[10]
    assert parts[:10] == [
        "Ann",
        "Oslo",
        "ann@example.com",
        "Ann Lee",
        "ann@example.com",
        "3",
        "alice",
        "alice@example.com",
        "Alice Example",
        "spring",
    ]
    assert verify_token(token, secrets=SECRETS) == TokenClaims("spring", "ann@example.com", 0)
    assert parts[11] == f"https://example.com/unsubscribe?t={token}"


def test_unsubscribe_headers_use_the_rendered_url(tmp_path):
    """List-Unsubscribe carries the rendered URL and the mailto, followed by the one-click header."""
    manifest = _manifest(tmp_path, files={"b.txt": "{{ unsubscribe_url }}"}, text="b.txt")
    message = _render(manifest)
    url = message.text
    headers = dict(message.headers)
    token = url.rsplit("=", 1)[1] if url else ""
    assert headers["List-Unsubscribe"] == (
        f"<{url}>, <mailto:unsubscribe@example.com?subject=unsubscribe-{token}>"
    )
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert [name for name, _ in message.headers][-2:] == ["List-Unsubscribe", "List-Unsubscribe-Post"]


def test_tokens_differ_per_recipient(tmp_path):
    """Two recipients get different unsubscribe URLs."""
    manifest = _manifest(tmp_path, files={"b.txt": "{{ unsubscribe_url }}"}, text="b.txt")
    composer = _composer(manifest)
    ann = composer.render(_recipient(email="ann@example.com"), manifest.senders[0])
    bob = composer.render(_recipient(email="bob@example.com"), manifest.senders[0])
    assert ann.text != bob.text


def test_without_unsubscribe_section_no_headers_and_url_undefined(tmp_path):
    """Without [unsubscribe] there are no List-* headers and `unsubscribe_url is defined` is false."""
    body = "{% if unsubscribe_url is defined %}has url{% else %}no url{% endif %}"
    manifest = _manifest(tmp_path, files={"b.txt": body}, text="b.txt", unsubscribe="")
    message = build_composer(manifest, secrets=None).render(_recipient(), manifest.senders[0])
    assert message.text == "no url"
    assert message.headers == ()


def test_unsubscribe_without_secret_is_a_manifest_error(tmp_path):
    """[unsubscribe] with no secrets names the environment variable to set."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt")
    with pytest.raises(ManifestError, match="CAMPAIGN_UNSUBSCRIBE_SECRET"):
        build_composer(manifest, secrets=None)


def test_builtin_names_win_over_columns(tmp_path):
    """A column called unsubscribe_url or recipient cannot replace the built-in values."""
    manifest = _manifest(tmp_path, files={"b.txt": "{{ unsubscribe_url }} {{ recipient.row }}"}, text="b.txt")
    message = _render(manifest, _recipient(unsubscribe_url="https://evil.example/", recipient="x"))
    assert message.text is not None
    assert message.text.startswith("https://example.com/unsubscribe?t=")
    assert message.text.endswith(" 3")


def test_missing_name_renders_empty_not_none(tmp_path):
    """A recipient without a name prints as nothing, not "None"."""
    manifest = _manifest(tmp_path, files={"b.txt": "Hi {{ recipient.name }}!"}, text="b.txt")
    assert _render(manifest, _recipient(name=None)).text == "Hi !"


# --- strict undefined -------------------------------------------------------------------------------------


def test_undefined_variable_names_row_template_and_variable(tmp_path):
    """A missing column is a TemplateError in the documented one-line form."""
    manifest = _manifest(
        tmp_path, files={"newsletter.html.j2": "<p>{{ nickname }}</p>"}, html="newsletter.html.j2"
    )
    with pytest.raises(TemplateError) as caught:
        _render(manifest)
    message = str(caught.value)
    assert message.startswith("row 3: template newsletter.html.j2 uses undefined variable 'nickname'")
    assert message.endswith("add the column or fix the template")
    assert "\n" not in message


URL_WITH_NICKNAME = "[unsubscribe]\nurl = 'https://example.com/{{ nickname }}/{{ unsubscribe_token }}'\n"


@pytest.mark.parametrize(
    ("toml", "label"),
    [
        ({"subject": "Hi {{ nickname }}"}, "message.subject"),
        ({"extra_message": "headers = { 'X-Foo' = '{{ nickname }}' }\n"}, "message.headers.X-Foo"),
        ({"unsubscribe": URL_WITH_NICKNAME}, "unsubscribe.url"),
    ],
)
def test_undefined_in_string_templates_names_the_manifest_key(tmp_path, toml, label):
    """Subject, custom header and unsubscribe URL templates are named by their manifest key."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", **toml)
    with pytest.raises(TemplateError, match=rf"^row 3: template {label} uses undefined variable 'nickname'"):
        _render(manifest)


def test_a_link_that_values_around_the_token_hide_is_that_rows_template_error(tmp_path):
    """A URL that names values besides the token is looked at for each row, even when it renders well
    without them (`| default`): the row whose value glues itself to the token is a TemplateError naming
    the row and unsubscribe.url, and the row without it renders."""
    url = "[unsubscribe]\nurl = 'https://example.com/u?t={{ ref | default(\"\") }}{{ unsubscribe_token }}'\n"
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", unsubscribe=url)
    composer = _composer(manifest)
    assert composer.render(_recipient(), manifest.senders[0]).unsubscribe_url is not None
    with pytest.raises(TemplateError) as caught:
        composer.render(_recipient(4, ref="R-"), manifest.senders[0])
    assert (caught.value.row, caught.value.field) == (4, "unsubscribe.url")
    assert str(caught.value).startswith("row 4: unsubscribe.url renders a link without the recipient's token")


def test_undefined_in_parent_template_names_parent_and_line(tmp_path):
    """An undefined variable in an extended template names that template and its line."""
    files = {
        "layout.html": "<html>\n<body>\n{% block content %}{% endblock %}\n{{ footer_note }}\n</body></html>",
        "page.html": '{% extends "layout.html" %}{% block content %}{{ first_name }}{% endblock %}',
    }
    manifest = _manifest(tmp_path, files=files, html="page.html")
    with pytest.raises(
        TemplateError, match=r"template layout\.html uses undefined variable 'footer_note' at line 4"
    ):
        _render(manifest)


def test_undefined_attribute_is_reported(tmp_path):
    """A missing attribute of a built-in dict names the attribute."""
    manifest = _manifest(tmp_path, files={"b.txt": "{{ recipient.nickname }}"}, text="b.txt")
    with pytest.raises(TemplateError, match=r"row 3: template b\.txt uses undefined attribute 'nickname'"):
        _render(manifest)


def test_runtime_error_in_template_names_row_and_template(tmp_path):
    """An expression that fails (string + int) becomes a TemplateError naming the template."""
    manifest = _manifest(tmp_path, files={"b.txt": "{{ city + 1 }}"}, text="b.txt")
    with pytest.raises(TemplateError, match=r"row 3: template b\.txt failed at line 1: TypeError"):
        _render(manifest)


def test_sandbox_blocks_mutation_and_keeps_render_pure(tmp_path):
    """Templates cannot mutate shared values; rendering twice gives equal messages."""
    manifest = _manifest(tmp_path, files={"b.txt": "{{ campaign.update(name='x') }}"}, text="b.txt")
    with pytest.raises(TemplateError, match="unsafe"):
        _render(manifest)
    manifest = _manifest(tmp_path, files={"c.txt": "{{ first_name }} {{ campaign.name }}"}, text="c.txt")
    composer = _composer(manifest)
    assert composer.render(_recipient(), manifest.senders[0]) == composer.render(
        _recipient(), manifest.senders[0]
    )


# --- escaping ---------------------------------------------------------------------------------------------


def test_html_template_escapes_and_text_template_does_not(tmp_path):
    """A `<script>` name is escaped in the .html.j2 body and left as is in the .txt.j2 body and subject."""
    files = {"b.html.j2": "<p>{{ recipient.name }}</p>", "b.txt.j2": "{{ recipient.name }}"}
    manifest = _manifest(
        tmp_path, files=files, html="b.html.j2", text="b.txt.j2", subject="For {{ recipient.name }}"
    )
    evil = "<script>alert(1)</script>"
    message = _render(manifest, _recipient(name=evil))
    assert message.html == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert message.text == evil
    assert message.subject == f"For {evil}"


def test_message_html_is_escaped_whatever_its_file_name(tmp_path):
    """The message.html template is autoescaped even when its name does not end in .html."""
    manifest = _manifest(tmp_path, files={"body.j2": "{{ recipient.name }}"}, html="body.j2")
    assert _render(manifest, _recipient(name="<b>x</b>")).html == "&lt;b&gt;x&lt;/b&gt;"


EVIL = "<script>alert(1)</script> [x](https://evil) # h"
EVIL_HTML = "&lt;script&gt;alert(1)&lt;/script&gt; [x](https://evil) # h"


def test_templates_an_html_body_reaches_are_escaped_whatever_their_file_names(tmp_path):
    """A .j2 layout it extends, a .j2 partial it includes (by a literal or a computed name), a macro it
    imports: each prints a list value escaped, as the body itself does."""
    files = {
        "layout.j2": "<h1>Layout: {{ first_name }}</h1>{% block body %}{% endblock %}",
        "greeting.j2": "<p>Included: {{ first_name }}</p>",
        "computed.j2": "<p>Computed: {{ first_name }}</p>",
        "macros.j2": "{% macro show(value) %}<p>Macro: {{ value }}</p>{% endmacro %}",
        "body.html.j2": '{% extends "layout.j2" %}{% import "macros.j2" as m %}{% block body %}'
        '<p>Child: {{ first_name }}</p>{% include "greeting.j2" %}{% include part %}'
        "{{ m.show(first_name) }}{% endblock %}",
    }
    manifest = _manifest(tmp_path, files=files, html="body.html.j2")
    html = _render(manifest, _recipient(first_name=EVIL, part="computed.j2")).html
    assert html == (
        f"<h1>Layout: {EVIL_HTML}</h1><p>Child: {EVIL_HTML}</p><p>Included: {EVIL_HTML}</p>"
        f"<p>Computed: {EVIL_HTML}</p><p>Macro: {EVIL_HTML}</p>"
    )


def test_a_partial_shared_by_the_text_and_html_bodies_is_escaped_in_the_html_only(tmp_path):
    """Jinja compiles a name once per environment: each body has its own, so one file prints both ways."""
    files = {
        "greeting.j2": "Hi {{ first_name }}",
        "body.html.j2": '<p>{% include "greeting.j2" %}</p>',
        "body.txt.j2": '{% include "greeting.j2" %}!',
    }
    manifest = _manifest(
        tmp_path, files=files, html="body.html.j2", text="body.txt.j2", subject="For {{ first_name }}"
    )
    message = _render(manifest, _recipient(first_name=EVIL))
    assert message.html == f"<p>Hi {EVIL_HTML}</p>"
    assert message.text == f"Hi {EVIL}!"
    assert message.subject == f"For {EVIL}"


# --- template lookup --------------------------------------------------------------------------------------


def test_extends_and_include_from_the_campaign_folder(tmp_path):
    """Templates extend and include files relative to the manifest's folder, including subfolders."""
    files = {
        "parts/layout.html": "[{% block content %}{% endblock %}]{% include 'parts/footer.html' %}",
        "parts/footer.html": "<i>{{ campaign.name }}</i>",
        "templates/mail.html": "{% extends 'parts/layout.html' %}"
        "{% block content %}{{ first_name }}{% endblock %}",
    }
    manifest = _manifest(tmp_path, files=files, html="templates/mail.html")
    assert _render(manifest).html == "[Ann]<i>spring</i>"


def test_extends_builtin_base_template(tmp_path):
    """A campaign template can extend templates/base.html.j2 shipped with campaign."""
    page = '{% extends "base.html.j2" %}{% block content %}<p>Hi {{ first_name }}</p>{% endblock %}'
    manifest = _manifest(tmp_path, files={"page.html.j2": page}, html="page.html.j2")
    html = _render(manifest).html
    assert html is not None
    assert "<p>Hi Ann</p>" in html
    assert "Alice Example" in html
    assert 'href="https://example.com/unsubscribe?t=' in html


def test_campaign_folder_shadows_builtin_templates(tmp_path):
    """A base.html.j2 in the campaign folder is used instead of the built-in one."""
    files = {
        "base.html.j2": "mine:{% block content %}{% endblock %}",
        "page.html.j2": '{% extends "base.html.j2" %}{% block content %}{{ first_name }}{% endblock %}',
    }
    manifest = _manifest(tmp_path, files=files, html="page.html.j2")
    assert _render(manifest).html == "mine:Ann"


def test_template_outside_the_campaign_folder(tmp_path):
    """message.html may point outside the manifest's folder (../shared/x.html)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.html").write_text("<b>{{ first_name }}</b>", encoding="utf-8")
    campaign = tmp_path / "campaign"
    campaign.mkdir()
    manifest = _manifest(campaign, files={}, html="../shared/x.html")
    assert _render(manifest).html == "<b>Ann</b>"


def test_missing_template_file_names_key_and_path(tmp_path):
    """A missing body template is an InputFileError naming the manifest key and the path."""
    manifest = _manifest(tmp_path, files={}, text="nope.txt.j2")
    with pytest.raises(InputFileError, match=r"message\.text: .*nope\.txt\.j2"):
        _composer(manifest)


def test_syntax_error_names_file_and_line(tmp_path):
    """A syntax error in a body template is a TemplateError naming the file and line at build time."""
    manifest = _manifest(tmp_path, files={"b.html": "ok\n\n{% if %}\n"}, html="b.html")
    with pytest.raises(TemplateError, match=r"template b\.html line 3: syntax error"):
        _composer(manifest)


def test_syntax_error_in_included_template_found_at_build(tmp_path):
    """A syntax error in an included template is reported before any row is rendered."""
    files = {"b.html": "{% include 'part.html' %}", "part.html": "line one\n{{ oops }"}
    manifest = _manifest(tmp_path, files=files, html="b.html")
    with pytest.raises(TemplateError, match=r"template part\.html line 2: syntax error"):
        _composer(manifest)


def test_missing_included_template_found_at_build(tmp_path):
    """Extending a template that exists nowhere is reported at build time, naming both templates."""
    manifest = _manifest(tmp_path, files={"b.html": "{% extends 'nowhere.html' %}"}, html="b.html")
    with pytest.raises(TemplateError, match=r"template b\.html refers to 'nowhere\.html'"):
        _composer(manifest)


def test_subject_syntax_error_names_the_key(tmp_path):
    """A broken subject template is a TemplateError naming message.subject."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", subject="Hi {{ first_name ")
    with pytest.raises(TemplateError, match=r"^message\.subject: template syntax error"):
        _composer(manifest)


# --- header safety ----------------------------------------------------------------------------------------

INJECTION = "x\r\nBcc: victim@example.com"


def test_subject_injection_through_a_column(tmp_path):
    """CR/LF reaching the subject from a column is a HeaderError naming row and field."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", subject="Hi {{ city }} and more")
    with pytest.raises(HeaderError, match=r"^row 3: message\.subject contains a carriage return"):
        _render(manifest, _recipient(city=INJECTION))


def test_recipient_name_injection(tmp_path):
    """CR/LF in the recipient's display name is a HeaderError naming row and the name column."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt")
    with pytest.raises(HeaderError, match=r"^row 3: the recipient name \(column 'name'\) contains"):
        _render(manifest, _recipient(name=INJECTION))


def test_custom_header_value_injection(tmp_path):
    """CR/LF reaching a custom header value is a HeaderError naming row and header."""
    manifest = _manifest(
        tmp_path, files={"b.txt": "x"}, text="b.txt", extra_message="headers = { 'X-City' = '{{ city }}' }\n"
    )
    with pytest.raises(HeaderError, match=r"^row 3: message\.headers\.X-City contains a carriage return"):
        _render(manifest, _recipient(city=INJECTION))


def test_unicode_line_separator_is_refused_in_subject(tmp_path):
    """U+2028 (a line break for Python's email package) is refused in the subject too."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", subject="Hi {{ city }}")
    with pytest.raises(HeaderError, match=r"^row 3: message\.subject"):
        _render(manifest, _recipient(city="a\u2028b"))


def test_reply_to_injection_names_field_and_row(tmp_path):
    """A reply_to with CR/LF that slipped past the manifest is refused for the row, naming the field."""
    manifest = _manifest(
        tmp_path, files={"b.txt": "x"}, text="b.txt", extra_message='reply_to = "s@example.com"\n'
    )
    forged = manifest.model_copy(
        update={
            "message": manifest.message.model_copy(update={"reply_to": "s@example.com\r\nBcc: v@example.com"})
        }
    )
    with pytest.raises(HeaderError, match=r"^row 3: message\.reply_to contains"):
        _render(forged)


def test_sender_from_name_injection_names_sender_and_row(tmp_path):
    """A from_name with LF that slipped past the manifest is refused for the row, naming the sender."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt")
    sender = manifest.senders[0].model_copy(update={"from_name": "Alice\nBcc: v@example.com"})
    with pytest.raises(HeaderError, match=r"^row 3: senders 'alice' from_name contains a line feed"):
        _composer(manifest).render(_recipient(), sender)


def test_unsubscribe_url_rendered_unsafe_is_refused(tmp_path):
    """A URL made unsafe by a column (a space, a fragment) is a HeaderError naming the row."""
    unsubscribe = "[unsubscribe]\nurl = 'https://example.com/{{ city }}?t={{ unsubscribe_token }}'\n"
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", unsubscribe=unsubscribe)
    with pytest.raises(HeaderError, match=r"^row 3: .*unsubscribe\.url .*whitespace"):
        _render(manifest, _recipient(city="New York"))


def test_empty_subject_is_refused(tmp_path):
    """A subject that renders to whitespace only is a TemplateError for the row."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", subject="{{ nothing_here }}")
    with pytest.raises(TemplateError, match=r"^row 3: message\.subject renders empty"):
        _render(manifest, _recipient(nothing_here="   "))


def test_subject_is_stripped(tmp_path):
    """Surrounding whitespace (from a column) is stripped from the subject."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", subject="{{ city }}")
    assert _render(manifest, _recipient(city="  Oslo news \n")).subject == "Oslo news"


# --- Message fields ---------------------------------------------------------------------------------------


def test_message_fields(tmp_path):
    """to, from_, reply_to, metadata, tracking, custom headers and bodies land in the Message."""
    extra = (
        'reply_to = "Support@Example.com"\n'
        "tracking = { opens = true, links = false, thread_replies = true, label = 'spring' }\n"
        "headers = { 'X-Campaign' = 'spring', 'X-Row' = '{{ recipient.row }}' }\n"
    )
    files = {"b.html": "<p>{{ first_name }}</p>", "b.txt": "{{ first_name }}"}
    manifest = _manifest(tmp_path, files=files, html="b.html", text="b.txt", extra_message=extra)
    message = _render(manifest)
    assert message.recipient_key == "ann@example.com"
    assert message.row == 3
    assert message.sender == "alice"
    assert message.to == (Address("ann@example.com", "Ann Lee"),)
    assert message.subject == "Hello Ann"
    assert (message.html, message.text) == ("<p>Ann</p>", "Ann")
    assert message.from_ == Address("alice@example.com", "Alice Example")
    assert message.reply_to == (Address(manifest.message.reply_to or ""),)
    assert message.reply_to[0].email.lower() == "support@example.com"
    assert message.metadata == (
        ("key1", "spring"),
        ("key2", "ann@example.com"),
        ("campaign", "spring"),
        ("recipient", "ann@example.com"),
    )
    # With reply tracking the label names campaign, recipient and step (thread.replied carries only it).
    label = "spring:ann@example.com:message"
    assert message.tracking == Tracking(opens=True, links=False, thread_replies=True, label=label)
    assert [name for name, _ in message.headers] == [
        "X-Campaign",
        "X-Row",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    ]
    assert message.headers[:2] == (("X-Campaign", "spring"), ("X-Row", "3"))


def test_from_is_none_without_from_name(tmp_path):
    """Without a from_name the message has no From override (Nylas uses the grant's address)."""
    manifest = _manifest(tmp_path, files={"b.txt": "x"}, text="b.txt", sender='email = "alice@example.com"')
    message = _render(manifest)
    assert message.from_ is None
    assert message.reply_to == ()
    assert message.tracking is None


def test_text_only_message_has_no_html(tmp_path):
    """A text-only campaign renders Message.text and leaves html None."""
    manifest = _manifest(tmp_path, files={"b.txt": "plain {{ first_name }}\n"}, text="b.txt")
    message = _render(manifest)
    assert (message.html, message.text) == (None, "plain Ann\n")


def test_composer_serves_several_senders(tmp_path):
    """Each sender's own name and From are used; the per-sender cache does not leak between them."""
    manifest = _manifest(tmp_path, files={"b.txt": "{{ sender.name }}"}, text="b.txt")
    alice = manifest.senders[0]
    bob = alice.model_copy(update={"name": "bob", "email": "bob@example.com", "from_name": "Bob"})
    composer = _composer(manifest)
    assert composer.render(_recipient(), alice).text == "alice"
    message = composer.render(_recipient(), bob)
    assert (message.text, message.sender, message.from_) == ("bob", "bob", Address("bob@example.com", "Bob"))
