"""Jinja template files: naming and reading them, their environment, checking a tree up front, errors.

Helpers for `campaign.render._compose`: the built-in templates folder, how a template file is
named to the user, the sandboxed environments the templates run in (where they load from, and
how values are printed: one environment per `Escaping`, so that a template is escaped as the body
that reaches it needs, whatever its file name; compiled so that printing a value costs one call,
with stock Jinja's output), compiling a template and everything it extends or includes before
any row is rendered, and turning an exception raised while rendering into one
`TemplateError` line naming the row, the template file and line. Rendering itself is
`render_template`: a template whose `{% extends %}` chain is static renders through its chain as
resolved once (`stack_inheritance`), not as Jinja resolves it again for every row; and a template
of text and `{{ name }}`s only is printed by `Substitution.render`, without Jinja's machinery.
"""

from __future__ import annotations

import functools
import importlib
import re
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup, escape

from campaign.errors import InputFileError, TemplateError

__all__ = [
    "BUILTIN_TEMPLATES",
    "Escaping",
    "Inheritance",
    "Substitution",
    "build_environment",
    "check_template_tree",
    "describe_render_error",
    "display_name",
    "find_substitution",
    "loader_name",
    "read_template_file",
    "render_template",
    "stack_inheritance",
    "walk_template_tree",
]

BUILTIN_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
# Every ASCII punctuation character and line break of a value as a numeric character reference:
# CommonMark reads a reference as that literal character, never as structure (no `#` heading, `[`
# link, `*` emphasis, `<` HTML, blank line), and decodes it in link destinations and raw HTML too.
_MARKDOWN_LITERALS = {ord(char): f"&#{ord(char)};" for char in string.punctuation + "\n\r"}
# Whitespace (as CommonMark counts it) at the ends of a value: leading spaces could indent a line
# into a code block, trailing ones before a line break make a hard break, and either would undo
# the template's own `**` around the value.
_MARKDOWN_SPACE = r"[\t\x0b\x0c \xa0\u1680\u2000-\u200a\u202f\u205f\u3000]"
_MARKDOWN_EDGE_SPACE = re.compile(f"^{_MARKDOWN_SPACE}+|{_MARKDOWN_SPACE}+$")
_UNDEFINED_NAME = re.compile(r"'(?P<name>[^']+)' is undefined")
_UNDEFINED_ATTRIBUTE = re.compile(r"has no (?:attribute|element) (?P<name>'[^']*'|\S+)")


def loader_name(path: Path, base_dir: Path) -> str:
    """The name a template file is loaded under: relative to the campaign folder when inside it."""
    try:
        return path.relative_to(base_dir).as_posix()
    except ValueError:
        return path.as_posix()


