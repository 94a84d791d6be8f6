"""Rendering: the manifest's Jinja templates, compiled once into a `Composer` that turns a row into a Message.

Templates run in an immutable sandbox with strict undefined variables, so a missing
column is an error and a template cannot change shared state between rows. Every
rendered header value is checked before it can reach the wire. A Markdown body goes
through Jinja, then Markdown, into an HTML layout; attachment paths are rendered, not
read. Each body is compiled, with every template it reaches, in an environment that escapes as
that body needs (the text body not at all, the HTML body and the layout for HTML, the Markdown
body for Markdown), whatever the files are called. `build_composer` reads the template files;
`Composer.render` is pure and must not do I/O, read the clock or send anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from markupsafe import Markup

from campaign.errors import HeaderError, InputFileError, ManifestError, TemplateError
from campaign.headers import header_name_problem, header_value_problem
from campaign.manifest import HEADERLESS_PROVIDERS, IMAP_PROVIDERS, TOKEN_IN_URL_RULE
from campaign.models import FIRST_STEP, Address, AttachmentFile, Message, PreviousStep, Recipient, Tracking
from campaign.render._attachments import AttachmentLoader, build_attachment_file, check_shared_path
from campaign.render._markup import inline_css, render_markdown
from campaign.render._templating import (
    BUILTIN_TEMPLATES,
    Escaping,
    Inheritance,
    Substitution,
    build_environment,
    check_template_tree,
    describe_render_error,
    display_name,
    find_substitution,
    loader_name,
    read_template_file,
    render_template,
    stack_inheritance,
)
from campaign.unsubscribe import TokenSigner, build_unsubscribe_headers, make_token, url_carries_token

if TYPE_CHECKING:
    from campaign.manifest import AttachmentSettings, Manifest, MessageSettings, SenderSettings

__all__ = ["BUILTIN_TEMPLATES", "Composer", "build_composer"]

_DEFAULT_LAYOUT = "base.html.j2"
_MARKDOWN_HTML = "_markdown_html"  # the rendered Markdown, as the layout wrapper sees it
_MAX_SUBJECT = 998  # RFC 5322 line limit; Gmail refuses longer subjects
_MAX_HEADER_VALUE = 32_000  # Gmail bounces a message with a longer header value (552 5.3.4)
_MAX_LABEL = 2048  # Nylas's limit on tracking_options.label
_UNSUBSCRIBE_NAMES = ("unsubscribe_url", "unsubscribe_token")  # campaign's own, never a column's
_TEMPLATE_MARKERS = ("{{", "{%", "{#")
_TOKEN = "unsubscribe_token"
# Filters that leave a token as it is (it is URL-safe base64), so that the URL still carries it whole.
_TOKEN_KEEPING_FILTERS = frozenset({"urlencode"})
_TOKEN_PLACE = (
    "renders a link without the recipient's token as a whole query value or path segment (where the "
    "endpoint looks for it), so a click on it could not unsubscribe; put {{ unsubscribe_token }} on its "
    "own, e.g. 'https://example.com/u?t={{ unsubscribe_token }}'"
)


@dataclass(frozen=True, slots=True)
class _CompiledPart:
    """One compiled template (or a constant string that needs none) and how to name it in errors."""

    label: str
    template: jinja2.Template | None = None
    constant: str = ""
    inheritance: Inheritance | None = None  # the template's `{% extends %}` chain, resolved once
    substitution: Substitution | None = None  # the template, when it is text and `{{ name }}`s only


@dataclass(frozen=True, slots=True)
class _AttachmentParts:
    """One [[message.attachments]] entry with its path (and file name) compiled."""

    key: str
    settings: AttachmentSettings
    path: _CompiledPart
    filename: _CompiledPart | None


@dataclass(frozen=True, slots=True)
class _SenderView:
    """What a sender contributes to every message, computed once per sender."""

    settings: SenderSettings
    variables: Mapping[str, object]
    from_: Address | None
    problem: str | None


@dataclass(frozen=True, slots=True)
class Composer:
    """The compiled templates of one campaign (made by `build_composer`); `render` is pure."""

    campaign: str
    base_dir: Path
    subject: _CompiledPart
    html: _CompiledPart | None
    text: _CompiledPart | None
    headers: tuple[tuple[str, _CompiledPart], ...]
    unsubscribe_url: _CompiledPart | None
    mailto: str | None
    secrets: tuple[bytes, ...] = field(repr=False)
    reply_to: tuple[Address, ...]
    reply_to_problem: str | None
    tracking: Tracking | None
    name_column: str | None
    jinja_globals: Mapping[str, Any] = field(repr=False)
    markdown: _CompiledPart | None = None
    layout: _CompiledPart | None = None  # extends the layout; its content block is the rendered Markdown
    inline_css: bool = False
    attachments: tuple[_AttachmentParts, ...] = ()
    attachment_loader: AttachmentLoader | None = None  # finds and reads the files (I/O, not in render)
    # make_token's work done once for this campaign (without it, render calls make_token).
    token_signer: TokenSigner | None = field(default=None, repr=False, compare=False)
    # unsubscribe.url names nothing but the token, and build_composer found the token where the endpoint
    # looks: every row's link has that shape, so render need not look again.
    unsubscribe_url_checked: bool = False
    step: str = FIRST_STEP  # the step these templates are: [message], or a follow-up's name
    followups: tuple[Composer, ...] = ()  # step 1's composer holds one for each [[followups]] step
    # A memo of per-sender values; it changes no result, so render() stays pure.
    _senders: dict[str, _SenderView] = field(default_factory=dict, repr=False, compare=False)

    def render(
        self, recipient: Recipient, sender: SenderSettings, *, previous: PreviousStep | None = None
    ) -> Message:
        """The message `sender` sends to `recipient`; TemplateError or HeaderError name the row.

        A follow-up is rendered with `previous`, the step before it as sent to this recipient: its
        templates see it as `previous`, and the message answers it (`reply_to_message_id`).
        """
        row = recipient.row
        view = self._sender_view(sender)
        self._check_addressing(recipient, view)
        context = self._context(recipient, view)
        if self.step != FIRST_STEP:
            context["previous"] = _previous_variables(previous)
        unsubscribe_headers = self._render_unsubscribe(recipient, context)
        subject = self._render_subject(context, row)
        headers = self._render_headers(context, row)
        if sender.provider not in HEADERLESS_PROVIDERS:  # their unsubscribe is the body link
            headers.extend(unsubscribe_headers)
        html, text = self._render_bodies(context, row)
        files = tuple(self._render_attachment(item, context, row) for item in self.attachments)
        return Message(
            recipient_key=recipient.key,
            row=row,
            sender=sender.name,
            to=(recipient.address,),
            subject=subject,
            html=html,
            text=text,
            from_=view.from_,
            reply_to=self.reply_to,
            headers=tuple(headers),
            metadata=self._metadata(recipient.key),
            tracking=self._tracking(recipient.key),
            attachment_files=files,
            unsubscribe_url=context.get("unsubscribe_url"),
            reply_to_message_id=None if previous is None else _answered_id(previous, sender),
        )

    def render_own_files(self, recipient: Recipient, sender: SenderSettings) -> tuple[AttachmentFile, ...]:
        """The files of `recipient`'s own that step 1's message attaches (path templates), as `render`
        names them, without rendering the rest; TemplateError names the row."""
        own = [item for item in self.attachments if item.path.template is not None]
        if not own:
            return ()
        context = self._context(recipient, self._sender_view(sender))
        return tuple(self._render_attachment(item, context, recipient.row) for item in own)

    def _context(self, recipient: Recipient, view: _SenderView) -> dict[str, Any]:
        """What every template of `recipient`'s message sees (but the unsubscribe link and `previous`)."""
        context: dict[str, Any] = {**self.jinja_globals, **recipient.fields}
        # Built-in names win over columns of the same name, so `unsubscribe_url` is always ours: set by
        # `_render_unsubscribe`, or (no [unsubscribe]) not defined at all, never a list's link.
        for name in _UNSUBSCRIBE_NAMES:
            context.pop(name, None)
        context["recipient"] = {
            "email": recipient.address.email,
            "name": recipient.address.name,
            "key": recipient.key,
            "row": recipient.row,
        }
        context["sender"] = view.variables
        context["campaign"] = {"name": self.campaign}
        return context

    def for_step(self, step: str) -> Composer:
        """The composer of `step` ("message": this one); ManifestError if the manifest has no such step."""
        if step == self.step:
            return self
        for composer in self.followups:
            if composer.step == step:
                return composer
        raise ManifestError(f"no step {step!r} in the manifest's [[followups]]")

    def _tracking(self, key: str) -> Tracking | None:
        """Tracking options; with reply tracking, the label names campaign, recipient and step, because
        a `thread.replied` notification carries the label, not the metadata."""
        tracking = self.tracking
        if tracking is None or not tracking.thread_replies:
            return tracking
        label = f"{self.campaign}:{key}:{self.step}"
        return tracking if len(label) > _MAX_LABEL else replace(tracking, label=label)

    def _metadata(self, key: str) -> tuple[tuple[str, str], ...]:
        pairs = (("key1", self.campaign), ("key2", key), ("campaign", self.campaign), ("recipient", key))
        # Step 1's metadata stays as it always was: a resumed send must repeat its bytes exactly.
        return pairs if self.step == FIRST_STEP else (*pairs, ("key3", self.step), ("step", self.step))

    def _check_addressing(self, recipient: Recipient, view: _SenderView) -> None:
        """The sender, reply-to, and the recipient's name and address are safe header values."""
        row = recipient.row
        if view.problem is not None:
            raise HeaderError(view.problem, row=row, field=f"senders {view.settings.name!r}")
        if self.reply_to_problem is not None:
            raise HeaderError(f"message.reply_to {self.reply_to_problem}", row=row, field="message.reply_to")
        name = recipient.address.name
        if name is not None and (problem := header_value_problem(name)) is not None:
            column = f" (column {self.name_column!r})" if self.name_column else ""
            raise HeaderError(f"the recipient name{column} {problem}", row=row, column=self.name_column)
        if (problem := header_value_problem(recipient.address.email)) is not None:
            raise HeaderError(f"the recipient address {problem}", row=row, field="recipient address")

    def _render_unsubscribe(
        self, recipient: Recipient, context: dict[str, Any]
    ) -> tuple[tuple[str, str], ...]:
        """Sign the token, render the link into `context`, and give the List-Unsubscribe headers."""
        if self.unsubscribe_url is None:
            return ()
        row = recipient.row
        email = recipient.address.email
        try:
            if self.token_signer is not None:
                token = self.token_signer.sign(recipient.key, email=email)
            else:
                token = make_token(
                    secrets=self.secrets, campaign=self.campaign, recipient_key=recipient.key, email=email
                )
        except ValueError as exc:
            detail = f"{exc}; use a shorter recipients.key_column value"
            raise HeaderError(detail, row=row, field="recipients.key_column") from exc
        context["unsubscribe_token"] = token
        url = self._render_part(self.unsubscribe_url, context, row).strip()
        context["unsubscribe_url"] = url
        try:
            headers = build_unsubscribe_headers(
                url=url, mailto=self.mailto, token=token, campaign=self.campaign
            )
        except HeaderError as exc:
            raise HeaderError(str(exc), row=row, field="unsubscribe.url") from exc
        # build_composer let only a URL through that prints the token as it is; the values around it can
        # still hide it (`?t={{ ref }}{{ unsubscribe_token }}`, a '?' in a value before it): such a link
        # would unsubscribe no one, so the row is not sent.
        if not self.unsubscribe_url_checked and not url_carries_token(url, token):
            raise TemplateError(f"unsubscribe.url {_TOKEN_PLACE}", row=row, field="unsubscribe.url")
        return headers

    def _render_subject(self, context: dict[str, Any], row: int) -> str:
        subject = self._render_part(self.subject, context, row).strip()
        where = self.subject.label
        if not subject:
            raise TemplateError(f"{where} renders empty; give every row a subject", row=row, field=where)
        if (problem := header_value_problem(subject)) is not None:
            raise HeaderError(f"{where} {problem}", row=row, field=where)
        if len(subject) > _MAX_SUBJECT:
            detail = f"{where} is {len(subject)} characters; keep it under 998"
            raise HeaderError(detail, row=row, field=where)
        return subject

    def _render_headers(self, context: dict[str, Any], row: int) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        for header_name, part in self.headers:
            value = self._render_part(part, context, row)
            if (problem := header_value_problem(value)) is not None:
                raise HeaderError(f"{part.label} {problem}", row=row, field=part.label)
            if len(value) > _MAX_HEADER_VALUE:
                detail = f"{part.label} is {len(value):,} characters; Gmail refuses a header value over 32 KB"
                raise HeaderError(detail, row=row, field=part.label)
            headers.append((header_name, value))
        return headers

    def _render_bodies(self, context: dict[str, Any], row: int) -> tuple[str | None, str | None]:
        html = None if self.html is None else self._render_part(self.html, context, row)
        if self.markdown is not None and self.layout is not None:
            markdown = self._render_part(self.markdown, context, row)
            # Safe as is: markdown-it's HTML, from a source whose variables were escaped.
            context[_MARKDOWN_HTML] = Markup(render_markdown(markdown))
            html = self._render_part(self.layout, context, row)
        if html is not None and self.inline_css:
            html = inline_css(html, row=row)
        # No text template, no text: a send carries none (Nylas derives it), and where a text version is
        # shown, markup.build_text_from_html derives it then, not for every row.
        text = None if self.text is None else self._render_part(self.text, context, row)
        return html, text

    def _render_attachment(self, item: _AttachmentParts, context: dict[str, Any], row: int) -> AttachmentFile:
        filename = None if item.filename is None else self._render_part(item.filename, context, row)
        return build_attachment_file(
            key=item.key,
            path=self._render_part(item.path, context, row),
            filename=filename,
            content_type=item.settings.content_type,
            content_id=item.settings.cid,
            shared=item.path.template is None,
            row=row,
        )

    def _sender_view(self, sender: SenderSettings) -> _SenderView:
        view = self._senders.get(sender.name)
        if view is None or view.settings is not sender:
            view = _build_sender_view(sender)
            self._senders[sender.name] = view
        return view

    def _render_part(self, part: _CompiledPart, context: dict[str, Any], row: int) -> str:
        template = part.template
        if template is None:
            return part.constant
        if part.substitution is not None and (text := part.substitution.render(context)) is not None:
            return text
        try:
            try:
                return render_template(template, context, part.inheritance)  # `context` holds the globals
            except Exception:
                template.environment.handle_exception()  # re-raises with the file and line in the traceback
        except Exception as exc:  # a user's template can raise anything; name where it happened
            raise describe_render_error(exc, part.label, row, self.base_dir) from exc


