"""What the real-browser tests (tests/ops/test_stack_browser.py) and benchmarks/ui_graph_cpu.py
share: Debian's headless Chromium and its flags, screenshots, and the stack's Prefect REST API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from flows.ops.stack import Stack
from tasks.runtime.paths import REPO_DIR

CHROMIUM = Path("/usr/bin/chromium")            # `make browsers`
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SHOTS = REPO_DIR / "test-artifacts"
RUN_TIMEOUT_S = 20 * 60                           # a cold tiny pipeline: ~2-3 min here
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def shot(page, name: str, full_page: bool = True) -> None:
    """A screenshot, test-artifacts/<name>.png (kept by CI): the full page, or what the window
    shows (`full_page=False`)."""
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


class Api:
    """The stack's Prefect REST API: `api("GET", "/flow_runs/<id>")` -> the decoded JSON."""

    def __init__(self, stack: Stack):
        self.http = httpx.Client(base_url=stack.api_url, timeout=30)

    def __call__(self, method: str, path: str, **kw) -> Any:
        for attempt in range(6):          # like Prefect's own client: retry a busy server
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TimeoutException:
                # a read may time out while the server is busy (seen once, in make test, on
                # the GET right after the second deploy): reads are retried, writes are not
                if method != "GET" or attempt == 5:
                    raise
                continue
            if r.status_code not in (429, 502, 503) or attempt == 5:
                break
            time.sleep(2 ** attempt)
        r.raise_for_status()
        return r.json() if r.content else None

    def deployment(self, flow: str, name: str) -> dict:
        return self("GET", f"/deployments/name/{flow}/{name}")

    def wait(self, flow_run_id: str, timeout: float = RUN_TIMEOUT_S, poll: float = 1) -> dict:
        """The flow run once it has ended (a terminal state)."""
        deadline = time.monotonic() + timeout
        while (run := self("GET", f"/flow_runs/{flow_run_id}"))["state_type"] not in TERMINAL:
            assert time.monotonic() < deadline, f"flow run still {run['state_name']}"
            time.sleep(poll)
        return run
