"""GE's Data Docs page made to work offline: the body stays GE's, the remote assets go.

GE's page template loads bootstrap, bootstrap-table, font-awesome, jQuery and vega from CDNs. Where a user
opens ``lake/validation/<stem>.html`` without internet the page then renders unstyled and its status column
is empty (the status marks are font-awesome icons). GE already inlines its own stylesheet
(``data_docs_default_styles.css``); this pass removes every remote ``<link>``/``<script>``/``<img>``, adds a
short stylesheet that stands in for bootstrap's tables and grid, turns each icon into a text glyph and
replaces GE's jQuery filter buttons with plain JavaScript.
"""

from __future__ import annotations

import re

# A URL that leaves the machine: http(s) or protocol-relative.
_REMOTE = r"""["']?(?:https?:)?//"""
_REMOTE_SCRIPT = re.compile(rf"<script\b[^>]*\bsrc\s*=\s*{_REMOTE}[^>]*>\s*</script\s*>", re.IGNORECASE)
_REMOTE_LINK = re.compile(rf"<link\b[^>]*\bhref\s*=\s*{_REMOTE}[^>]*>", re.IGNORECASE)
_REMOTE_IMG = re.compile(rf"<img\b[^>]*\bsrc\s*=\s*{_REMOTE}[^>]*>", re.IGNORECASE)
_REMOTE_CSS_URL = re.compile(rf"url\(\s*{_REMOTE}[^)]*\)", re.IGNORECASE)
_ALT = re.compile(r"""\balt\s*=\s*["']([^"']*)["']""", re.IGNORECASE)
# GE's "how to" modal script calls jQuery even in its catch block: offline it only throws.
_WALKTHROUGH_SCRIPT = re.compile(r"<script>(?:(?!</script>).)*ge-walkthrough-modal(?:(?!</script>).)*</script>",
                                 re.DOTALL)
_ICON = re.compile(r"""<i\s+class\s*=\s*["']([^"']*\bfa-[^"']*)["'][^>]*>\s*</i>""", re.IGNORECASE)
_BODY = re.compile(r"<body\b[^>]*>", re.IGNORECASE)

# font-awesome icon -> (glyph, css class, title). GE uses these four (status, exception, notes); any other
# icon still gets a visible mark, so no cell is ever empty.
_GLYPHS = {
    "fa-check-circle": ("✔", "nc-ok", "passed"),
    "fa-check": ("✔", "nc-ok", "passed"),
    "fa-times": ("✘", "nc-fail", "failed"),
    "fa-times-circle": ("✘", "nc-fail", "failed"),
    "fa-exclamation-triangle": ("⚠", "nc-warn", "GE could not evaluate this expectation"),
    "fa-comment": ("✎", "nc-info", "note"),
}
_OTHER_GLYPH = ("•", "nc-info", "")

# Stands in for bootstrap: bordered, padded tables, the sidebar beside the results, GE's alert-style headers.
OFFLINE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#212529;line-height:1.45}
a{color:#0b63c5}
table{border-collapse:collapse;margin:.5rem 0;max-width:100%}
th,td{border:1px solid #ccd2d8;padding:4px 8px;text-align:left;vertical-align:top}
table.table{width:100%}
thead th{background:#eef1f4}
body>.container-fluid{padding:1rem 2rem}
body>.container-fluid>.row{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}
body>.container-fluid>.row>.col-lg-2{flex:0 0 15rem;max-width:15rem}
body>.container-fluid>.row>.col-lg-10{flex:1 1 30rem;min-width:0}
.table-responsive{overflow-x:auto}
body>nav.navbar{display:none}
.m-0{margin:0}.p-0{padding:0}
.card{border:1px solid #ccd2d8;border-radius:4px;margin-bottom:1rem}
.card-header{background:#eef1f4;padding:4px 8px}
.card-body{padding:4px 8px}
.nav{list-style:none;margin:0;padding:0}
.alert-secondary{background:#e2e3e5;border:1px solid #d6d8db;border-radius:4px;padding:6px 10px;margin:1rem 0 .25rem}
.text-danger{color:#b3261e}.text-success{color:#1e7b34}.text-info{color:#0b63c5}
.nc-status{font-weight:bold;font-size:1.15em;cursor:help}
.nc-ok{color:#1e7b34}.nc-fail{color:#b3261e}.nc-warn{color:#a35c00}.nc-info{color:#0b63c5}
.nc-summary{padding:1rem 2rem;border-bottom:2px solid #ccd2d8;background:#f8f9fa}
.nc-summary h1{margin:0 0 .5rem;font-size:1.5rem}
.nc-note{max-width:60rem}
"""

# GE's "Show All" / "Failed Only" buttons call jQuery; these plain versions are defined after GE's, so win.
# A succeeded expectation's status cell carries hide-succeeded-validation-target-child; a section whose
# expectations all succeeded carries hide-succeeded-validations-column-section-target-child.
_FILTER_SCRIPT = """<script>
function nestcastShow(failedOnly){
  document.querySelectorAll('.hide-succeeded-validation-target-child').forEach(function(cell){
    cell.parentElement.style.display = failedOnly ? 'none' : '';});
  document.querySelectorAll('.hide-succeeded-validations-column-section-target-child').forEach(function(block){
    block.parentElement.parentElement.style.display = failedOnly ? 'none' : '';});
}
function showAllValidations(){ nestcastShow(false); }
function hideSucceededValidations(){ nestcastShow(true); }
</script>
"""


def offline_page(page: str, summary: str = "") -> str:
    """``page`` (GE's rendered HTML) without remote assets, with text status marks and ``summary`` on top."""
    page = _REMOTE_SCRIPT.sub("", page)
    page = _REMOTE_LINK.sub("", page)
    page = _REMOTE_IMG.sub(_alt_text, page)
    page = _REMOTE_CSS_URL.sub("none", page)
    page = _WALKTHROUGH_SCRIPT.sub("", page)
    page = _ICON.sub(_glyph, page)
    page = page.replace("</head>", f"<style>{OFFLINE_CSS}</style>\n</head>", 1)
    page = _BODY.sub(lambda body: body.group(0) + summary, page, count=1)
    return page.replace("</body>", _FILTER_SCRIPT + "</body>", 1)


def _alt_text(img: re.Match[str]) -> str:
    alt = _ALT.search(img.group(0))
    return alt.group(1) if alt else ""


def _glyph(icon: re.Match[str]) -> str:
    classes = icon.group(1).split()
    glyph, css, title = next((_GLYPHS[c] for c in classes if c in _GLYPHS), _OTHER_GLYPH)
    title = title or next((c.removeprefix("fa-") for c in classes if c.startswith("fa-")), "")
    return f'<span class="nc-status {css}" title="{title}" aria-label="{title}">{glyph}</span>'
