"""The preview site: static HTML pages that show a whole campaign before anything is sent.

`write_site` writes `index.html` (counts, senders and schedule, warnings, every problem
row, and a searchable listing of recipients), one page per sampled message (headers, the
HTML body in a sandboxed iframe, the text body, attachments, and the exact request body a
run would POST, also as a file), and one page per problem row. Every value from the
list or the templates is HTML-escaped; the scripts are constants (campaign.preview._assets);
pages work from the file system with no server and no network. It writes only inside
the folder it is given, through no symbolic link, and never sends.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from datetime import datetime
from html import escape
from pathlib import Path

from campaign.errors import InputFileError
from campaign.models import FIRST_STEP
from campaign.outputfiles import (
    SymlinkRefusedError,
    make_private_dir,
    open_private_folder,
    write_private_bytes,
    write_private_text,
)
from campaign.preview._assets import FILTER_SCRIPT, PAYLOAD_SCRIPT, render_page
from campaign.preview._report import ListedRow, PreviewReport, RowProblem, Sample
from campaign.timetext import format_duration

__all__ = [
    "INDEX_FILE",
    "body_file_name",
    "message_page_name",
    "payload_file_name",
    "problem_page_name",
    "write_site",
]

INDEX_FILE = "index.html"
_FOLDERS = ("messages", "problems")
# What an earlier preview wrote (a follow-up's request files carry its step: 0001.nudge.json).
_OWNED = re.compile(r"^(\d{4,}(\.[A-Za-z0-9_-]+)?\.(html|json|multipart)|row-\d+\.html)$")


def message_page_name(number: int) -> str:
    """Where sample `number`'s page is, relative to the site folder."""
    return f"messages/{number:04d}.html"


def payload_file_name(sample: Sample) -> str:
    """Where the sample's JSON is (the whole body of a JSON send), relative to the site folder."""
    return f"messages/{_stem(sample)}.json"


def body_file_name(sample: Sample) -> str | None:
    """Where a multipart sample's whole request body is, relative to the site folder (None for JSON)."""
    return (
        None if sample.request.content_type == "application/json" else f"messages/{_stem(sample)}.multipart"
    )


def _stem(sample: Sample) -> str:
    """0001 for step 1's files, 0001.nudge for a follow-up's."""
    return f"{sample.number:04d}" if sample.step == FIRST_STEP else f"{sample.number:04d}.{sample.step}"


def problem_page_name(row: int) -> str:
    """Where problem row `row`'s page is, relative to the site folder."""
    return f"problems/row-{row}.html"


def write_site(report: PreviewReport, directory: Path) -> Path:
    """Write the site into `directory`, replacing pages an earlier preview left; return index.html.

    It follows no symbolic link inside `directory`: a linked `messages`/`problems` folder, or a link
    where a page goes, is refused (InputFileError) before anything is written or removed.
    """
    try:
        return _write_site(report, directory)
    except SymlinkRefusedError as exc:
        message = (
            f"{exc.path} is a symbolic link, and the preview writes through none; "
            "remove the link, or give --out another folder"
        )
        raise InputFileError(message) from exc
    except OSError as exc:
        message = (
            f"{directory}: cannot write the preview site ({exc.strerror or exc}); "
            "give --out a folder you can write"
        )
        raise InputFileError(message) from exc


