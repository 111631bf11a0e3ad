"""The documentation site, built and looked at in a real headless Chromium.

The site is built with ``mkdocs build --strict``, served over HTTP on the
loopback, and every page is loaded at 1,280 CSS px wide: nothing may scroll
sideways (neither the page nor a code block, table or diagram inside it),
every public name has a heading and a signature on the API page, and every
link within the site reaches a page and an anchor that exist.

Without Chromium (Debian's ``chromium`` package) or mkdocs (the ``docs``
extra) these tests skip, saying which is missing; in CI (``CI`` set, as in
``CI=true``) they fail instead.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from ._browser import CHROMIUM, Browser

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 1280
HEIGHT = 900
#: The whole crawl (build, browser, every page) must finish within this.
BUDGET = 50.0

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform != "linux", reason="the site is built and checked on Linux only"),
]

#: What each page reports: its width against the window's, every element
#: whose content does not fit (a scroll box holding more than it shows, or
#: anything sticking out of the text column), its ids and its links.
MEASURE = r"""
(() => {
  const doc = document.documentElement;
  // The column the text lives in, margins included (Material lets tables
  // and code blocks reach into them).
  const column = document.querySelector(".md-content") || document.body;
  const box = column.getBoundingClientRect();
  const name = (el) => {
    let s = el.tagName.toLowerCase();
    if (el.id) s += "#" + el.id;
    if (typeof el.className === "string" && el.className.trim())
      s += "." + el.className.trim().split(/\s+/).join(".");
    return s;
  };
  const where = (el) => {
    const heading = [...document.querySelectorAll("h1[id], h2[id], h3[id], h4[id], h5[id]")]
      .filter((h) => h.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING).pop();
    return heading ? heading.id : "";
  };
  const insideScrollBox = (el) => {
    for (let up = el.parentElement; up && up !== column; up = up.parentElement)
      if (getComputedStyle(up).overflowX !== "visible") return true;
    return false;
  };
  const overflows = [];
  for (const el of column.querySelectorAll("*")) {
    const rect = el.getBoundingClientRect();
    if (rect.width === 0 && rect.height === 0) continue;
    const style = getComputedStyle(el);
    const report = (why, width, room) => overflows.push({
      element: name(el), why, width: Math.round(width), room: Math.round(room),
      after: where(el), text: (el.textContent || "").trim().slice(0, 60),
    });
    // A code block or table wrapper that scrolls holds more than it shows:
    // its lines are cut off at the edge until the reader scrolls sideways.
    if (style.overflowX !== "visible" && el.scrollWidth > el.clientWidth + 1) {
      report("cut off inside its scroll box", el.scrollWidth, el.clientWidth);
    } else if ((rect.right > box.right + 1 || rect.left < box.left - 1) && !insideScrollBox(el)) {
      report("sticks out of the text column", rect.width, box.width);
    }
    if (el.tagName === "IMG" && el.naturalWidth > 0 && rect.width < 0.9 * el.naturalWidth) {
      report("shrunk below its drawn size", el.naturalWidth, rect.width);
    }
    if (el.tagName === "IMG" && !(el.complete && el.naturalWidth > 0)) {
      report("image did not load", 0, 0);
    }
  }
  return {
    scrollWidth: doc.scrollWidth,
    clientWidth: doc.clientWidth,
    overflows,
    ids: [...document.querySelectorAll("[id], a[name]")].map((el) => el.id || el.getAttribute("name")),
    links: [...document.querySelectorAll("a[href]")].map((a) => a.href)
      .concat([...document.querySelectorAll("img[src]")].map((img) => img.src)),
  };
})()
"""

#: For each id asked about: the element's tag, its text, the text of the
#: signature block mkdocstrings renders right under the heading (if any) and
#: of the "Bases:" line of a class.
HEADINGS = r"""
((ids) => ids.map((id) => {
  const el = document.getElementById(id);
  if (!el) return null;
  const text = (node) => node ? node.textContent.replace(/\s+/g, " ").trim() : "";
  let signature = null, bases = null;
  for (let next = el.nextElementSibling; next; next = next.nextElementSibling) {
    if (next.classList.contains("doc-signature")) signature = next;
    if (next.classList.contains("doc-contents")) {
      bases = next.querySelector(":scope > .doc-class-bases");
      break;
    }
  }
  return {tag: el.tagName.toLowerCase(), text: text(el), signature: text(signature), bases: text(bases)};
}))
"""


def missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run the docs site test)")
    pytest.skip(what)


def public_names() -> dict[str, Any]:
    """Every public name the API page must show: full dotted name -> object."""
    names: dict[str, Any] = {}
    for module_name in ("fdchannel", "fdchannel.aio", "fdchannel.transports", "fdchannel.fdpass"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            names[f"{module_name}.{name}"] = getattr(module, name)
    return names


@functools.cache
def crawl() -> dict[str, Any]:
    """Build the site, load every page in Chromium, and return what each reported."""
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} is missing: apt-get install chromium")
    if importlib.util.find_spec("mkdocs") is None:
        missing("mkdocs is missing: pip install -e '.[docs]'")
    deadline = time.monotonic() + BUDGET
    site = Path(os.environ.get("TMPDIR", "/tmp")) / f"fdchannel-site-{os.getpid()}"
    try:
        build = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BUDGET,
            check=False,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )
        assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr}"
        pages = sorted(str(p.relative_to(site)) for p in site.rglob("*.html") if p.name != "404.html")
        handler = functools.partial(QuietHandler, directory=str(site))
        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                base = f"http://127.0.0.1:{server.server_address[1]}/"
                reports = visit(base, pages, deadline)
            finally:
                server.shutdown()
                thread.join(10)
        files = {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()}
        return {"base": base, "pages": reports, "files": files}
    finally:
        shutil.rmtree(site, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def visit(base: str, pages: list[str], deadline: float) -> dict[str, Any]:
    reports: dict[str, Any] = {}
    api_ids = list(public_names())
    with Browser(CHROMIUM, deadline) as browser:
        for page in pages:
            browser.open(base + page, WIDTH, HEIGHT)
            report = browser.evaluate(MEASURE)
            if page == "api/index.html":
                report["api"] = dict(zip(api_ids, browser.evaluate(f"{HEADINGS}({api_ids!r})"), strict=True))
            reports[page] = report
    return reports


@pytest.fixture
def site() -> dict[str, Any]:
    return crawl()


def test_pages_were_checked(site: dict[str, Any]) -> None:
    assert "index.html" in site["pages"]
    assert "api/index.html" in site["pages"]
    assert len(site["pages"]) >= 16


def test_no_page_scrolls_sideways_at_1280px(site: dict[str, Any]) -> None:
    problems = []
    for page, report in site["pages"].items():
        if report["scrollWidth"] > report["clientWidth"]:
            problems.append(f"{page}: the page is {report['scrollWidth']} px wide in {report['clientWidth']}")
        problems += [
            f"{page}: {o['element']} after #{o['after']}: {o['why']} "
            f"({o['width']} px in {o['room']}): {o['text']!r}"
            for o in report["overflows"]
        ]
    assert not problems, "\n".join(problems)


def signature_problems(dotted: str, obj: Any, entry: dict[str, str]) -> list[str]:
    """What is wrong with the signature block (or a class's bases) shown for *obj*."""
    short = dotted.rsplit(".", 1)[1]
    signature = entry["signature"]
    if inspect.ismodule(obj):
        return []  # a module has no signature; its functions are checked by name
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        # Raised, not built by users: the heading names the class and its bases.
        wanted = "Bases: " + ", ".join(base.__name__ for base in obj.__bases__)
        return (
            []
            if entry["bases"] == wanted
            else [f"{dotted}: the bases read {entry['bases']!r}, not {wanted!r}"]
        )
    problems = []
    if callable(obj):
        if not signature.startswith(f"{short}("):
            problems.append(f"{dotted}: the signature block reads {signature!r}")
    else:
        # A constant: its value, spelled as in the source, must be what it is.
        _, equals, value = signature.partition(" = ")
        if not equals or not re.fullmatch(r"[0-9 *]+", value) or eval(value) != obj:  # digits and * only
            problems.append(f"{dotted}: the signature block reads {signature!r}, not its value {obj!r}")
    problems += [
        f"{dotted}: the signature shows {unreadable!r}: {signature!r}"
        for unreadable in ("= 384", "=384", "object at 0x")
        if unreadable in signature
    ]
    return problems


def test_every_public_name_has_a_heading_and_signature(site: dict[str, Any]) -> None:
    found = site["pages"]["api/index.html"]["api"]
    problems = []
    for dotted, obj in public_names().items():
        entry = found[dotted]
        if entry is None:
            problems.append(f"{dotted}: no element with that id")
            continue
        if entry["tag"] not in {"h2", "h3", "h4"}:
            problems.append(f"{dotted}: #{dotted} is a <{entry['tag']}>, not a heading")
        if dotted.rsplit(".", 1)[1] not in entry["text"]:
            problems.append(f"{dotted}: the heading says {entry['text']!r}")
        problems += signature_problems(dotted, obj, entry)
    assert not problems, "\n".join(problems)


def test_nothing_private_or_twice_on_the_api_page(site: dict[str, Any]) -> None:
    ids = site["pages"]["api/index.html"]["ids"]
    private = [
        i
        for i in ids
        if i.startswith("fdchannel")
        and any(p.startswith("_") and not p.startswith("__") for p in i.split("."))
    ]
    assert not private, f"private names documented: {private}"
    objects = [i for i in ids if i.startswith("fdchannel")]
    twice = sorted({i for i in objects if objects.count(i) > 1})
    assert not twice, f"documented twice: {twice}"


def test_every_internal_link_resolves(site: dict[str, Any]) -> None:
    base = site["base"]
    ids = {page: set(report["ids"]) for page, report in site["pages"].items()}
    broken = []
    checked = 0
    for page, report in site["pages"].items():
        for link in report["links"]:
            if not link.startswith(base):
                continue
            checked += 1
            url = urllib.parse.urlsplit(link)
            path = urllib.parse.unquote(url.path)[1:]
            target = path + "index.html" if path == "" or path.endswith("/") else path
            if target not in site["files"]:
                broken.append(f"{page}: {link}: no such file")
            elif url.fragment and target in ids and urllib.parse.unquote(url.fragment) not in ids[target]:
                broken.append(f"{page}: {link}: no #{url.fragment} on {target}")
    assert checked > 100
    assert not broken, "\n".join(broken)
