"""Jinja's work done once per template instead of once per row prints exactly what Jinja prints.

`campaign.render._templating` has two shortcuts, each decided when the composer is built:
`stack_inheritance` resolves a static `{% extends %}` chain (text, one `{% extends "name" %}`,
blocks), and `render_template` renders the top template with every block stacked as Jinja's own
`{% extends %}` code would stack them; `find_substitution` finds a template of text and `{{ name }}`s
only, which `Substitution.render` prints without a Context or a generator. These tests compare both
with Jinja on generated templates, check what is left to Jinja, and check the fallbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from campaign.errors import TemplateError
from campaign.manifest._load import parse_manifest
from campaign.models import Address, Recipient
from campaign.render import _templating as templating
from campaign.render import build_composer
from campaign.render._templating import (
    Escaping,
    Inheritance,
    build_environment,
    find_substitution,
    render_template,
    stack_inheritance,
)

MANIFEST = """
[campaign]
name = "spring"

[recipients]
source = "recipients.csv"

[message]
subject = "Hello"
html = "spring.html.j2"

[unsubscribe]
url = "https://example.com/unsubscribe?t={{ unsubscribe_token }}"

[[senders]]
name = "alice"
grant_id = "grant-1"
email = "alice@example.com"
"""
VALUES = {"v": "<b>'Ann' & \"Bob\"</b>", "n": 3}


def environment(
    sources: dict[str, str], base_dir: Path = Path("/nonexistent-campaign-folder")
) -> jinja2.Environment:
    files = {name: (text, str(base_dir / name)) for name, text in sources.items()}
    return build_environment(files, base_dir=base_dir, escaping=Escaping.HTML)


def both(env: jinja2.Environment, name: str, source: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(Jinja's own render, the render through the resolved chain): each ("ok", text) or (error, message)."""
    template = env.get_template(name)

    def outcome(render: Any) -> tuple[str, str]:
        try:
            return "ok", render()
        except RecursionError:  # a block printing itself: the message depends on where the stack ran out
            return "RecursionError", ""
        except Exception as exc:
            return type(exc).__name__, str(exc)

    chain = stack_inheritance(env, template, env.parse(source, name))
    variables = {**env.globals, **VALUES}
    return outcome(lambda: template.render(VALUES)), outcome(
        lambda: render_template(template, variables, chain)
    )


BLOCK_BODIES = st.sampled_from(
    [
        "text",
        "<i>{{ v }}</i>",
        "{{ super() }}",
        "[{{ super() }}]{{ n }}",
        "{{ self.a() }}",
        "{{ missing }}",
        "",
    ]
)
BLOCK_NAMES = st.sampled_from(["a", "b", "c"])
LEADS = st.sampled_from(
    ["", "\n", "lead {{ v }} ", "{# a comment #}\n", "{% set x = 1 %}", "{% if n %}if{% endif %}"]
)


@st.composite
def chains(draw: st.DrawFn) -> dict[str, str]:
    """Templates t0 (the top of the chain) to tN, each extending the one before, with random blocks."""
    levels = draw(st.integers(min_value=1, max_value=3))
    sources: dict[str, str] = {}
    for level in range(levels + 1):
        blocks = ""
        for name in draw(st.lists(BLOCK_NAMES, max_size=3, unique=True)):
            nested = draw(st.one_of(st.none(), BLOCK_NAMES))  # a block inside, named after both
            inner = "" if nested is None else f"{{% block {name}{nested} %}}n{{% endblock %}}"
            blocks += f"{{% block {name} %}}{draw(BLOCK_BODIES)}{inner}{{% endblock %}}"
        if level == 0:
            sources["t0.html"] = f"<html>{blocks}{{% block top %}}A{{% endblock %}}<p>{{{{ v }}}}</p></html>"
            continue
        tail = draw(st.sampled_from(["", "dropped {{ v }}", "{% set y = 2 %}"]))
        sources[f"t{level}.html"] = f"{draw(LEADS)}{{% extends 't{level - 1}.html' %}}{blocks}{tail}"
    return sources