def build_composer(
    manifest: Manifest, *, secrets: Sequence[bytes] | None, step: str = FIRST_STEP
) -> Composer:
    """Read and compile the templates of `step` (default: [message]) once (InputFileError,
    TemplateError, ManifestError); a follow-up's errors name its [[followups]] keys."""
    base_dir = manifest.base_dir
    message = manifest.step_message(step)
    where = "message" if step == FIRST_STEP else f"followups.{step}"
    sources: dict[str, tuple[str, str]] = {}  # loader name -> (source, filename)
    main_names: dict[str, str] = {}  # manifest key -> loader name
    for key, path in (
        (f"{where}.html", message.html),
        (f"{where}.text", message.text),
        (f"{where}.markdown", message.markdown),
        ("message.layout", message.layout),
    ):
        if path is not None and (key != "message.layout" or path.is_file()):
            name = loader_name(path, base_dir)
            sources[name] = (read_template_file(key, path), str(path))
            main_names[key] = name
    envs = _Environments.build(sources, base_dir)

    def compile_file(key: str, env: jinja2.Environment) -> _CompiledPart | None:
        name = main_names.get(key)
        if name is None:
            return None
        check_template_tree(env, name, base_dir)
        source, filename = sources[name]
        template = env.get_template(name)
        label = display_name(filename, base_dir)
        return _compiled(env, label, template, source)

    unsubscribe = manifest.unsubscribe
    unsubscribe_url: _CompiledPart | None = None
    mailto: str | None = None
    signer: TokenSigner | None = None
    url_checked = False
    if unsubscribe is not None:
        if not secrets:
            raise ManifestError(
                "[unsubscribe] needs a secret to sign links: "
                f"set the environment variable {unsubscribe.secret_env}"
            )
        unsubscribe_url = _compile_string(envs.text, "unsubscribe.url", unsubscribe.url)
        mailto = unsubscribe.mailto
        signer = TokenSigner(secrets=secrets, campaign=manifest.campaign.name)  # names are short: it signs
        where_url = f"{manifest.path.name}: unsubscribe.url"
        url_checked = _check_unsubscribe_url(where_url, envs.text, unsubscribe.url, unsubscribe_url, signer)

    headers: list[tuple[str, _CompiledPart]] = []
    for header_name, value in message.headers.items():
        if (problem := header_name_problem(header_name)) is not None:
            raise HeaderError(f"message.headers: {problem}")
        headers.append((header_name, _compile_string(envs.text, f"message.headers.{header_name}", value)))

    reply_to, reply_to_problem = _parse_reply_to(message.reply_to)
    files = AttachmentLoader(manifest.attachments_root) if message.attachments else None
    tracking = message.tracking
    return Composer(
        campaign=manifest.campaign.name,
        base_dir=base_dir,
        subject=_compile_string(envs.text, f"{where}.subject", message.subject),
        html=compile_file(f"{where}.html", envs.html),
        text=compile_file(f"{where}.text", envs.text),
        headers=tuple(headers),
        unsubscribe_url=unsubscribe_url,
        unsubscribe_url_checked=url_checked,
        mailto=mailto,
        secrets=tuple(secrets or ()),
        reply_to=reply_to,
        reply_to_problem=reply_to_problem,
        tracking=None
        if tracking is None
        else Tracking(
            opens=tracking.opens,
            links=tracking.links,
            thread_replies=tracking.thread_replies,
            label=tracking.label,
        ),
        name_column=manifest.recipients.name_column,
        jinja_globals=dict(envs.text.globals),  # Jinja's defaults: the same in every environment
        markdown=compile_file(f"{where}.markdown", envs.markdown),
        layout=_compile_layout(envs.html, message, base_dir) if message.markdown is not None else None,
        inline_css=message.inline_css,
        attachments=tuple(_compile_attachments(envs.text, message.attachments)),
        attachment_loader=files,
        token_signer=signer,
        step=step,
        followups=tuple(
            build_composer(manifest, secrets=secrets, step=item.name)
            for item in (manifest.followups if step == FIRST_STEP else ())
        ),
    )