def _write_site(report: PreviewReport, directory: Path) -> Path:
    steps = [step for sample in report.samples for step in (sample, *sample.steps)]
    names = [
        *_FOLDERS,
        INDEX_FILE,
        *(payload_file_name(step) for step in steps),
        *(name for step in steps if (name := body_file_name(step)) is not None),
        *(message_page_name(sample.number) for sample in report.samples),
        *(problem_page_name(problem.row) for problem in report.problems),
    ]
    # Every link is refused before the first change; the writes themselves never follow one either.
    for name in names:
        if (directory / name).is_symlink():
            raise SymlinkRefusedError(directory / name)
    # The pages hold addresses and working unsubscribe links: owner-only, like the ledger.
    make_private_dir(directory)
    with ExitStack() as stack:
        folders: list[int] = []
        for folder in _FOLDERS:
            fd = open_private_folder(directory / folder)
            stack.callback(os.close, fd)
            folders.append(fd)
            with os.scandir(fd) as found:
                stale = [
                    entry.name
                    for entry in found
                    if entry.is_file(follow_symlinks=False) and _OWNED.match(entry.name)
                ]
            for name in stale:
                os.unlink(name, dir_fd=fd)
        messages, problems = folders
        for sample in report.samples:
            for step in (sample, *sample.steps):
                write_private_bytes(
                    directory / payload_file_name(step), step.request.json_body, folder=messages
                )
                if (body_name := body_file_name(step)) is not None:
                    write_private_bytes(directory / body_name, step.request.body, folder=messages)
            write_private_text(
                directory / message_page_name(sample.number), _message_page(report, sample), folder=messages
            )
        for problem in report.problems:
            write_private_text(
                directory / problem_page_name(problem.row), _problem_page(report, problem), folder=problems
            )
    index = directory / INDEX_FILE
    write_private_text(index, _index_page(report))
    return index


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _table(headings: Sequence[str], rows: Iterable[Sequence[str]], *, attrs: str = "") -> str:
    """A table; `rows` hold HTML already escaped (cells are trusted markup here)."""
    head = "".join(f"<th>{_e(heading)}</th>" for heading in headings)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _key_values(pairs: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_e(key)}</th><td>{value}</td></tr>\n" for key, value in pairs)
    return f'<table class="kv"><tbody>\n{rows}</tbody></table>'


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _visible(value: str) -> str:
    """A cell with its control characters spelled out (a CR/LF in a name is often the problem)."""
    return _CONTROL.sub(
        lambda found: {"\r": "\\r", "\n": "\\n", "\t": "\\t"}.get(
            found.group(0), f"\\x{ord(found.group(0)):02x}"
        ),
        value,
    )


# --- index.html --------------------------------------------------------------------------


def _index_page(report: PreviewReport) -> str:
    started = report.started_at.astimezone()
    when = _e(f"{started:%Y-%m-%d %H:%M %Z}")
    parts = [
        f"<h1>Preview: {_e(report.campaign)}</h1>",
        f'<p class="lead">A dry run of <code>{_e(report.manifest)}</code> at {when}: every row checked '
        "and rendered; nothing was sent and the ledger was not written.</p>",
        "<h2>Recipients</h2>",
        _key_values(_counts(report)),
        "<h2>Senders and schedule</h2>",
        _senders_table(report),
        f"<p>Estimated time to send everything: <strong>{_e(format_duration(report.duration_s))}</strong>"
        f" (if started at {_e(f'{started:%Y-%m-%d %H:%M}')}, done about "
        f"{_e(f'{report.finishes_at.astimezone():%Y-%m-%d %H:%M %Z}')}).</p>",
        *_windows(report),
        *_steps(report),
        "<h2>Warnings</h2>",
        _warnings_list(report.warnings),
    ]
    if report.problems:
        rows = "1 row" if len(report.problems) == 1 else f"{len(report.problems)} rows"
        parts += [f'<h2 class="bad">Problems ({rows})</h2>', _problems_table(report)]
    if report.samples:
        links = "".join(
            f'<li><a href="{_e(message_page_name(s.number))}">Message {s.number}</a>: '
            f"{_e(s.message.to[0].email)}, {_e(s.message.subject)}</li>"
            for s in report.samples
        )
        parts += ["<h2>Sample messages</h2>", f"<ul>{links}</ul>"]
    parts += ["<h2>Every row</h2>", _listing(report)]
    return render_page(f"Preview: {report.campaign}", "\n".join(parts), scripts=(FILTER_SCRIPT,))


def _counts(report: PreviewReport) -> list[tuple[str, str]]:
    counts = [
        ("rows in " + report.source, f"{report.rows:,}"),
        ("to send", f"<strong>{report.to_send:,}</strong>"),
    ]
    for state, count in sorted(report.already_done.items()):
        counts.append((f"already {state} (per the ledger)", f"{count:,}"))
    for reason, count in sorted(report.skipped.items()):
        counts.append((f"skipped: {reason.value}", f"{count:,}"))
    bad = len(report.problems)
    verdict = "skipped (--skip-invalid)" if report.skip_invalid else "a run stops before sending (exit 65)"
    counts.append(("rows with problems", f'<span class="{"bad" if bad else "ok"}">{bad:,}</span>'))
    if bad:
        counts.append(("because of them", _e(verdict)))
    return counts


