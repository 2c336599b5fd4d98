"""Headless Chromium with the network cut off, for tests of the pages the project writes.

``open_offline(page, tmp)`` renders a local page with every host unresolvable and every connection sent to a closed
loopback proxy, records Chromium's net log, and returns the DOM after scripts ran plus every network request the
page itself started (the browser's own background requests, which carry no page origin, are left out). A page that
draws offline has drawn marks in that DOM and an empty request list. Flags: /work/.library/env/machines/python.md
"End-to-end tests in headless Chromium" (without the background-networking flags the closed network refuses many
connections at each start).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
OFFLINE_FLAGS = (
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves
    "--proxy-server=socks5://127.0.0.1:9",  # and an IP literal goes to a closed loopback port
    "--proxy-bypass-list=<-loopback>",
)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "chrome-extension:", "devtools:")


def chromium() -> str:
    """The headless browser; fails (never skips) with the install command when it is absent."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is not installed; the page tests need a real headless browser: `make browser` "
                "(Debian's package: `apt-get install -y chromium`)")  # fmt: skip


@dataclass
class Rendered:
    dom: str  # document.documentElement.outerHTML after the virtual-time budget
    requests: list[str]  # URLs of the network requests the page started (none for an offline page)


def page_requests(netlog: Path) -> list[str]:
    """Network requests started on behalf of a page in a Chromium net log (``--log-net-log``).

    A request the page made carries the page's origin: an ``initiator`` (``"null"`` for a file:// page) and a
    network isolation key naming ``file://``; the browser's own update and account checks have neither.
    """
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        url = params.get("url", "")
        if event["type"] != start_job or not url or url.startswith(LOCAL_SCHEMES):
            continue
        from_page = params.get("initiator") not in (None, "not an origin") or "file://" in str(
            params.get("network_isolation_key", "")
        )
        if from_page and url not in urls:
            urls.append(url)
    return urls


def open_offline(page: Path, tmp_path: Path, *extra: str, budget_ms: int = 10000) -> Rendered:
    """Render ``page`` (a local file) in headless Chromium with no network; ``extra`` flags go before the URL."""
    netlog = tmp_path / f"netlog-{page.stem}.json"
    profile = tmp_path / f"chromium-profile-{page.stem}"
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
        f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *OFFLINE_FLAGS,
        f"--log-net-log={netlog}", "--dump-dom", *extra, page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(profile, ignore_errors=True)
    return Rendered(dom=done.stdout, requests=page_requests(netlog))
