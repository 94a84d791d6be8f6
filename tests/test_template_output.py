"""campaign's template environment prints exactly what stock Jinja prints with the same options.

campaign.render._templating compiles `{{ ... }}` through its own output functions (one call per
value, no Markup object per string); these tests render the same sources in a stock
ImmutableSandboxedEnvironment with the same loader, autoescape rule and finalize, and
compare the output, or the error, value for value.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from campaign.render import BUILTIN_TEMPLATES
from campaign.render import _templating as templating
from campaign.render._templating import Escaping, build_environment

SOURCES = {
    "page.html": "<p>{{ value }}</p><a title='{{ value }}'>{{ other }}</a>{{ none_value }}{{ count }}",
    "plain.txt": "Hi {{ value }}, {{ other }}! {{ none_value }}|{{ count }}",
    "bare.j2": "{{ value }}",  # a file name that says nothing: its environment decides
    "safe.html": "{{ value|safe }}|{{ value|e }}|{{ value|upper }}|{{ value ~ other }}",
    "off.html": "{% autoescape false %}{{ value }}{% endautoescape %}|{{ value }}",
    "volatile.html": "{% autoescape flag %}{{ value }}{% endautoescape %}|{{ other }}",
    "set.html": "{% set held %}<b>{{ value }}</b>{% endset %}{{ held }}|{{ held|length }}",
    "macro.html": (
        "{% macro box(x) %}<i>{{ x }}</i>{{ caller() if caller else '' }}{% endmacro %}"
        "{{ box(value) }}{% call box(other) %}[{{ value }}]{% endcall %}"
    ),
    "filter.html": "{% filter upper %}{{ value }}&{{ other }}{% endfilter %}",
    "loop.html": "{% for item in items %}{{ loop.index }}:{{ item }};{% endfor %}",
    "include.html": "{% include 'plain.txt' %}/{% include 'page.html' %}",
    "child.html": "{% extends 'parent.html' %}{% block body %}[{{ value }}]{{ super() }}{% endblock %}",
    "parent.html": "<h1>{{ other }}</h1>{% block body %}({{ other }}){% endblock %}{{ self.body() }}",
    "constants.html": "{{ none }}|{{ '<b>' }}|{{ 1 + 2 }}|{{ '<i>'|safe }}",
    "undefined.html": "{{ value }}{{ missing_variable }}",
    "attribute.html": "{{ value.no_such_attribute }}",
    "mapping.html": "{{ mapping }}|{{ mapping.key }}|{{ items }}",
    "shadowed.html": "{{ mapping.items }}|{{ mapping.get }}|{{ mapping['items'] }}|{{ mapping.values() }}",
    "missing_key.html": "{{ mapping.no_such_key }}",
    "dunder.html": "{{ mapping.__class__ }}",
    "other_mappings.html": "{{ ordered.key }}|{{ ordered.items }}|{{ subclass.key }}|{{ subclass.items }}",
    "missing_other.html": "{{ subclass.no_such_key }}",
}
# Stock Jinja escapes for HTML or not at all; Markdown's escaping is compared with stock Jinja's
# fallback (`_finalize_for_stock_jinja`) in tests/test_data_safety.py.
ESCAPINGS = (Escaping.NONE, Escaping.HTML)


class Html:
    """An object that renders itself as HTML (markupsafe's __html__ protocol)."""

    def __html__(self) -> str:
        return "<em>html</em>"

    def __str__(self) -> str:
        return "<em>str</em>"

    def __repr__(self) -> str:  # a stable test id (xdist's workers must collect the same tests)
        return "Html()"


class Subclass(dict):  # type: ignore[type-arg]
    """A dict subclass: the sandbox's attribute lookup is not shortcut for it."""


class Loud:
    """A value whose conversion to text fails (the error must be the same through both environments)."""

    def __str__(self) -> str:
        raise ValueError("cannot print this value")

    def __repr__(self) -> str:
        return "Loud()"


def environments(base_dir: Path, escaping: Escaping) -> tuple[jinja2.Environment, jinja2.Environment]:
    """campaign's environment printing as `escaping` says, and a stock one with its loader and options."""
    sources = {name: (text, str(base_dir / name)) for name, text in SOURCES.items()}
    ours = build_environment(sources, base_dir=base_dir, escaping=escaping)
    stock = ImmutableSandboxedEnvironment(
        loader=ours.loader,
        undefined=jinja2.StrictUndefined,
        autoescape=ours.autoescape,
        keep_trailing_newline=True,
        finalize=ours.finalize,
        auto_reload=False,
    )
    assert stock.code_generator_class is not ours.code_generator_class
    return ours, stock


def rendered(env: jinja2.Environment, name: str, context: dict[str, Any]) -> tuple[str, str]:
    """("ok", the output) or (the exception's class name, its message)."""
    try:
        return "ok", env.get_template(name).render(context)
    except Exception as exc:
        return type(exc).__name__, str(exc)


VALUES = [
    "plain",
    "<script>alert('x') & \"y\"</script>",
    "ünïcödé ✓ \u2028",
    "",
    None,
    0,
    42,
    -1.5,
    True,
    Markup("<b>safe</b>"),
    Html(),
    ["a", "<b>"],
    Loud(),
]


@pytest.mark.parametrize("escaping", ESCAPINGS, ids=str)
@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_every_construct_prints_as_stock_jinja(
    tmp_path: Path, name: str, value: object, escaping: Escaping
) -> None:
    """Each template construct gives stock Jinja's output (or error) for each kind of value."""
    ours, stock = environments(tmp_path, escaping)
    for flag in (True, False):
        context = {
            "value": value,
            "other": "<&>",
            "none_value": None,
            "count": 7,
            "flag": flag,
            "items": [value, "<x>"],
            "mapping": {"key": value, "items": value, "__class__": "shadow"},
            "ordered": OrderedDict(key=value, items="from the item"),
            "subclass": Subclass(key=value, items="from the item"),
        }
        assert rendered(ours, name, context) == rendered(stock, name, context)


def test_output_is_compiled_through_one_call(tmp_path: Path) -> None:
    """The generated code prints through campaign's output functions, not escape(finalize(...))."""
    ours, stock = environments(tmp_path, Escaping.HTML)
    text, _ = environments(tmp_path, Escaping.NONE)
    source = SOURCES["page.html"]
    assert "environment.output_html(" in ours.compile(source, "page.html", raw=True)
    assert "environment.output_text(" in text.compile(SOURCES["plain.txt"], "plain.txt", raw=True)
    assert "environment.output_html(" not in stock.compile(source, "page.html", raw=True)


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(st.text(max_size=30), st.none(), st.integers(), st.floats(allow_nan=False)),
    other=st.text(max_size=10),
)
def test_generated_values_print_as_stock_jinja(value: object, other: str) -> None:
    """Any text or number prints the same through both environments, escaped or not."""
    base_dir = Path("/nonexistent-campaign-folder")
    context = {"value": value, "other": other, "none_value": None, "count": 1, "flag": True, "items": []}
    for escaping in ESCAPINGS:
        ours, stock = environments(base_dir, escaping)
        for name in ("page.html", "plain.txt", "bare.j2", "safe.html", "macro.html", "child.html"):
            assert rendered(ours, name, context) == rendered(stock, name, context)