def _senders_table(report: PreviewReport) -> str:
    rows = []
    for plan in report.senders:
        pace = f"{plan.rate_per_s:g}/s" if plan.rate_per_s >= 1 else f"{plan.rate_per_s * 60:g}/min"
        rows.append(
            [
                _e(plan.name),
                _e(plan.email or plan.route),
                _e(plan.provider or "-"),
                f"{plan.messages:,}",
                _e(pace),
                str(plan.burst),
                "-" if plan.per_day is None else f"{plan.per_day:,}",
                str(plan.concurrency),
                f"{plan.used_24h:,}",
                f"{plan.next_24h:,}",
                _e(format_duration(plan.duration_s)),
            ]
        )
    headings = ("sender", "mailbox", "provider", "messages", "pace", "burst", "per day", "in flight")
    return _table((*headings, "used, last 24 h", "next 24 h", "takes"), rows)


def _windows(report: PreviewReport) -> list[str]:
    rows = [
        [
            _e(plan.name),
            _e(window.window),
            "open now" if window.opens is None else _local(window.opens),
            _local(window.finishes_at),
        ]
        for plan in report.senders
        if (window := plan.window) is not None
    ]
    if not rows:
        return []
    return ["<h3>Send windows</h3>", _table(("sender", "window", "next opens", "its messages done by"), rows)]


def _local(moment: datetime) -> str:
    return _e(f"{moment.astimezone():%Y-%m-%d %H:%M %Z}")


def _steps(report: PreviewReport) -> list[str]:
    if not report.steps:
        return []
    rows = [
        [str(number), _e(step.name), _e(step.after or "-"), _e(step.stops or "-")]
        for number, step in enumerate(report.steps, start=1)
    ]
    note = (
        "<p>Each follow-up goes to a recipient after the step before was sent to them, as a reply in "
        "its thread, through the same mailbox; every sample's page has a tab per step.</p>"
    )
    return ["<h2>Steps</h2>", _table(("#", "step", "after", "stops"), rows), note]


def _warnings_list(warnings: Sequence[str]) -> str:
    if not warnings:
        return '<p class="ok">None.</p>'
    return '<ul class="warnings">' + "".join(f"<li>{_e(warning)}</li>" for warning in warnings) + "</ul>"


def _problems_table(report: PreviewReport) -> str:
    rows = []
    for problem in report.problems:
        link = f'<a href="{_e(problem_page_name(problem.row))}">row {problem.row}</a>'
        for issue in problem.issues:
            rows.append([link, _e(problem.email), _e(issue.where), _e(issue.message)])
    return _table(("row", "address", "column / variable", "problem and fix"), rows, attrs=' id="problems"')


def _listing(report: PreviewReport) -> str:
    states = sorted({row.state for row in report.listed})
    options = '<option value="">every state</option>' + "".join(
        f'<option value="{_e(state)}">{_e(state)}</option>' for state in states
    )
    note = ""
    if not report.listed_all:
        listed = len(report.listed) - len(report.problems)
        note = (
            f'<p class="warn">This list is long: the first {listed:,} rows are listed here,'
            f" plus every problem row ({len(report.problems):,}). The counts above cover all "
            f"{report.rows:,} rows; <code>campaign preview --json</code> gives them to scripts.</p>"
        )
    controls = (
        '<div class="controls"><input id="q" type="search" aria-label="Search" '
        'placeholder="Search address, name, sender, subject…">'
        f'<select id="state" aria-label="State">{options}</select>'
        '<span id="shown" class="muted"></span></div>'
    )
    rows = "".join(_listed_row(row) for row in report.listed)
    headings = "".join(
        f"<th>{heading}</th>"
        for heading in ("row", "address", "name", "sender", "subject", "state", "warnings")
    )
    table = f'<table id="rows"><thead><tr>{headings}</tr></thead><tbody>\n{rows}</tbody></table>'
    return note + controls + table


def _listed_row(row: ListedRow) -> str:
    number = str(row.row)
    if row.sample is not None:
        number = f'<a href="{_e(message_page_name(row.sample))}">{row.row}</a>'
    elif row.state.startswith("invalid"):
        number = f'<a href="{_e(problem_page_name(row.row))}">{row.row}</a>'
    state = _e(row.state) + (f'<br><span class="muted">{_e(row.detail)}</span>' if row.detail else "")
    warnings = "<br>".join(_e(note) for note in row.warnings)
    cells = (number, _e(row.email), _e(row.name), _e(row.sender), _e(row.subject), state, warnings)
    return f'<tr data-state="{_e(row.state)}">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>\n"


# --- a message page ----------------------------------------------------------------------


