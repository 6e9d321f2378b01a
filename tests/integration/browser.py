"""Headless Chromium for the UI tests, driven through the DevTools protocol over a pipe
(--remote-debugging-pipe): no WebDriver, no browser download, nothing beyond the Debian
package."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from stack import ROOT

ARTIFACTS = ROOT / "tests" / "artifacts"
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium"


def chromium_binary() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail(f"Chromium is needed for the browser test and was not found on PATH. Install it with "
                f"`{INSTALL_HINT}` (CI does), or point CHROMIUM at the binary.")


class Browser:
    """A headless Chromium and one page, spoken to with DevTools-protocol messages: JSON
    terminated by a NUL byte, written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, binary: str, credentials: tuple[str, str] | None, extra_args: tuple[str, ...] = ()):
        self.credentials = credentials
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipes_as_fd3_fd4():
            # Moved out of the way first, in case a pipe end already is fd 3 or 4.
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                "--window-size=1400,1000", "--no-first-run", "--disable-gpu", "--disable-extensions", *extra_args]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox
        self.process = subprocess.Popen(args + ["about:blank"], preexec_fn=pipes_as_fd3_fd4, close_fds=False,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self._lock = threading.Condition()
        self.auth_challenges = 0
        threading.Thread(target=self._read_messages, daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _read_messages(self) -> None:
        pending = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            pending += chunk
            while b"\0" in pending:
                raw, pending = pending.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._replies[message["id"]] = message
                        self._lock.notify_all()
                elif message.get("method") in ("Fetch.requestPaused", "Fetch.authRequired"):
                    # Answered on another thread: this one must keep reading the replies.
                    threading.Thread(target=self._on_fetch_event, args=(message,), daemon=True).start()

    def _on_fetch_event(self, message: dict) -> None:
        request_id = message["params"]["requestId"]
        if message["method"] == "Fetch.requestPaused":
            self.send("Fetch.continueRequest", {"requestId": request_id}, session=message["sessionId"])
            return
        # The login dialog: answered once; a second challenge means the password was refused.
        self.auth_challenges += 1
        if self.credentials and self.auth_challenges == 1:
            user, password = self.credentials
            answer = {"response": "ProvideCredentials", "username": user, "password": password}
        else:
            answer = {"response": "CancelAuth"}
        self.send("Fetch.continueWithAuth", {"requestId": request_id, "authChallengeResponse": answer},
                  session=message["sessionId"])

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        with self._lock:
            self._next_id += 1
            message_id = self._next_id
        message = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._lock:
            while message_id not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"Chromium did not answer {method} within {timeout:.0f} s")
                if self.process.poll() is not None:
                    raise AssertionError(f"Chromium exited with {self.process.returncode} during {method}")
                self._lock.wait(min(remaining, 1.0))
            reply = self._replies.pop(message_id)
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def open(self, url: str) -> None:
        # Only the page itself is intercepted, to answer its auth challenge; the app's API calls
        # then reuse the credentials the browser cached, as after a person's login.
        page = url.split("#", 1)[0]
        self.send("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": page}]}, self.session)
        self.send("Page.enable", session=self.session)
        self.send("Page.navigate", {"url": url}, self.session)

    def evaluate(self, expression: str, await_promise: bool = False):
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise}, self.session)
        if "exceptionDetails" in result:
            raise AssertionError(f"the page's script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def url(self) -> str:
        return self.evaluate("location.href") or ""

    def text(self) -> str:
        # The app puts non-breaking spaces between icons and labels ("@\xa0production").
        return (self.evaluate("document.body ? document.body.innerText : ''") or "").replace("\xa0", " ")

    def wait_for_text(self, *needles: str, timeout: float = 120) -> str:
        """The page's visible text once it holds every needle (the app renders after its API
        calls return, so this polls instead of waiting for a load event). Generous: on a
        busy two-core CI machine the first render alone can take tens of seconds."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(needle in text for needle in needles):
                return text
            time.sleep(0.5)
        evidence = ARTIFACTS / f"ui-timeout-{int(time.time())}.png"
        self.screenshot(evidence)
        raise AssertionError(f"the page never showed {needles} (screenshot: {evidence}); it shows:\n{text[:3000]}")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.process.wait(timeout=10)
        except Exception:  # noqa: BLE001 - closing must never hide the test's own failure
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            os.close(self._to_browser)
            shutil.rmtree(self.profile, ignore_errors=True)
