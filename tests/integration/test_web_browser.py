"""The example's live page (/) in a real headless Chromium.

The page keeps an EventSource open, so Chromium's one-shot modes
(--dump-dom, --screenshot) never see it "done"; the test drives Chromium over
the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ended
by NUL on fds 3 and 4, no network port, no extra package), waits until the DOM
shows a snapshot and heartbeats, submits the page's publish form and waits for
the message to come back on the stream, and takes a screenshot.

Without Chromium the test skips, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest

from _support import skip_or_fail

try:
    from ._web_helpers import Gunicorn, bus_entries, require, wait_until
except ImportError:  # tests/ is not a package
    from _web_helpers import Gunicorn, bus_entries, require, wait_until

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
]


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe."""

    def __init__(self, user_data_dir) -> None:
        # Pipe ends moved to fds >= 10, so that the redirections onto
        # 3 and 4 cannot clobber them; the shell then execs Chromium.
        r, to_chrome = os.pipe()
        from_chrome, w = os.pipe()
        to_chrome_r = fcntl.fcntl(r, fcntl.F_DUPFD, 10)
        from_chrome_w = fcntl.fcntl(w, fcntl.F_DUPFD, 10)
        os.close(r)
        os.close(w)
        self._to_chrome, self._from_chrome = to_chrome, from_chrome
        args = [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={user_data_dir}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # Chromium reads commands on fd 3 and writes replies on fd 4.
        script = (
            f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        )
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", script, "bash", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_chrome_r, from_chrome_w),
            start_new_session=True,  # its own process group, for the SIGKILL fallback
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                message = json.loads(msg)
                if "id" in message:
                    self._replies.put(message)

    def call(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 10.0,
    ) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no reply from Chromium to {method} in {timeout}s") from None
            if reply["id"] == self._next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=3)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)


PAGE_STATE = """(() => {
  const t = (id) => document.getElementById(id).textContent;
  return {
    status: t("status"), snapshots: Number(t("snapshots")), heartbeats: Number(t("heartbeats")),
    version: t("version"), master: t("master"),
    messages: Number(t("messages")), posted: t("posted"),
    workers: [...document.querySelectorAll("#workers tr")].map((r) => r.cells[0].textContent),
    nodes: [...document.querySelectorAll("#nodes tr")].map((r) => r.cells[0].textContent),
    log: t("log").split("\\n").filter(Boolean),
  };
})()"""


SUBMIT = """(() => {
  document.getElementById("body").value = '{"text": "from the browser ✓"}';
  document.querySelector("#publish button").click();
})()"""


@pytest.mark.timeout(60)
def test_live_page_renders_events(bus_name, tmp_path):
    """One check, on the gunicorn_sse example (asgi_sse serves the same page)."""
    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM)):
        # .ci/run installs it or fails; a CI run without it fails here too.
        skip_or_fail(f"{CHROMIUM} is not installed (Debian's chromium package)")
    require("gunicorn", "flask", "httpx")
    with Gunicorn("gunicorn_sse", bus_name, tmp_path, env={"SHMCAST_HEARTBEAT": "0.2"}) as server:
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            target = browser.call("Target.createTarget", {"url": server.url + "/"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]

            def state():
                result = browser.call(
                    "Runtime.evaluate",
                    {"expression": PAGE_STATE, "returnByValue": True},
                    session,
                )["result"]
                return result.get("value")

            def rendered():
                s = state()
                ok = s and s["status"] == "live" and s["snapshots"] >= 1 and s["heartbeats"] >= 5
                return s if ok else None

            page = wait_until(rendered, 20, "the page to show a snapshot and heartbeats", 0.2)
            browser.call("Runtime.evaluate", {"expression": SUBMIT}, session)

            def published():
                s = state()
                return s if s and s["messages"] >= 1 and s["posted"] else None

            posted = wait_until(published, 10, "the posted message on the page", 0.2)
            shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)
            png = base64.b64decode(shot["data"])
            (tmp_path / "page.png").write_bytes(png)  # kept in pytest's basetemp
        finally:
            browser.close()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 10_000
        assert page["master"] == str(server.pid)
        assert sorted(page["workers"]) == sorted(str(p) for p in server.worker_pids())
        assert page["nodes"] == [f"node-{c}" for c in "abcde"]
        assert int(page["version"]) > 5
        assert len(page["log"]) >= 6
        assert posted["posted"].startswith("202, worker "), posted["posted"]
        assert int(posted["posted"].split()[-1]) in server.worker_pids()
        assert posted["messages"] == 1
        assert any(line.endswith(' message {"text":"from the browser ✓"}')
                   for line in posted["log"]), posted["log"][:3]
        assert server.stop() < 5
    assert bus_entries(bus_name) == []