def _message_page(report: PreviewReport, sample: Sample) -> str:
    to = sample.message.to[0]
    parts = [
        f'<nav><a href="../{INDEX_FILE}">&larr; the whole campaign</a></nav>',
        f"<h1>Message {sample.number}: to {_e(to.email)}</h1>",
    ]
    if sample.steps:
        parts.append(_step_tabs(report, (sample, *sample.steps)))
    else:
        parts.append(_step_panel(report, sample))
    title = f"Message {sample.number}: {sample.message.subject}"
    return render_page(title, "\n".join(parts), scripts=(PAYLOAD_SCRIPT,))


def _step_tabs(report: PreviewReport, steps: Sequence[Sample]) -> str:
    """One tab per step: radio buttons and labels, the checked one's panel shown (CSS only, no script)."""
    # Step names are the manifest's ([A-Za-z0-9_-]), never list data; escaped all the same.
    shown = ", ".join(f"#step-{n}:checked ~ #panel-{n}" for n in range(len(steps)))
    style = (
        "<style>.steps > input { position: absolute; opacity: 0; } "
        ".steps > label { display: inline-block; padding: .3em .8em; border: 1px solid #999; "
        "border-bottom: none; cursor: pointer; margin-right: .2em; } "
        ".steps > input:checked + label { background: #eee; font-weight: bold; } "
        ".steps > section.step { display: none; border-top: 1px solid #999; } "
        f"{shown} {{ display: block; }}</style>"
    )
    tabs = "".join(
        f'<input type="radio" name="step" id="step-{n}"{" checked" if n == 0 else ""}>'
        f'<label for="step-{n}">{n + 1}. {_e(step.step)}</label>'
        for n, step in enumerate(steps)
    )
    panels = "".join(
        f'<section class="step" id="panel-{n}">{_step_panel(report, step)}</section>'
        for n, step in enumerate(steps)
    )
    return f'{style}<div class="steps">{tabs}{panels}</div>'


def _step_panel(report: PreviewReport, sample: Sample) -> str:
    """Everything about one step's message: headers, bodies, attachments, the request."""
    message = sample.message
    to = message.to[0]
    plan = next((plan for plan in report.senders if plan.name == message.sender), None)
    sent_from = "the mailbox's own address and name (Nylas fills them in)"
    if message.from_ is not None:
        sent_from = (
            f"{message.from_.name} <{message.from_.email}>" if message.from_.name else message.from_.email
        )
    headers = [
        ("From", _e(sent_from)),
        ("To", _e(f"{to.name} <{to.email}>" if to.name else to.email)),
        ("Subject", _e(message.subject)),
    ]
    if message.reply_to:
        headers.append(("Reply-To", _e(", ".join(address.email for address in message.reply_to))))
    headers += [(name, f"<code>{_e(value)}</code>") for name, value in message.headers]
    if not any(name.lower() == "list-unsubscribe" for name, _ in message.headers):
        headers.append(
            ("List-Unsubscribe", '<span class="warn">none (no [unsubscribe] in the manifest)</span>')
        )
    route = "" if plan is None else f" via {plan.route}"
    sender = [("sender", _e(f"{message.sender}{route}")), ("row", str(message.row))]
    if message.tracking is not None:
        tracking = message.tracking
        sender.append(
            ("tracking", _e(f"opens={tracking.opens}, links={tracking.links}, label={tracking.label}"))
        )
    sender += [(f"metadata {key}", _e(value)) for key, value in message.metadata]
    parts = []
    if sample.step != FIRST_STEP:
        parts.append(
            f'<p class="note">Sent {_e(sample.after)} after the step before, to this recipient, as a reply '
            f"in its thread through the same mailbox; {_e(sample.stops)}. Its "
            "<code>reply_to_message_id</code> and <code>previous.sent_at</code> are stand-ins here: the "
            "run uses the step before's, once it is sent.</p>"
        )
    if message.reply_to_message_id is not None:
        sender.append(("reply_to_message_id", _e(message.reply_to_message_id)))
    parts += [
        "<h2>Headers</h2>",
        _key_values(headers),
        _key_values(sender),
        "<h2>HTML body</h2>",
        _html_body(sample),
        "<h2>Text body</h2>",
        _text_body(sample),
        "<h2>Attachments</h2>",
        _attachments(sample),
        "<h2>The request a run would send</h2>",
        _request(sample),
    ]
    return "\n".join(parts)