@dataclass(frozen=True, slots=True)
class _Environments:
    """A campaign's templates, once per way of printing values (`Escaping`), each body in its own.

    Every template a body reaches (`{% extends/include/import %}`, literal or computed) is compiled in
    that body's environment, so it prints as the body needs whatever its file is called: a partial
    the text and HTML bodies share is escaped in the HTML only. The layout is HTML: it wraps the
    Markdown once markdown-it made it HTML. Subjects, headers and attachment paths are text.
    """

    text: jinja2.Environment
    html: jinja2.Environment
    markdown: jinja2.Environment

    @classmethod
    def build(cls, sources: Mapping[str, tuple[str, str]], base_dir: Path) -> _Environments:
        def one(escaping: Escaping) -> jinja2.Environment:
            return build_environment(sources, base_dir=base_dir, escaping=escaping)

        return cls(text=one(Escaping.NONE), html=one(Escaping.HTML), markdown=one(Escaping.MARKDOWN))


def _answered_id(previous: PreviousStep, sender: SenderSettings) -> str:
    """How a follow-up names the message it answers: an IMAP grant by its Message-ID header (when the
    send's answer gave it), Gmail and Graph by Nylas's id (nylas-api.md §1.2)."""
    if sender.provider in IMAP_PROVIDERS and previous.internet_message_id:
        return previous.internet_message_id
    return previous.message_id


