"""Render an HTML page in headless Chromium (Debian's `chromium`; .ci/run installs it) and report what it saw."""
import shutil
import subprocess
from pathlib import Path

import pytest

NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")
# probes added to a copy of the page: the first counts JavaScript errors from the start, the last records, once
# the page has loaded, how many images decoded and how many errors there were
FIRST = '<script>window.__errors=0;window.addEventListener("error",()=>{window.__errors++})</script>'
LAST = ('<script>window.addEventListener("load",()=>{document.body.dataset.loaded='
        '[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;'
        'document.body.dataset.errors=window.__errors})</script></body>')


def render(html: Path) -> str:
    """The DOM after load (skips the test when no headless Chromium is installed)."""
    exe = next((shutil.which(n) for n in NAMES if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no headless Chromium on this machine")
    check = html.with_name("check.html")
    check.write_text(FIRST + html.read_text().replace("</body>", LAST))
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", check.as_uri()], capture_output=True, text=True, timeout=90,
                          check=False).stdout


def assert_renders(html: Path) -> str:
    """Every <img> decoded, no JavaScript error, at least one table; returns the DOM."""
    dom = render(html)
    assert f'data-loaded="{html.read_text().count("<img")}"' in dom, "an image did not decode"
    assert 'data-errors="0"' in dom, "the page raised a JavaScript error"
    assert "<table" in dom
    return dom