def read_template_file(key: str, path: Path) -> str:
    """The text of the template file at `path` (named by manifest `key`); InputFileError if unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputFileError(f"{key}: template file {path} does not exist; check the path") from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{key}: template file {path} is not UTF-8 text; save it as UTF-8") from exc
    except OSError as exc:
        raise InputFileError(f"{key}: cannot read template file {path}: {exc.strerror or exc}") from exc


class Escaping(Enum):
    """How the templates of one environment print a value.

    Jinja fixes a template's autoescaping when it compiles it, and compiles a name once per
    environment: a partial that the text body and the HTML body both include can be escaped in
    one only if each body has its own environment. So every template in an environment, whatever
    its file is called, and whatever `{% include %}` names at run time, prints the same way.
    """

    NONE = "none"  # the text body and what it reaches; subjects, headers, attachment paths
    HTML = "html"  # the HTML body, the layout and what they reach
    # The Markdown body and what it reaches: for Markdown and HTML, so a value from the list cannot
    # become markup, before or after markdown-it (see `_output_markdown`).
    MARKDOWN = "markdown"


def build_environment(
    sources: Mapping[str, tuple[str, str]], *, base_dir: Path, escaping: Escaping
) -> jinja2.Environment:
    """The immutable sandbox (strict undefined variables) whose templates print values as `escaping` says.

    `sources` (loader name -> (source, filename)) are the manifest's own template files, read
    once; other names load from `base_dir`, then the built-in templates. A composer builds one
    per `Escaping`, each over the same files.
    """

    def load_main(name: str) -> tuple[str, str, Any] | None:
        found = sources.get(name)
        return None if found is None else (found[0], found[1], lambda: True)

    loader = jinja2.ChoiceLoader(
        [jinja2.FunctionLoader(load_main), jinja2.FileSystemLoader([base_dir, BUILTIN_TEMPLATES])]
    )
    markdown = escaping is Escaping.MARKDOWN
    return _Environment(
        is_markdown=lambda _name: markdown,
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=escaping is not Escaping.NONE,  # for every name, computed ones too
        keep_trailing_newline=True,
        finalize=_finalize,
        auto_reload=False,
        cache_size=-1,  # a plain dict: a campaign has a handful of templates; `extends` looks one up per row
    )


_ESCAPERS = ("markupsafe._speedups", "markupsafe._native")


def find_escape_str(modules: tuple[str, ...] = _ESCAPERS) -> Callable[[str], str]:
    """The function `markupsafe.escape` applies to a str (its C version when built), else a public stand-in.

    `_escape_inner` is markupsafe's private name: when a release drops or changes it, or it does
    not escape a probe exactly as `markupsafe.escape` does, the public `escape` is used instead.
    """
    probe = "<a href=\"x\">'&'</a>"
    for name in modules:
        try:
            inner = importlib.import_module(name)._escape_inner
            if inner(probe) == str(escape(probe)) and type(inner(probe)) is str:
                return inner  # type: ignore[no-any-return]
        except Exception:  # any failure of a private hook means: try the next, then the public one
            continue
    return lambda value: str(escape(value))


_escape_str = find_escape_str()


def _finalize(value: object) -> object:
    """Print a missing value (None, e.g. an absent recipient name) as nothing rather than "None"."""
    return "" if value is None else value


@jinja2.pass_context
def _finalize_for_stock_jinja(context: jinja2.runtime.Context, value: object) -> object:
    """`_finalize`, plus Markdown's escaping, for stock Jinja's code (when `_CodeGenerator` is not used).

    Stock Jinja prints `escape(finalize(value))`: a Markdown template's values come back as
    Markup holding `_output_markdown`'s text, which is already HTML-safe, so nothing else changes.
    """
    if value is None:
        return ""
    environment = context.environment
    if (
        context.eval_ctx.autoescape
        and isinstance(environment, _Environment)
        and environment.is_markdown(context.name)
    ):
        return Markup(_output_markdown(value))
    return value


def _output_html(value: object) -> str:
    """`escape(_finalize(value))`, as an autoescaped `{{ value }}` prints it, without a Markup per string.

    The pieces a template yields are only ever joined, so a plain str with the same text is equal output.
    """
    if type(value) is str:
        return _escape_str(value)
    return "" if value is None else escape(value)


def _output_markdown(value: object) -> str:
    """A value printed in a Markdown template: literal text for Markdown, HTML-safe once rendered.

    Markup (a macro's output, the author's `|safe`) is the template's own and passes as is.
    """
    if hasattr(value, "__html__"):
        return str(value.__html__())
    text = _output_text(value).translate(_MARKDOWN_LITERALS)
    return _MARKDOWN_EDGE_SPACE.sub(lambda found: "".join(f"&#{ord(c)};" for c in found[0]), text)


def _output_text(value: object) -> str:
    """`str(_finalize(value))`, as a `{{ value }}` without autoescape prints it."""
    if type(value) is str:
        return value
    return "" if value is None else str(value)


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, printing `{{ ... }}` through one call (`_output_html` or `_output_text`).

    Stock Jinja writes `escape(environment.finalize(...))`: two calls and a Markup object for
    every value printed, the largest per-row cost of a template. Scopes whose autoescaping is
    only known at run time (`{% autoescape expr %}`) keep Jinja's own code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ours: list[bool] = []  # per child being printed: whether _output_child_pre wrote our call

    def _output_child_pre(
        self, node: nodes.Expr, frame: Frame, finalize: CodeGenerator._FinalizeInfo
    ) -> None:
        ours = not frame.eval_ctx.volatile and self.environment.finalize is _finalize
        self._ours.append(ours)
        if not ours:
            super()._output_child_pre(node, frame, finalize)
        elif (
            frame.eval_ctx.autoescape
            and isinstance(self.environment, _Environment)
            and self.environment.is_markdown(self.name)
        ):
            self.write("environment.output_markdown(")
        elif frame.eval_ctx.autoescape:
            self.write("environment.output_html(")
        else:
            self.write("environment.output_text(")

    def _output_child_post(
        self, node: nodes.Expr, frame: Frame, finalize: CodeGenerator._FinalizeInfo
    ) -> None:
        if self._ours.pop():
            self.write(")")
        else:
            super()._output_child_post(node, frame, finalize)


# What `getattr(some_dict, name)` finds (a dict has no instance attributes): the sandbox prefers these.
_DICT_ATTRIBUTES = frozenset(name for klass in dict.__mro__ for name in vars(klass))


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, compiling with `_CodeGenerator` (when it checks out); output functions as attributes."""

    code_generator_class: type[CodeGenerator] = _CodeGenerator  # checked below: choose_code_generator

    def __init__(self, *, is_markdown: Callable[[str | None], bool], **options: Any) -> None:
        if not issubclass(self.code_generator_class, _CodeGenerator) and options.get("finalize") is _finalize:
            # Jinja's own code generator: Markdown values are escaped through the public finalize hook.
            options["finalize"] = _finalize_for_stock_jinja
        super().__init__(**options)
        self.is_markdown = functools.cache(is_markdown)
        # Instance attributes holding plain functions: a generated template calls them without binding.
        self.output_html = _output_html
        self.output_text = _output_text
        self.output_markdown = _output_markdown

    def getattr(self, obj: Any, attribute: str) -> Any:
        """`obj.attribute` as the sandbox resolves it, without its AttributeError for a plain dict's key.

        On a dict (`recipient`, `sender`, `campaign`) the sandbox looks for an attribute first and,
        when the dict type has none by that name, takes the item; this goes straight to the item.
        """
        if (
            type(obj) is dict
            and type(attribute) is str
            and attribute in obj
            and attribute not in _DICT_ATTRIBUTES
        ):
            return obj[attribute]
        return super().getattr(obj, attribute)