@settings(max_examples=300, deadline=None)
@given(sources=chains())
def test_a_resolved_chain_prints_what_jinja_prints(sources: dict[str, str]) -> None:
    """Blocks overridden at any level, super() through them, self, nested blocks, text before and after
    `{% extends %}`, top-level statements, undefined variables: the same output, or the same error."""
    env = environment(sources)
    name = max(sources)
    jinja, stacked = both(env, name, sources[name])
    assert stacked == jinja
    # Resolved exactly when every template of the chain prints only text before its `{% extends %}` and
    # has no statement at its top level (the generated blocks hold none): the comparison above is of the
    # resolved chain whenever it can be.
    static = not any(
        "{% set" in text or "{% if" in text or "{{" in text.partition("{% extends")[0]
        for text in sources.values()
        if "{% extends" in text
    )
    resolved = stack_inheritance(env, env.get_template(name), env.parse(sources[name], name))
    assert (resolved is not None) == static


def test_a_static_chain_is_resolved_and_anything_else_is_left_to_jinja() -> None:
    sources = {
        "base.html": "<h1>{% block title %}T{% endblock %}</h1>",
        "static.html": "\n{% extends 'base.html' %}{% block title %}S{% endblock %} text after",
        "grandchild.html": "{% extends 'static.html' %}{% block title %}G{{ super() }}{% endblock %}",
        "sets.html": "{% set x = 1 %}{% extends 'base.html' %}",
        "computed.html": "{% extends layout %}",
        "conditional.html": "{% if n %}{% extends 'base.html' %}{% endif %}",
        "imports.html": "{% extends 'base.html' %}{% import 'base.html' as b %}",
        "loop1.html": "{% extends 'loop2.html' %}",
        "loop2.html": "{% extends 'loop1.html' %}",
    }
    env = environment(sources)

    def stacked(name: str) -> Inheritance | None:
        return stack_inheritance(env, env.get_template(name), env.parse(sources[name], name))

    assert stacked("base.html") is None  # extends nothing: rendered as it is
    grandchild = stacked("grandchild.html")
    assert grandchild is not None
    assert grandchild.prefix == "\n"  # static.html's text before its `{% extends %}`
    assert dict(grandchild.blocks)["title"] == (
        env.get_template("grandchild.html").blocks["title"],
        env.get_template("static.html").blocks["title"],
        env.get_template("base.html").blocks["title"],
    )
    assert both(env, "grandchild.html", sources["grandchild.html"])[1] == ("ok", "\n<h1>GS</h1>")
    for name in ("sets.html", "computed.html", "conditional.html", "imports.html", "loop1.html"):
        assert stacked(name) is None, name


def test_a_jinja_that_stacks_blocks_differently_is_left_to_render_as_it_does() -> None:
    """The probe chain decides: blocks stacked in another order (as a changed `{% extends %}` would) turn
    stacking off."""

    def reversed_blocks(env: jinja2.Environment, template: jinja2.Template, tree: Any) -> Inheritance | None:
        found = templating._resolve_chain(env, template, tree)
        assert found is not None
        return Inheritance(found.prefix, found.root, tuple((n, v[::-1]) for n, v in found.blocks))

    def failing(env: jinja2.Environment, template: jinja2.Template, tree: Any) -> Inheritance | None:
        raise AttributeError("root_render_func")

    assert templating.stacking_works() is True  # this Jinja: the fast path is taken
    assert templating.stacking_works(reversed_blocks) is False
    assert templating.stacking_works(failing) is False


def test_the_composer_renders_the_builtin_newsletter_chain_through_its_resolved_chain(tmp_path: Path) -> None:
    """A message template extending newsletter.html.j2 (which extends base.html.j2) is stacked, and its
    messages are what Jinja renders; an undefined variable in it still names the file and line."""
    (tmp_path / "spring.html.j2").write_text(
        '{% extends "newsletter.html.j2" %}\n{% block headline %}Spring{% endblock %}\n'
        "{% block stories %}<p>{{ city }}</p>\n{{ missing_column }}{% endblock %}\n",
        encoding="utf-8",
    )
    manifest = parse_manifest(MANIFEST, path=tmp_path / "campaign.toml")
    composer = build_composer(manifest, secrets=[b"s" * 32])
    assert composer.html is not None
    assert composer.html.inheritance is not None
    sender = manifest.senders[0]
    fields = {"email": "ann@example.com", "city": "Zürich & <Co>", "missing_column": "x"}
    recipient = Recipient("ann@example.com", 1, Address("ann@example.com", "Ann"), fields)
    message = composer.render(recipient, sender)
    template = composer.html.template
    assert template is not None
    context = {
        "recipient": {"email": "ann@example.com", "name": "Ann", "key": "ann@example.com", "row": 1},
        "sender": composer._sender_view(sender).variables,
        "campaign": {"name": manifest.campaign.name},
        "unsubscribe_url": message.unsubscribe_url,
        **fields,
    }
    assert message.html == template.render(context)
    assert "Zürich &amp; &lt;Co&gt;" in (message.html or "")

    without = Recipient(
        "bob@example.com", 2, Address("bob@example.com"), {"email": "bob@example.com", "city": "x"}
    )
    with pytest.raises(TemplateError) as caught:
        composer.render(without, sender)
    assert caught.value.row == 2
    assert "template spring.html.j2 uses undefined variable 'missing_column' at line 4" in str(caught.value)


