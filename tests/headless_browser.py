"""Opens an HTML file in headless Chromium through the DevTools protocol: console errors,
uncaught exceptions, network requests, what the page shows, and a full-page screenshot.

    python tests/headless_browser.py perf_report.html docs/perf_report.png

Needs Debian's ``chromium`` (or $CHROMIUM) and the ``websocket-client`` package.
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
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

CHECK_PAGE = """(() => {
  const imgs = Array.from(document.images);
  return JSON.stringify({
    title: document.title,
    images: imgs.length,
    images_drawn: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    figures: Array.from(document.querySelectorAll('figure')).map(f => f.id),
    tables: document.querySelectorAll('table').length,
    verdict: (document.querySelector('.verdict') || {}).textContent || null,
    height: document.documentElement.scrollHeight,
    width: document.documentElement.scrollWidth,
  });
})()"""


def chromium_path() -> Optional[str]:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class _Cdp:
    def __init__(self, ws_url: str):
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: List[Dict[str, Any]] = []

    def call(self, method: str, **params) -> Dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float) -> bool:
        end = time.time() + timeout
        if any(e.get("method") == method for e in self.events):
            return True
        while time.time() < end:
            self.ws.settimeout(max(0.1, end - time.time()))
            try:
                msg = json.loads(self.ws.recv())
            except Exception:
                return False
            self.events.append(msg)
            if msg.get("method") == method:
                return True
        return False

    def close(self) -> None:
        self.ws.close()


def render(html_path, screenshot=None, timeout: float = 60.0, width: int = 1400) -> Dict[str, Any]:
    """Loads ``html_path`` in headless Chromium. Returns the page figures (CHECK_PAGE) plus
    ``console_errors``, ``exceptions`` and ``requests`` (URLs other than the file and data:)."""
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium, or set CHROMIUM)")
    html_path = Path(html_path).resolve()
    profile = tempfile.mkdtemp(prefix="dsfp4-chromium-")
    proc = subprocess.Popen(
        [
            exe,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        end = time.time() + timeout
        while time.time() < end and port is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"chromium exited with status {proc.returncode}")
            if "DevTools listening on ws://" in line:
                port = int(line.split("ws://")[1].split("/")[0].rsplit(":", 1)[1])
        if port is None:
            raise TimeoutError("chromium did not open its DevTools port")
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t.get("type") == "page")
        cdp = _Cdp(page["webSocketDebuggerUrl"])
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.call(f"{domain}.enable")
            cdp.events.clear()
            cdp.call("Page.navigate", url=html_path.as_uri())
            if not cdp.wait_for("Page.loadEventFired", timeout):
                raise TimeoutError(f"{html_path}: the page did not finish loading in {timeout:.0f} s")
            time.sleep(0.3)  # let late console messages arrive
            info = json.loads(
                cdp.call("Runtime.evaluate", expression=CHECK_PAGE, returnByValue=True)["result"]["value"]
            )
            if screenshot is not None:
                m = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
                shot = cdp.call(
                    "Page.captureScreenshot",
                    format="png",
                    captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": m["width"], "height": m["height"], "scale": 1},
                )
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            cdp.wait_for("never", 0.2)  # drain what is queued
        finally:
            cdp.close()
        errors, exceptions, requests = [], [], []
        for e in cdp.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(
                    " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                )
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(p["entry"].get("text", ""))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif m == "Network.requestWillBeSent":
                url = p.get("request", {}).get("url", "")
                if not url.startswith(("data:", html_path.as_uri())):
                    requests.append(url)
        info.update(console_errors=errors, exceptions=exceptions, requests=requests)
        return info
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: List[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python tests/headless_browser.py REPORT.html [SCREENSHOT.png]", file=sys.stderr)
        return 2
    info = render(argv[0], argv[1] if len(argv) == 2 else None)
    print(json.dumps(info, indent=1))
    bad = (
        info["console_errors"]
        or info["exceptions"]
        or info["requests"]
        or info["images_drawn"] < info["images"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