def _previous_variables(previous: PreviousStep | None) -> dict[str, object]:
    """`previous` as a follow-up's templates see it (placeholders when checking before anything was sent)."""
    if previous is None:
        return {"step": "", "subject": "", "message_id": "", "thread_id": "", "sent_at": None}
    return {
        "step": previous.step,
        "subject": previous.subject,
        "message_id": previous.message_id,
        "thread_id": previous.thread_id,
        "sent_at": previous.sent_at,
    }


def _compile_layout(env: jinja2.Environment, message: MessageSettings, base_dir: Path) -> _CompiledPart:
    """A template that extends the layout and fills its content block with the rendered Markdown."""
    name = _DEFAULT_LAYOUT if message.layout is None else loader_name(message.layout, base_dir)
    try:
        env.get_template(name)
    except jinja2.TemplateNotFound as exc:
        raise InputFileError(
            f"message.layout: {message.layout} does not exist (nor is it a built-in template); check the path"
        ) from exc
    except jinja2.TemplateSyntaxError:
        pass  # check_template_tree names the file and line
    check_template_tree(env, name, base_dir)
    if "content" not in env.get_template(name).blocks:
        raise TemplateError(f"message.layout: {name} has no {{% block content %}} for the Markdown body")
    source = f"{{% extends {name!r} %}}{{% block content %}}{{{{ {_MARKDOWN_HTML} }}}}{{% endblock %}}"
    return _compiled(env, "message.layout", env.from_string(source), source)