_PROBES = {
    "page.html": "<p>{{ v }}</p>{{ n }}{{ i }}{% autoescape false %}{{ v }}{% endautoescape %}{{ v|safe }}",
    "text.txt": "{{ v }}|{{ n }}|{{ i }}{% for x in [v, 2] %}{{ x }}{% endfor %}",
    "child.html": "{% extends 'page.html' %}",
    "note.md": "# {{ v }}\n\n**{{ v }}** [{{ v }}](https://example.com/{{ v|urlencode }}) {{ v|safe }}",
}


def choose_code_generator(candidate: type[CodeGenerator]) -> type[CodeGenerator]:
    """`candidate` when it prints the probe templates exactly as stock Jinja does, else Jinja's own.

    `_CodeGenerator` overrides private methods of Jinja's compiler: a Jinja release that renames
    or changes them must cost speed, never a wrong message or a failed send. (Stock Jinja escapes
    Markdown values through `_finalize_for_stock_jinja`, a public hook.)
    """

    def render_all(generator: type[CodeGenerator]) -> list[str]:
        class Probe(_Environment):
            code_generator_class = generator

        env = Probe(
            is_markdown=lambda name: bool(name and name.endswith(".md")),
            loader=jinja2.DictLoader(_PROBES),
            autoescape=lambda name: bool(name and name.endswith((".html", ".md"))),
            finalize=_finalize,
            undefined=jinja2.StrictUndefined,
        )
        values = {"v": "<b>'Ann' & \"Bob\"</b> [x](y) # *z*", "n": None, "i": 3}
        return [env.get_template(name).render(values) for name in _PROBES]

    try:
        works = render_all(candidate) == render_all(CodeGenerator)
    except Exception:  # any failure of the private hooks means: compile as stock Jinja does
        works = False
    return candidate if works else CodeGenerator


_Environment.code_generator_class = choose_code_generator(_CodeGenerator)

