"""The fixed parts of the preview site: its stylesheet, its two small scripts, and the page shell.

Everything here is constant: no recipient data ever goes into a script. Each page carries
a Content-Security-Policy that allows only these scripts (by hash), inline styles, and
`data:` images, so the site needs no network and a slip in escaping could not run code;
sandboxed iframes inherit the same policy. Pure.
"""

from __future__ import annotations

import base64
import hashlib
import html

__all__ = ["FILTER_SCRIPT", "PAYLOAD_SCRIPT", "render_page"]

_CSS = """
:root { color-scheme: light; --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bad: #b91c1c;
        --warn: #92400e; --ok: #166534; --bg: #ffffff; --soft: #f9fafb; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 16px 24px 48px; color: var(--fg); background: var(--bg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
p.lead, .muted { color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
th, td { text-align: left; vertical-align: top; padding: 5px 8px; border-bottom: 1px solid var(--line); }
th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
#rows td:first-child, #problems td:first-child { white-space: nowrap; }
table.kv th { width: 220px; position: static; }
code, pre { font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--soft); border: 1px solid var(--line); padding: 10px; overflow: auto;
      white-space: pre-wrap; word-break: break-all; max-height: 480px; }
.bad { color: var(--bad); } .warn { color: var(--warn); } .ok { color: var(--ok); }
ul.warnings li { color: var(--warn); margin: 3px 0; }
.controls { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin: 6px 0; }
.controls input { flex: 1 1 320px; padding: 6px 8px; font: inherit; }
.controls select, button { padding: 6px 8px; font: inherit; }
iframe.body { width: 100%; height: 70vh; border: 1px solid var(--line); resize: vertical; background: #fff; }
tr[data-state="invalid"] td, tr[data-state="invalid (skipped)"] td { background: #fef2f2; }
nav { margin-bottom: 8px; }
"""

FILTER_SCRIPT = """(function () {
  "use strict";
  var query = document.getElementById("q");
  var state = document.getElementById("state");
  var shown = document.getElementById("shown");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#rows tbody tr"));
  var texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  function apply() {
    var needle = query.value.trim().toLowerCase();
    var wanted = state.value;
    var count = 0;
    for (var i = 0; i < rows.length; i++) {
      var match = (!wanted || rows[i].getAttribute("data-state") === wanted) &&
                  (!needle || texts[i].indexOf(needle) !== -1);
      rows[i].hidden = !match;
      if (match) { count++; }
    }
    shown.textContent = count + " of " + rows.length + " rows shown";
  }
  query.addEventListener("input", apply);
  state.addEventListener("change", apply);
  apply();
})();
"""

PAYLOAD_SCRIPT = """(function () {
  "use strict";
  var exact = document.getElementById("payload");
  var pretty = document.getElementById("payload-pretty");
  var button = document.getElementById("pretty-toggle");
  if (!exact || !pretty || !button) { return; }
  button.addEventListener("click", function () {
    if (pretty.hidden) {
      if (!pretty.textContent) {
        try { pretty.textContent = JSON.stringify(JSON.parse(exact.textContent), null, 2); }
        catch (error) { pretty.textContent = "not JSON: " + error.message; }
      }
      pretty.hidden = false; exact.hidden = true; button.textContent = "Show the exact bytes";
    } else {
      pretty.hidden = true; exact.hidden = false; button.textContent = "Pretty-print";
    }
  });
})();
"""


def _script_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def render_page(title: str, body: str, *, scripts: tuple[str, ...] = ()) -> str:
    """A complete HTML page: `title` is plain text (escaped here), `body` is HTML escaped by the caller."""
    allowed = " ".join(_script_hash(script) for script in scripts) or "'none'"
    policy = (
        f"default-src 'none'; script-src {allowed}; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'"
    )
    tags = "".join(f"<script>{script}</script>\n" for script in scripts)
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(policy)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n{tags}</body>\n</html>\n"
    )