def _compile_attachments(
    env: jinja2.Environment, attachments: Sequence[AttachmentSettings]
) -> list[_AttachmentParts]:
    compiled = []
    for number, settings in enumerate(attachments, start=1):
        key = f"message.attachments[{number}]"
        path = _compile_string(env, f"{key}.path", settings.path)
        if path.template is None:  # the same file for everyone: check it once, now
            check_shared_path(key, settings.path)
        name = settings.filename
        filename = None if name is None else _compile_string(env, f"{key}.filename", name)
        compiled.append(_AttachmentParts(key, settings, path, filename))
    return compiled


def _build_sender_view(sender: SenderSettings) -> _SenderView:
    where = f"senders {sender.name!r}"
    problem = None
    for key, value in (("from_name", sender.from_name), ("email", sender.email)):
        if value is not None and (found := header_value_problem(value)) is not None:
            problem = f"{where} {key} {found}"
            break
    # A grant sends from its mailbox unless told otherwise; a domain has no mailbox, and a send through it
    # must name its From (its `from`, the manifest requires it), with or without a display name.
    named = sender.from_name is not None or sender.domain is not None
    from_ = Address(sender.email, sender.from_name) if sender.email and named else None
    variables = {"name": sender.name, "email": sender.email, "from_name": sender.from_name}
    return _SenderView(settings=sender, variables=variables, from_=from_, problem=problem)