# A block's (or a template's root) render function, as Jinja compiles it.
_Render = Callable[[jinja2.runtime.Context], Iterator[str]]


@dataclass(frozen=True, slots=True)
class Inheritance:
    """A template's chain of `{% extends %}`, resolved once: Jinja resolves it again for every render
    (a template lookup and a generator in the way of every string printed, per level).

    `prefix` is the text the chain's templates print before their `{% extends %}`; `root` renders the
    template at the top of the chain; `blocks` holds every block's versions, the most derived first
    (the order `super()` goes through).
    """

    prefix: str
    root: _Render
    blocks: tuple[tuple[str, tuple[_Render, ...]], ...]


def stack_inheritance(
    env: jinja2.Environment, template: jinja2.Template, tree: nodes.Template
) -> Inheritance | None:
    """The chain `template` (parsed: `tree`) extends, resolved; None when it extends nothing or when
    it is not static (see `_top_level`), and None when this Jinja renders the probe chain differently
    through it (`stacking_works`). `render_template` renders through it."""
    return _resolve_chain(env, template, tree) if stacking_works() else None


def render_template(
    template: jinja2.Template, variables: dict[str, Any], inheritance: Inheritance | None = None
) -> str:
    """`template` rendered, through its resolved `inheritance` when it has one.

    `variables` must already hold the environment's globals: it is handed to the Context as is
    (Template.render would copy globals and variables for every render). Jinja's own exceptions
    propagate; `environment.handle_exception()` gives them the template's file and line.
    """
    env = template.environment
    if inheritance is None:
        context = env.context_class(env, variables, template.name, template.blocks)
        return "".join(template.root_render_func(context))
    context = env.context_class(env, variables, template.name, {})
    # A render only reads its blocks (no `{% extends %}` runs in a resolved chain; `super()` indexes them):
    # tuples copied with the dict, not a new list a block, and a write would fail, not reach the next row.
    context.blocks = dict(inheritance.blocks)  # type: ignore[arg-type]
    return inheritance.prefix + "".join(inheritance.root(context))


def _resolve_chain(
    env: jinja2.Environment, template: jinja2.Template, tree: nodes.Template
) -> Inheritance | None:
    assert env.loader is not None  # build_environment gives one
    chain, prefix = [template], []
    name = template.name
    while True:
        shape = _top_level(tree)
        if shape is None:
            return None
        lead, parent = shape
        if parent is None:
            break
        parent = env.join_path(parent, name) if name is not None else parent
        if parent in (level.name for level in chain):
            return None  # a loop: Jinja's own render reports it
        chain.append(env.get_template(parent))
        prefix.append(lead)
        name, tree = parent, env.parse(env.loader.get_source(env, parent)[0], parent)
    if len(chain) == 1:
        return None
    versions: dict[str, list[_Render]] = {}
    for level in chain:  # as each level's `{% extends %}` stacks its parent's blocks under its own
        for block, render in level.blocks.items():
            versions.setdefault(block, []).append(render)
    blocks = tuple((block, tuple(renders)) for block, renders in versions.items())
    return Inheritance("".join(prefix), chain[-1].root_render_func, blocks)


def _top_level(tree: nodes.Template) -> tuple[str, str | None] | None:
    """(the text printed before `{% extends %}`, the template extended) of a static child template:
    text only, then one `{% extends "a name" %}`, then blocks (and text, which Jinja never prints). ("",
    None) for a template that extends nothing; None for any other shape (a top-level `set`, `import`,
    macro, a computed or conditional parent), which only Jinja's own render gets right."""
    extends = list(tree.find_all(nodes.Extends))
    if not extends:
        return "", None
    body = tree.body
    at = 0
    while at < len(body) and _is_text(body[at]):
        at += 1
    parent = extends[0].template
    if (
        len(extends) > 1
        or at == len(body)
        or body[at] is not extends[0]
        or not isinstance(parent, nodes.Const)
        or not isinstance(parent.value, str)
        or not all(isinstance(node, (nodes.Block, nodes.Output)) for node in body[at + 1 :])
    ):
        return None
    lead = "".join(item.data for node in body[:at] for item in node.find_all(nodes.TemplateData))
    return lead, parent.value


