"""A small headless-Chromium driver over the Chrome DevTools Protocol (websocket-client, no Selenium).

Starts Debian's ``chromium`` with a fresh profile and ``--remote-debugging-port=0``, reads the port
from the profile's ``DevToolsActivePort`` file, and talks to one page target in flat session mode.
It records every network request of the page, so a test can tell what failed to load and whether
anything but ``file://`` was asked for.

Also a script, to take a screenshot of a report for the docs:

    python tests/e2e/chromium_cdp.py out/generate/run-…/report.html docs/report.png --height 1400 --out-width 960
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
)
"""Flags that work in this sandbox as root (no user namespaces, no GPU, no network)."""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(RuntimeError):
    pass


@dataclass
class PageLoad:
    """What happened while a page loaded."""

    requests: dict[str, str] = field(default_factory=dict)
    """requestId -> URL of every request the page made."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(URL, error text) of loads that failed, and HTTP-like responses with status >= 400."""
    console_errors: list[str] = field(default_factory=list)


class Chromium:
    """One headless browser with one page; use as a context manager."""

    def __init__(self, executable: str, timeout: float = 60.0) -> None:
        import websocket  # websocket-client (the 'test' extra)

        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="sgb-chromium-")
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                self.close()
                raise CdpError(f"chromium exited with {self.proc.returncode} before DevTools was up:\n{err}")
            if time.monotonic() > deadline:
                self.close()
                raise CdpError(f"chromium did not open DevTools within {timeout:.0f} s")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout, suppress_origin=True)
        self._next_id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                self.send("Browser.close", timeout=5)
            except Exception:  # noqa: BLE001 - the browser may already be gone
                pass
            ws.close()
            self.ws = None
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its handle
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    # ------------------------------------------------------------------ protocol
    def _recv(self, deadline: float) -> dict:
        self.ws.settimeout(max(0.05, deadline - time.monotonic()))
        return json.loads(self.ws.recv())

    def send(self, method: str, params: dict | None = None, session: bool | None = None,
             timeout: float | None = None) -> dict:
        """Call a method (on the page session unless it is a Browser./Target. method) and return its result."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        on_page = session if session is not None else not method.startswith(("Browser.", "Target."))
        if on_page:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            if time.monotonic() > deadline:
                raise CdpError(f"no answer to {method} within {timeout or self.timeout:.0f} s")
            reply = self._recv(deadline)
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, event: str, timeout: float | None = None) -> dict:
        """The first queued or incoming event of this name (consumed)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == event:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise CdpError(f"no {event} within {timeout or self.timeout:.0f} s")
            ev = self._recv(deadline)
            if "method" in ev:
                self.events.append(ev)

    # ------------------------------------------------------------------ page
    def load(self, url: str, width: int = 1280, height: int = 900) -> PageLoad:
        """Navigate, wait for the load event (images included), and report the page's requests."""
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.events.clear()
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_for("Page.loadEventFired")
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        load = PageLoad()
        for ev in self.events:
            p = ev.get("params", {})
            if ev["method"] == "Network.requestWillBeSent":
                load.requests[p["requestId"]] = p["request"]["url"]
            elif ev["method"] == "Network.loadingFailed":
                load.failed.append((load.requests.get(p["requestId"], p["requestId"]), p.get("errorText", "")))
            elif ev["method"] == "Network.responseReceived" and p["response"].get("status", 0) >= 400:
                load.failed.append((p["response"]["url"], f"status {p['response']['status']}"))
            elif ev["method"] == "Runtime.exceptionThrown":
                load.console_errors.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif ev["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                load.console_errors.append(f"{p['entry'].get('url', '')}: {p['entry'].get('text', '')}")
        return load

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CdpError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: str | os.PathLike, max_height: int = 3000, width: int | None = None) -> tuple[int, int]:
        """A PNG of the page from the top, at most ``max_height`` CSS pixels tall; returns its size."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        w = int(width or size["width"])
        h = int(min(size["height"], max_height))
        data = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1},
        })["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return w, h


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot an HTML file with headless Chromium.")
    parser.add_argument("page")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1400, help="CSS pixels from the top of the page")
    parser.add_argument("--out-width", type=int, default=None,
                        help="shrink the PNG to this width and to 256 colours (small files for docs)")
    args = parser.parse_args(argv)
    exe = find_chromium()
    if exe is None:
        print("chromium is not installed (scripts/ensure-chromium.sh)", file=sys.stderr)
        return 2
    with Chromium(exe) as browser:
        load = browser.load(Path(args.page).resolve().as_uri(), width=args.width, height=args.height)
        size = browser.screenshot(args.out, max_height=args.height, width=args.width)
    if args.out_width:
        from PIL import Image

        with Image.open(args.out) as im:
            small = im.convert("RGB").resize((args.out_width, round(im.height * args.out_width / im.width)),
                                             Image.Resampling.LANCZOS)
        small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
        size = small.size
    print(f"{args.out}: {size[0]}x{size[1]}; {len(load.requests)} requests, {len(load.failed)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