# --- text and {{ name }}s ----------------------------------------------------------------------------------

TEXT_PIECES = st.sampled_from(["Hi ", "{", "}", "{}", "{0}", "<&>", "é ✓", "\n", "%s", " #x", "'\"", ""])
NAME_PIECES = st.sampled_from(["{{ a }}", "{{b}}", "{{ a }}{{ a }}", "{{ first_name }}"])
OTHER_PIECES = st.sampled_from(
    ["{{ a|upper }}", "{{ a.b }}", "{{ self }}", "{% if a %}x{% endif %}", "{{ 'x' }}"]
)
PRINTED = st.one_of(
    st.text(max_size=12), st.none(), st.integers(), st.just(Markup("<b>m</b>")), st.floats(allow_nan=False)
)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.one_of(TEXT_PIECES, NAME_PIECES, OTHER_PIECES), min_size=1, max_size=6),
    values=st.fixed_dictionaries({}, optional={"a": PRINTED, "b": PRINTED, "first_name": PRINTED}),
)
def test_a_substitution_prints_what_jinja_prints(pieces: list[str], values: dict[str, object]) -> None:
    """In an HTML, a text and a Markdown environment alike: the same text for any value, None where a
    name has no value (Jinja then raises its own error), and no substitution for anything but text and
    names."""
    source = "".join(pieces)
    # Text pieces that together open a tag ("{" then "{0}" then "}": `{{0}}`, a constant printed) are
    # no longer text: the case is not what this test is about.
    marks = ("{{", "{%", "{#")
    assume(all(source.count(mark) == sum(piece.count(mark) for piece in pieces) for mark in marks))
    base_dir = Path("/nonexistent-campaign-folder")
    files = {"t.j2": (source, str(base_dir / "t.j2"))}
    only_names = all(piece in TEXT_PIECES.elements or piece in NAME_PIECES.elements for piece in pieces)
    for escaping in Escaping:
        env = build_environment(files, base_dir=base_dir, escaping=escaping)
        try:
            template = env.get_template("t.j2")
        except jinja2.TemplateSyntaxError:  # pieces that together open a tag ("{" then "{")
            assume(False)
        found = find_substitution(env, template, env.parse(source, "t.j2"))
        assert (found is not None) == (only_names and source != ""), (escaping, source)  # "": no output
        if found is None:
            continue
        try:
            expected: str | None = template.render(values)
        except jinja2.UndefinedError:
            expected = None
        assert found.render({**env.globals, **values}) == expected


def test_the_subject_and_unsubscribe_url_of_a_campaign_print_without_jinja(tmp_path: Path) -> None:
    """The manifest's usual subject and URL are substitutions; the HTML (a chain) is not; a missing
    column is still Jinja's error, naming the manifest key."""
    (tmp_path / "spring.html.j2").write_text('{% extends "newsletter.html.j2" %}', encoding="utf-8")
    manifest = parse_manifest(
        MANIFEST.replace('subject = "Hello"', 'subject = "Hello {{ first_name }}"'),
        path=tmp_path / "campaign.toml",
    )
    composer = build_composer(manifest, secrets=[b"s" * 32])
    assert composer.subject.substitution is not None
    assert composer.unsubscribe_url is not None
    assert composer.unsubscribe_url.substitution is not None
    assert composer.html is not None
    assert composer.html.substitution is None
    fields = {"email": "ann@example.com", "first_name": "Ann <&>"}
    message = composer.render(
        Recipient("ann@example.com", 1, Address("ann@example.com"), fields), manifest.senders[0]
    )
    assert message.subject == "Hello Ann <&>"
    assert message.unsubscribe_url is not None
    assert message.unsubscribe_url.startswith("https://example.com/unsubscribe?t=")
    without = Recipient("bob@example.com", 2, Address("bob@example.com"), {"email": "bob@example.com"})
    with pytest.raises(
        TemplateError, match=r"message\.subject uses undefined variable 'first_name'"
    ) as caught:
        composer.render(without, manifest.senders[0])
    assert caught.value.row == 2