def _is_text(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Output) and all(isinstance(item, nodes.TemplateData) for item in node.nodes)


@dataclass(frozen=True, slots=True)
class Substitution:
    """A template of text and `{{ name }}`s only, printed as Jinja prints it but without a Context and a
    generator for every render: the subject and the unsubscribe URL of most campaigns."""

    pattern: str  # the text, with "{}" where each name's value goes (str.format: the text's braces doubled)
    names: tuple[str, ...]
    output: Callable[[object], str]  # what the generated code prints a value with, in this template

    def render(self, variables: Mapping[str, object]) -> str | None:
        """The text with each name's value printed; None when a name has none, or a value cannot be
        printed (Jinja's own render then raises its error, naming the template and line). `variables`
        holds the globals too."""
        try:
            return self.pattern.format(*[self.output(variables[name]) for name in self.names])
        except Exception:
            return None


def find_substitution(
    env: jinja2.Environment, template: jinja2.Template, tree: nodes.Template
) -> Substitution | None:
    """`template` (parsed: `tree`) as a `Substitution`: when it is text and `{{ name }}`s only, compiled
    by `_CodeGenerator`, and it prints probe values exactly as Jinja does. None otherwise."""
    if not isinstance(env, _Environment) or env.code_generator_class is not _CodeGenerator:
        return None  # stock Jinja's code prints through finalize and escape, not our output functions
    body = tree.body
    if len(body) != 1 or not isinstance(body[0], nodes.Output):
        return None
    pattern, names = [], []
    for node in body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            pattern.append(node.data.replace("{", "{{").replace("}", "}}"))
        elif isinstance(node, nodes.Name) and node.ctx == "load":
            pattern.append("{}")
            names.append(node.name)
        else:
            return None
    name = template.name
    if not (env.autoescape(name) if callable(env.autoescape) else env.autoescape):
        output = _output_text
    else:
        output = _output_markdown if env.is_markdown(name) else _output_html
    found = Substitution("".join(pattern), tuple(names), output)
    return found if _prints_as_jinja(found, template) else None


def _prints_as_jinja(substitution: Substitution, template: jinja2.Template) -> bool:
    """Whether `substitution` prints what `template` prints for values of every kind (a name Jinja
    resolves otherwise, as `self`, prints otherwise)."""
    names = substitution.names
    probes: list[dict[str, object]] = [
        {name: f'<{number}> & \'"{{}}" *x* #' for number, name in enumerate(names)},
        dict.fromkeys(names),
        dict.fromkeys(names, 7),
        dict.fromkeys(names, Markup("<b>safe</b>")),
    ]
    try:
        return all(
            substitution.render({**template.globals, **probe}) == template.render(probe) for probe in probes
        )
    except Exception:  # a probe Jinja cannot print: leave the template to Jinja
        return False


_STACKING_PROBES = {
    "top.html": (
        "<title>{% block title %}T{% endblock %}</title>\n{% block body %}<p>{{ v }}</p>"
        "{% block inner %}i{% endblock %}{% endblock %}{{ self.title() }}{% block end %}{% endblock %}"
    ),
    "middle.html": (
        "lead {% extends 'top.html' %}{% block title %}M{{ super() }}{% endblock %}dropped {{ v }}"
        "{% block inner %}[{{ super() }}{% block deep %}d{% endblock %}]{% endblock %}"
    ),
    "child.html": (
        "\n{% extends 'middle.html' %}{% block title %}C{{ super() }}{% endblock %}"
        "{% block body %}{{ super() }}!{{ v }}{% endblock %}{% block deep %}{{ super() }}D{% endblock %}"
    ),
}


@functools.cache
def stacking_works(resolve: Callable[..., Inheritance | None] = _resolve_chain) -> bool:
    """Whether rendering through chains resolved by `resolve` prints the probe chain exactly as Jinja
    does: resolving mirrors the code Jinja generates for `{% extends %}`, which a release may change."""
    env = _Environment(
        is_markdown=lambda _name: False,
        loader=jinja2.DictLoader(_STACKING_PROBES),
        autoescape=True,
        finalize=_finalize,
        undefined=jinja2.StrictUndefined,
    )
    values = {"v": "<b>'Ann' & \"Bob\"</b>"}
    try:
        template = env.get_template("child.html")
        chain = resolve(env, template, env.parse(_STACKING_PROBES["child.html"], "child.html"))
        return chain is not None and render_template(
            template, {**env.globals, **values}, chain
        ) == template.render(values)
    except Exception:  # anything unexpected: render as Jinja does
        return False


