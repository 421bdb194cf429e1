"""Screenshot the built book's pages with headless Chromium (a developer tool, not part of CI).

    scripts/book                                  # build _build/html first
    python scripts/screenshot_book.py             # every page of _toc.yml -> _build/screenshots/
    python scripts/screenshot_book.py --height 6000 book/intro

Serves _build/html with ``python -m http.server`` on 127.0.0.1 and saves one PNG per page.
Needs a Chromium binary (on Debian/Ubuntu: ``apt-get install chromium``); set CHROMIUM=/path
to choose one. Pages load MathJax from a CDN; without network access formulas show as TeX
source, unless ``--mathjax DIR`` points at a local copy of the ``mathjax`` npm package (for
example ``npm pack mathjax@3 && tar xzf mathjax-3*.tgz`` gives ``package/``): the pages are then
served from a temporary copy that loads MathJax from there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
OUT = ROOT / "_build" / "screenshots"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def toc_pages() -> list[str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    import yaml
    from check_book_html import toc_files

    return toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"http.server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"http.server did not answer at {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages without suffix, e.g. book/intro (default: _toc.yml)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--wait-ms", type=int, default=3000, help="virtual time for scripts to run")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per page")
    parser.add_argument("--mathjax", type=Path, help="local mathjax npm package (a folder holding es5/)")
    args = parser.parse_args()

    chromium = find_chromium()
    if chromium is None:
        print(
            "screenshot_book: no Chromium found (looked for "
            + ", ".join(CANDIDATES)
            + "). Install one, e.g. `apt-get install chromium`, or set CHROMIUM=/path/to/chrome.",
            file=sys.stderr,
        )
        return 2
    if not (HTML / "index.html").is_file():
        print("screenshot_book: _build/html/index.html not found: run scripts/book first", file=sys.stderr)
        return 2

    pages = args.pages or toc_pages()
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    served = HTML
    staging = None
    if args.mathjax is not None:
        if not (args.mathjax / "es5").is_dir():
            print(f"screenshot_book: {args.mathjax} has no es5/ folder", file=sys.stderr)
            return 2
        staging = tempfile.TemporaryDirectory(prefix="screenshot-site-")
        served = Path(staging.name) / "html"
        shutil.copytree(HTML, served)
        shutil.copytree(args.mathjax / "es5", served / "_mathjax" / "es5")
        for page in served.rglob("*.html"):
            text = page.read_text(encoding="utf-8")
            page.write_text(text.replace("https://cdn.jsdelivr.net/npm/mathjax@3/es5/", "/_mathjax/es5/"),
                            encoding="utf-8")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    failures = 0
    try:
        wait_until_serving(f"{base}/index.html", server)
        for page in pages:
            target = OUT / f"{page.replace('/', '__')}.png"
            target.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory(prefix="screenshot-profile-") as profile:
                command = [
                    chromium,
                    *FLAGS,
                    f"--user-data-dir={profile}",
                    f"--window-size={args.width},{args.height}",
                    f"--virtual-time-budget={args.wait_ms}",
                    f"--screenshot={target}",
                    f"{base}/{page}.html",
                ]
                try:
                    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    pass
            if target.is_file() and target.stat().st_size > 0:
                print(f"screenshot_book: {page} -> {target.relative_to(ROOT)}")
            else:
                failures += 1
                print(f"screenshot_book: error: no screenshot for {page}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=10)
        if staging is not None:
            staging.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
