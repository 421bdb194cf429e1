"""Check that the built book's pages are readable, as measured in headless Chromium.

    scripts/book                                   # builds _build/html, then runs this check
    python scripts/check_book_layout.py            # every page of _toc.yml
    python scripts/check_book_layout.py book/04_alpha_stable_noise --json report.json

Each page is loaded at a 1280 px wide window (the content column is then about 676 CSS px) and
measured in the browser, on the page's article (sidebars and the header are not measured):

* figures: every ``img``'s rendered width over its design width (and its drawn aspect ratio
  against its pixels', which a squashed figure fails), the width the page asks for
  (the ``width`` attribute or inline style that myst-nb writes for retina PNGs, which hold
  twice the pixels), else its natural width. Below ``--min-figure-ratio`` (0.9) a figure's
  fonts are shrunk below the 7.5 pt the book's style allows (8.5 pt x 0.9 = 7.65 pt);
* code and output blocks: every ``pre`` that needs horizontal scrolling (scrollWidth >
  clientWidth), with the number of its lines that are cut (longer than the characters that
  fit, about 79), i.e. a reader sees only their beginning;
* displayed equations: every MathJax display container whose formula is wider than the box
  it sits in (it then scrolls or is cut).

It prints one row per page and fails (exit 1) listing every offender. Needs only a Chromium
binary (Debian/Ubuntu: ``apt-get install chromium``; set CHROMIUM=/path to choose one) and no
Python package: a small script injected into a served copy of each page writes its measures
into the DOM, which ``chromium --headless --dump-dom`` prints. Where no Chromium is found it
says so and exits 0 (``--require-chromium`` makes that an error), since CI machines have none.

Formulas are measured only if MathJax runs: pages load it from a CDN, so offline give a local
copy of the ``mathjax`` npm package with ``--mathjax DIR`` (``npm pack mathjax@3 && tar xzf
mathjax-3*.tgz`` gives ``package/``); by default ``_build/mathjax/package`` is used if present.
Without MathJax the equation column says "n/a" and equations are not checked.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot_book import FLAGS, HTML, ROOT, find_chromium, free_port, toc_pages, wait_until_serving  # noqa: E402

# Measure what a reader sees: with the page's scrollbar (screenshots hide it), which takes about
# 15 px from the window, so the content column is 676 px at a 1280 px window.
FLAGS = tuple(flag for flag in FLAGS if flag != "--hide-scrollbars")

CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/"
DEFAULT_MATHJAX = ROOT / "_build" / "mathjax" / "package"
MARK = "__book_layout_report__"

# Offenders that are accepted, each with the reason: (page, kind, what) where kind is "figure"
# (what: the image file name), "code" (what: the first 40 characters of the block) or
# "equation" (what: the first 40 characters of its TeX). Keep it empty unless truly unavoidable.
ALLOW: dict[tuple[str, str, str], str] = {}

# Runs in the page: waits for the page, its images and MathJax, measures, writes JSON into a <pre>.
MEASURE_JS = r"""
<script>
(function () {
  const MARK = "%(mark)s";
  function px(s) { const m = /^([0-9.]+)px$/.exec(s || ""); return m ? parseFloat(m[1]) : null; }
  function measure(mathjax) {
    const article = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    const acs = getComputedStyle(article);
    const column = article.clientWidth - parseFloat(acs.paddingLeft) - parseFloat(acs.paddingRight);
    const out = {column: column, char_width: 0, mathjax: mathjax, figures: [], code: [], equations: []};
    for (const img of article.querySelectorAll("img")) {
      const rect = img.getBoundingClientRect();
      if (rect.width === 0 && rect.height === 0) continue;  // hidden (e.g. a dark-mode twin)
      const attr = parseFloat(img.getAttribute("width"));
      const design = (!isNaN(attr) && attr > 0) ? attr : (px(img.style.width) || img.naturalWidth);
      out.figures.push({src: (img.getAttribute("src") || "").split("/").pop(), rendered: rect.width,
                        top: Math.round(rect.top + window.scrollY), height: rect.height,
                        natural_height: img.naturalHeight,
                        design: design, natural: img.naturalWidth, loaded: img.complete && img.naturalWidth > 0});
    }
    for (const pre of article.querySelectorAll("pre")) {
      if (pre.id === MARK || pre.closest(".math")) continue;
      const cs = getComputedStyle(pre);
      const probe = document.createElement("span");
      probe.textContent = "0123456789".repeat(10);
      probe.style.whiteSpace = "pre";
      pre.appendChild(probe);
      const charWidth = probe.getBoundingClientRect().width / 100;
      pre.removeChild(probe);
      out.char_width = charWidth;
      const inner = pre.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
      const fits = Math.floor(inner / charWidth + 0.05);
      const lines = pre.textContent.replace(/\n$/, "").split("\n").map(l => l.replace(/\t/g, "        "));
      const cut = lines.filter(l => l.length > fits);
      const overflow = pre.scrollWidth > pre.clientWidth + 1;
      if (!overflow) continue;
      const cell = (pre.closest(".cell_output") ? "output" : "code")
                   + (pre.closest("details:not([open])") ? " (in a collapsed cell)" : "");
      out.code.push({kind: cell, fits: fits, longest: Math.max(...lines.map(l => l.length)),
                     cut: Math.max(cut.length, 1), head: lines[0].slice(0, 40), first_cut: (cut[0] || "").slice(0, 100)});
    }
    const sources = new Map();  // MathJax container -> its TeX source
    if (mathjax) {
      try { for (const item of MathJax.startup.document.math) sources.set(item.typesetRoot, item.math); } catch (e) {}
    }
    for (const box of article.querySelectorAll('mjx-container[display="true"]')) {
      const math = box.querySelector("mjx-math") || box.firstElementChild;
      if (!math) continue;
      const width = math.getBoundingClientRect().width;
      const room = box.clientWidth || box.parentElement.clientWidth;
      const host = box.closest(".math") || box.parentElement;
      const avail = Math.min(room, host.clientWidth || room);
      const tex = sources.get(box) || "";
      if (width > avail + 1 || box.scrollWidth > box.clientWidth + 1) {
        out.equations.push({width: width, room: avail, tex: tex.trim().slice(0, 60), id: host.id || "",
                            top: Math.round(box.getBoundingClientRect().top + window.scrollY)});
      }
    }
    const pre = document.createElement("pre");
    pre.id = MARK;
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () {
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) {
      mj.startup.promise.then(() => measure(true), () => measure(false));
    } else {
      measure(false);
    }
  });
})();
</script>
"""


def stage(html_dir: Path, target: Path, mathjax: Path | None) -> None:
    shutil.copytree(html_dir, target)
    if mathjax is not None:
        shutil.copytree(mathjax / "es5", target / "_mathjax" / "es5")
    script = MEASURE_JS % {"mark": MARK}
    for page in target.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        if mathjax is not None:
            text = text.replace(CDN, "/_mathjax/es5/")
        page.write_text(text.replace("</body>", script + "</body>", 1), encoding="utf-8")


def measure(chromium: str, url: str, width: int, wait_ms: int, timeout: float) -> dict | None:
    with tempfile.TemporaryDirectory(prefix="layout-profile-") as profile:
        command = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},2000",
                   f"--virtual-time-budget={wait_ms}", "--dump-dom", url]
        try:
            dom = subprocess.run(command, capture_output=True, text=True, timeout=timeout).stdout
        except subprocess.TimeoutExpired:
            return None
    match = re.search(rf'<pre id="{MARK}"[^>]*>(.*?)</pre>', dom, re.S)
    return json.loads(html.unescape(match.group(1))) if match else None


def allowed(page: str, kind: str, what: str) -> bool:
    return (page, kind, what[:40]) in ALLOW


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages without suffix, e.g. book/intro (default: _toc.yml)")
    parser.add_argument("--html", type=Path, default=HTML, help="the built book (default: _build/html)")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS px (default 1280)")
    parser.add_argument("--min-figure-ratio", type=float, default=0.9)
    parser.add_argument("--mathjax", type=Path, help="local mathjax npm package (a folder holding es5/)")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the page's scripts")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per page")
    parser.add_argument("--json", type=Path, help="also write every measure to this file")
    parser.add_argument("--require-chromium", action="store_true", help="fail where no Chromium is found")
    args = parser.parse_args()

    chromium = find_chromium()
    if chromium is None:
        print("check_book_layout: skipped: no Chromium found (apt-get install chromium, or set CHROMIUM=); "
              "pages not measured", file=sys.stderr)
        return 2 if args.require_chromium else 0
    if not (args.html / "index.html").is_file():
        print(f"check_book_layout: {args.html}/index.html not found: build the book first", file=sys.stderr)
        return 2
    mathjax = args.mathjax
    if mathjax is None and (DEFAULT_MATHJAX / "es5").is_dir():
        mathjax = DEFAULT_MATHJAX
    if mathjax is not None and not (mathjax / "es5").is_dir():
        print(f"check_book_layout: {mathjax} has no es5/ folder", file=sys.stderr)
        return 2
    pages = args.pages or toc_pages()

    report: dict[str, dict | None] = {}
    with tempfile.TemporaryDirectory(prefix="layout-site-") as tmp:
        served = Path(tmp) / "html"
        stage(args.html, served, mathjax)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_serving(f"http://127.0.0.1:{port}/index.html", server)
            for page in pages:
                report[page] = measure(chromium, f"http://127.0.0.1:{port}/{page}.html", args.width,
                                       args.wait_ms, args.timeout)
        finally:
            server.terminate()
            server.wait(timeout=10)

    errors: list[str] = []
    head = f"{'page':40s} {'column':>6s} {'figures':>7s} {'small':>5s} {'min ratio':>9s} {'blocks':>6s} {'cut lines':>9s} {'wide eqs':>8s}"
    print(head)
    print("-" * len(head))
    totals = [0, 0, 0, 0]
    for page, r in report.items():
        if r is None:
            errors.append(f"{page}: not measured (page did not load or its script did not finish)")
            print(f"{page:40s} {'?':>6s}")
            continue
        small = [f for f in r["figures"] if f["design"] and f["rendered"] / f["design"] < args.min_figure_ratio]
        unloaded = [f for f in r["figures"] if not f["loaded"]]
        ratio = min((f["rendered"] / f["design"] for f in r["figures"] if f["design"]), default=None)
        cut = sum(c["cut"] for c in r["code"])
        eqs = len(r["equations"]) if r["mathjax"] else None
        print(f"{page:40s} {r['column']:6.0f} {len(r['figures']):7d} {len(small):5d} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>9s} {len(r['code']):6d} {cut:9d} "
              f"{'n/a' if eqs is None else eqs:>8}")
        totals = [totals[0] + len(small), totals[1] + len(r["code"]), totals[2] + cut, totals[3] + (eqs or 0)]
        for f in small:
            if not allowed(page, "figure", f["src"]):
                errors.append(f"{page}: figure {f['src'][:16]}... shown at {f['rendered']:.0f} of its "
                              f"{f['design']:.0f} px ({f['rendered'] / f['design']:.0%})")
        for f in r["figures"]:  # drawn with another aspect ratio than its pixels': squashed
            if f["loaded"] and f["natural_height"] and f["height"]:
                drawn, pixels = f["rendered"] / f["height"], f["natural"] / f["natural_height"]
                if abs(drawn / pixels - 1) > 0.02:
                    errors.append(f"{page}: figure {f['src'][:16]}... distorted: drawn {f['rendered']:.0f}x"
                                  f"{f['height']:.0f} px, its pixels {f['natural']}x{f['natural_height']}")
        for f in unloaded:
            errors.append(f"{page}: image {f['src']} did not load")
        for c in r["code"]:
            if not allowed(page, "code", c["head"]):
                errors.append(f"{page}: {c['kind']} block {c['head']!r}: {c['cut']} line(s) cut at "
                              f"{c['fits']} characters (longest {c['longest']}), e.g. {c['first_cut']!r}")
        for e in r["equations"] if r["mathjax"] else []:
            if not allowed(page, "equation", e["tex"]):
                errors.append(f"{page}: equation {e['tex']!r} is {e['width']:.0f} px wide in {e['room']:.0f} px")
    print("-" * len(head))
    print(f"{'total':40s} {'':6s} {'':7s} {totals[0]:5d} {'':9s} {totals[1]:6d} {totals[2]:9d} {totals[3]:8d}")
    if mathjax is None and not any(r and r["mathjax"] for r in report.values()):
        print("check_book_layout: equations not measured: MathJax did not run (offline?); "
              "pass --mathjax DIR (a local copy of the mathjax npm package)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    for error in errors:
        print(f"check_book_layout: error: {error}", file=sys.stderr)
    if errors:
        print(f"check_book_layout: {len(errors)} offender(s) on {len(report)} pages", file=sys.stderr)
        return 1
    print(f"check_book_layout: {len(report)} pages readable at {args.width} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