def display_name(filename: str, base_dir: Path) -> str:
    """A template file as the user knows it: relative to the campaign folder or the built-in folder."""
    path = Path(filename)
    for root in (base_dir, BUILTIN_TEMPLATES):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return filename


def walk_template_tree(env: jinja2.Environment, name: str, base_dir: Path) -> Iterator[tuple[str, str]]:
    """(name, source) of a template and of every template it names literally, once each.

    The one walk over `{% extends/include/import %}`: the up-front check compiles what it yields,
    the content fingerprint hashes it. A missing, unreadable or unparsable template is a
    `TemplateError` naming it (and, when missing, the template that refers to it).
    """
    assert env.loader is not None  # both callers build one
    pending, referrer = [name], {name: name}
    while pending:
        current = pending.pop()
        try:
            source, filename, _ = env.loader.get_source(env, current)
            references = list(meta.find_referenced_templates(env.parse(source, current, filename)))
        except jinja2.TemplateSyntaxError as exc:
            where = display_name(exc.filename or current, base_dir)
            raise TemplateError(
                f"template {where} line {exc.lineno}: syntax error: {exc.message}; fix the template"
            ) from exc
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(
                f"template {display_name(referrer[current], base_dir)} refers to {exc.name!r}, which is in "
                f"neither {base_dir} nor the built-in templates; check the name"
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"template {current} cannot be read as UTF-8 text: {exc}") from exc
        yield current, source
        for reference in references:
            if reference is not None and reference not in referrer:  # None: a computed name
                referrer[reference] = filename or current
                pending.append(reference)


def check_template_tree(env: jinja2.Environment, name: str, base_dir: Path) -> None:
    """Compile a template and every template it names literally, so errors surface before any row."""
    for current, _ in walk_template_tree(env, name, base_dir):
        try:
            env.get_template(current)
        except jinja2.TemplateSyntaxError as exc:  # parsed once already: only compile-time errors are left
            where = display_name(exc.filename or current, base_dir)
            raise TemplateError(
                f"template {where} line {exc.lineno}: syntax error: {exc.message}; fix the template"
            ) from exc


def describe_render_error(exc: Exception, label: str, row: int, base_dir: Path) -> TemplateError:
    """A one-line TemplateError naming the row, the template (and line) and the variable if undefined."""
    where, line = label, None
    tb = exc.__traceback__
    while tb is not None:  # jinja rewrites tracebacks so template frames carry file and line
        frame = tb.tb_frame
        if "__jinja_exception__" in frame.f_globals and not frame.f_code.co_filename.startswith("<"):
            where, line = display_name(frame.f_code.co_filename, base_dir), tb.tb_lineno
        tb = tb.tb_next
    at = f" at line {line}" if line is not None else ""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    template = f"template {where}"
    if isinstance(exc, jinja2.UndefinedError):
        if (found := _UNDEFINED_NAME.search(text)) is not None:
            name = found["name"]
            detail = f"{template} uses undefined variable {name!r}{at}; add the column or fix the template"
            return TemplateError(detail, row=row, variable=name)
        if (found := _UNDEFINED_ATTRIBUTE.search(text)) is not None:
            name = found["name"].strip("'")
            detail = f"{template} uses undefined attribute {name!r}{at} ({text}); fix the template"
            return TemplateError(detail, row=row, field=f'attribute "{name}"')
    if isinstance(exc, jinja2.TemplateNotFound):
        detail = f"{template} refers to {exc.name!r}{at}, which is in neither {base_dir} "
        detail += "nor the built-in templates"
        return TemplateError(detail, row=row, field=template)
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return TemplateError(f"{template}{at} tried an unsafe operation ({text})", row=row, field=template)
    return TemplateError(f"{template} failed{at}: {type(exc).__name__}: {text}", row=row, field=template)