def _html_body(sample: Sample) -> str:
    body = sample.message.html
    if body is None:
        return '<p class="muted">None: a plain-text message.</p>'
    # Inline images are shown from the attachments themselves (cid: means nothing to a browser).
    for attachment in sample.message.attachments:
        if attachment.content_id:
            data = base64.b64encode(attachment.content).decode("ascii")
            body = body.replace(
                f"cid:{attachment.content_id}", f"data:{attachment.content_type};base64,{data}"
            )
    # sandbox="" : no scripts, no forms, no popups, no navigation of this page; an opaque origin.
    return (
        f'<iframe class="body" sandbox="" referrerpolicy="no-referrer" title="HTML body" '
        f'srcdoc="{_e(body)}"></iframe>'
    )


def _text_body(sample: Sample) -> str:
    if sample.message.text is not None:
        return f"<pre>{_e(sample.message.text)}</pre>"
    return '<p class="muted">None in the request: Nylas derives the text part from the HTML body.</p>'


def _attachments(sample: Sample) -> str:
    if not sample.message.attachments:
        return '<p class="muted">None.</p>'
    rows = [
        [
            _e(item.filename),
            _e(item.content_type),
            f"{item.size:,} bytes ({item.size / 1_000_000:.2f} MB)",
            _e(item.content_id or ""),
        ]
        for item in sample.message.attachments
    ]
    total = sum(item.size for item in sample.message.attachments)
    return _table(("file", "type", "size", "inline as cid:"), rows) + f"<p>Total: {total:,} bytes.</p>"


def _request(sample: Sample) -> str:
    request = sample.request
    headers = [(name, f"<code>{_e(value)}</code>") for name, value in request.headers]
    headers.append(
        ("Authorization", '<code>Bearer …</code> <span class="muted">(your API key: never shown)</span>')
    )
    payload_name = payload_file_name(sample).split("/")[-1]
    body_name = body_file_name(sample)
    if body_name is None:
        where = f'the JSON below, exactly as in <a href="{_e(payload_name)}">{_e(payload_name)}</a>'
    else:
        name = body_name.split("/")[-1]
        where = (
            f'multipart/form-data, exactly as in <a href="{_e(name)}">{_e(name)}</a>: a <code>message</code> '
            f'part holding the JSON below (<a href="{_e(payload_name)}">{_e(payload_name)}</a>), then one '
            "part per attachment (attachments this big cannot go as JSON)"
        )
    return (
        f"<p><code>{_e(request.method)} {_e(request.url)}</code></p>"
        + _key_values(headers)
        + f"<p>Body: {len(request.body):,} bytes: {where}. "
        + "The Idempotency-Key is chosen per send and kept in the ledger.</p>"
        + _payload(sample)
    )


def _payload(sample: Sample) -> str:
    body = _e(sample.request.json_body.decode("utf-8"))
    if sample.step != FIRST_STEP:  # the page's pretty-print button serves step 1's request
        return f'<pre class="payload">{body}</pre>'
    return (
        '<p><button id="pretty-toggle" type="button">Pretty-print</button></p>'
        + f'<pre id="payload">{body}</pre>'
        + '<pre id="payload-pretty" hidden></pre>'
    )


# --- a problem page ----------------------------------------------------------------------


def _problem_page(report: PreviewReport, problem: RowProblem) -> str:
    verdict = (
        "Skipped (the run was given --skip-invalid) and recorded as invalid in the ledger."
        if report.skip_invalid
        else "A run stops on this row before sending anything (exit 65), unless given --skip-invalid."
    )
    issues = [[_e(issue.where), _e(issue.message)] for issue in problem.issues]
    cells = [[_e(column), f"<code>{_e(_visible(value))}</code>"] for column, value in problem.fields]
    lines = "\n".join(issue.text for issue in problem.issues)
    parts = [
        f'<nav><a href="../{INDEX_FILE}">&larr; the whole campaign</a></nav>',
        f'<h1 class="bad">Row {problem.row} of {_e(report.source)}: {_e(problem.email or "no address")}</h1>',
        f"<p>{_e(verdict)}</p>",
        "<h2>What is wrong, and the fix</h2>",
        _table(("column / variable", "problem and fix"), issues),
        "<h2>The row</h2>",
        _table(("column", "value"), cells),
        "<h2>As the run reports it</h2>",
        f"<pre>{_e(lines)}</pre>",
    ]
    return render_page(f"Row {problem.row}: problem", "\n".join(parts))