def _parse_reply_to(value: str | None) -> tuple[tuple[Address, ...], str | None]:
    """The reply-to address (the manifest validated its syntax), or the problem every row will report."""
    if value is None:
        return (), None
    if (problem := header_value_problem(value)) is not None:
        return (), problem
    return (Address(value.strip()),), None


def _check_unsubscribe_url(
    where: str, env: jinja2.Environment, source: str, part: _CompiledPart, signer: TokenSigner
) -> bool:
    """ManifestError unless unsubscribe.url (`source`, compiled as `part`) prints the token as it is; True
    when it names nothing else and was found to carry a token where the endpoint looks, False when each
    row's link is to be looked at. `where` names the manifest's key in errors.
    """
    tree = env.parse(source)
    if part.template is None or not _prints_token_as_is(tree):
        raise ManifestError(f"{where}: {TOKEN_IN_URL_RULE}")
    if any(node.name != _TOKEN for node in tree.find_all(nodes.Name)):
        return False  # a row's or a sender's values (or `| default`s) shape each link: render looks at each
    # Only the token changes from row to row, and every token is alike to the endpoint (URL-safe, of
    # TOKEN_SHAPE): one link tells of them all.
    token = signer.sign("someone@example.com")
    try:
        url = render_template(part.template, {**env.globals, _TOKEN: token}, part.inheritance).strip()
    except Exception:  # an error every row's render reports, naming the row
        return False
    if not url_carries_token(url, token):
        raise ManifestError(f"{where} {_TOKEN_PLACE}")
    return True


def _prints_token_as_is(tree: nodes.Template) -> bool:
    """Whether unsubscribe.url prints the token for every row, unchanged, wherever it names it: only as a
    top-level `{{ unsubscribe_token }}` (outside any if, loop, block or macro; `urlencode` keeps it), and
    at least once. The manifest's check reads the text; this one reads what Jinja will run."""
    outputs = [node for node in tree.body if isinstance(node, nodes.Output)]
    printed = [_unfiltered(item) for output in outputs for item in output.nodes]
    # Every use counts, stores too: `{% set unsubscribe_token = … %}` would print another value.
    named = [node for node in tree.find_all(nodes.Name) if node.name == _TOKEN]
    return bool(named) and all(any(node is item for item in printed) for node in named)


def _unfiltered(expression: nodes.Expr) -> nodes.Expr:
    """`expression` without the filters around it that leave a token unchanged."""
    while (
        isinstance(expression, nodes.Filter)
        and expression.node is not None
        and expression.name in _TOKEN_KEEPING_FILTERS
        and not (expression.args or expression.kwargs or expression.dyn_args or expression.dyn_kwargs)
    ):
        expression = expression.node
    return expression


def _compile_string(env: jinja2.Environment, label: str, source: str) -> _CompiledPart:
    if not any(marker in source for marker in _TEMPLATE_MARKERS):
        return _CompiledPart(label=label, constant=source)
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{label}: template syntax error: {exc.message}; fix the template") from exc
    return _compiled(env, label, template, source)


def _compiled(env: jinja2.Environment, label: str, template: jinja2.Template, source: str) -> _CompiledPart:
    """`template` with what renders it faster than Jinja's own render when it can (see `_render_part`)."""
    tree = env.parse(source, template.name)  # parsed once for both
    return _CompiledPart(
        label,
        template,
        inheritance=stack_inheritance(env, template, tree),
        substitution=find_substitution(env, template, tree),
    )