@pytest.mark.parametrize("escaping", ESCAPINGS, ids=str)
@pytest.mark.parametrize("name", sorted(path.name for path in BUILTIN_TEMPLATES.glob("*.j2")))
def test_builtin_templates_print_as_stock_jinja(tmp_path: Path, name: str, escaping: Escaping) -> None:
    """The shipped templates render byte for byte as stock Jinja renders them."""
    ours, stock = environments(tmp_path, escaping)
    context = {
        "recipient": {"email": "ann@example.com", "name": "Ann <&>", "key": "ann@example.com", "row": 1},
        "sender": {"name": "alice", "email": "alice@example.com", "from_name": 'Alice "A" O\'Neil'},
        "campaign": {"name": "spring <sale>"},
        "unsubscribe_url": "https://example.com/u?t=abc&x=1",
        "unsubscribe_token": "abc",
        "first_name": "Ann",
        "city": "Zürich & <Co>",
    }
    assert rendered(ours, name, context) == rendered(stock, name, context)
    assert rendered(ours, name, context)[0] == "ok"


def test_this_jinja_and_markupsafe_take_the_fast_path() -> None:
    """With the pinned-tested Jinja and markupsafe, the private hooks check out and are used."""
    from markupsafe import _speedups

    assert templating._Environment.code_generator_class is templating._CodeGenerator
    assert templating._escape_str is _speedups._escape_inner


def test_a_code_generator_that_prints_differently_falls_back_to_stock_jinja() -> None:
    """A Jinja whose private compiler hooks changed meaning compiles with its own generator instead."""

    class Drifted(templating._CodeGenerator):
        def _output_child_post(self, node: Any, frame: Any, finalize: Any) -> None:
            super()._output_child_post(node, frame, finalize)
            self.write("[:-1]")  # a changed hook: every printed value loses its last character

    class Broken(templating._CodeGenerator):
        def _output_child_pre(self, node: Any, frame: Any, finalize: Any) -> None:
            raise AttributeError("_FinalizeInfo")  # a renamed private type

    assert templating.choose_code_generator(templating._CodeGenerator) is templating._CodeGenerator
    assert templating.choose_code_generator(Drifted) is CodeGenerator
    assert templating.choose_code_generator(Broken) is CodeGenerator


def test_a_missing_or_wrong_private_escaper_falls_back_to_markupsafe_escape() -> None:
    """No `_escape_inner` (or one that escapes differently): markupsafe's public escape, same output."""
    fallback = templating.find_escape_str(("markupsafe._no_such_module", "json"))
    assert fallback("<a href=\"x\">'&'</a>") == "&lt;a href=&#34;x&#34;&gt;&#39;&amp;&#39;&lt;/a&gt;"
    assert type(fallback("x")) is str
    assert templating.find_escape_str() is templating._escape_str
