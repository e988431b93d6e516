"""The OHIF viewer (npm ``@ohif/app``, its prebuilt ``dist/`` unpacked by ``make viewer``) served on
loopback, with its DICOMweb data source pointed at a PACS through a same-origin proxy that adds
the PACS's credentials (so the browser needs neither CORS nor a password), and driven in Chromium
by Playwright the way a radiologist would use it. Both run inside the test's network namespace:

- ``python tests/ohif_viewer.py serve DIST PORT PACS_URL USER PASSWORD`` serves until killed;
- ``python tests/ohif_viewer.py look VIEWER STUDY OUT STEP...`` opens the study and, for each step
  (``image``; ``series:<description>`` to double-click a series in the study browser, or
  ``series?:<description>`` for one that OHIF asks about first (a SEG to open, an SR whose
  measurements to track: the prompt is answered yes); ``measurements`` to open the measurement
  panel), waits until the viewer has drawn it, saves a screenshot and records the viewport's
  pixels and the page text. It prints one JSON line, and keeps the page's failed requests,
  HTTP errors and console errors in ``OUT/trouble.txt``."""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CONFIG = """window.config = {
  routerBasename: null, extensions: [], modes: [], customizationService: {},
  showStudyList: true, maxNumberOfWebWorkers: 2, showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false, showLoadingIndicator: true, strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'pacs',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'pacs',
    configuration: {
      friendlyName: 'test PACS', name: 'pacs',
      wadoUriRoot: '/dicom-web', qidoRoot: '/dicom-web', wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false, supportsReject: false, imageRendering: 'wadors',
      thumbnailRendering: 'wadors', enableStudyLazyLoad: true, supportsFuzzyMatching: false,
      supportsWildcard: true, staticWado: false, singlepart: 'bulkdata,video,pdf',
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


class Handler(SimpleHTTPRequestHandler):
    """Static files of the viewer (unknown paths fall back to ``index.html``, as its router
    expects), ``/app-config.js`` from :data:`CONFIG`, and ``/dicom-web/...`` proxied to the PACS."""

    pacs = ""
    auth = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/"):
            return self._proxy()
        if path == "/app-config.js":
            body = CONFIG.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        if not (Path(self.directory) / path.lstrip("/")).is_file():
            self.path = "/index.html"
        return super().do_GET()

    def _proxy(self) -> None:
        url = self.pacs + self.path[len("/dicom-web"):]
        headers = {"Authorization": self.auth}
        if "Accept" in self.headers:
            headers["Accept"] = self.headers["Accept"]
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                body, status, kind = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            body, status, kind = err.read(), err.code, err.headers.get("Content-Type", "")
        self.send_response(status)
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(dist: str, port: str, pacs: str, user: str, password: str) -> None:
    Handler.pacs = pacs.rstrip("/")
    Handler.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    server = ThreadingHTTPServer(("127.0.0.1", int(port)), partial(Handler, directory=dist))
    server.serve_forever()


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _pixels(png: bytes) -> dict[str, float]:
    """What the viewport shows: the share of coloured pixels (max - min channel > 60: a colour map,
    a segment's fill, a burned-in overlay; grey images have none) and the grey spread."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    return {"coloured": float((chroma > 60).mean()), "grey_std": float(rgb.mean(axis=2).std())}


def _yes(page) -> bool:
    """Answer yes to OHIF's prompt to open a SEG or to track an SR's measurements, if one is shown."""
    button = page.get_by_role("button", name="Yes")
    if button.count():
        button.first.click()
        return True
    return False


def _settle(page, prompt: bool = False, at_least: float = 1.0, limit: float = 60.0) -> None:
    """Wait until the viewport has drawn what the last action asked for: its pixels and the page's
    text unchanged over three looks half a second apart, ``at_least`` seconds after the action (a
    fixed sleep long enough for a busy machine wasted a minute a test). With ``prompt``, first
    wait (up to ``limit``) for OHIF's yes/no prompt and answer it; a prompt that appears later is
    answered too."""
    start = time.monotonic()
    while prompt and time.monotonic() - start < limit:
        if _yes(page):
            break
        time.sleep(0.25)
    else:
        if prompt:
            raise RuntimeError("OHIF showed no prompt to open the series")
    viewport = page.locator("[data-viewportid]").first
    seen, same = None, 0
    while time.monotonic() - start < limit:
        time.sleep(0.5)
        if _yes(page):
            seen, same = None, 0
            continue
        now = (viewport.screenshot(), page.inner_text("body"))
        same = same + 1 if now == seen else 0
        # three equal looks (1.5 s): on a loaded machine OHIF can pause half a second between
        # fetching a series and drawing it (a Parametric Map was caught undrawn under the suite)
        if same >= 2 and time.monotonic() - start >= at_least:
            return
        seen = now
    raise RuntimeError(f"the viewer was still changing after {limit:.0f} s")


def look(viewer: str, study: str, out: str, *steps: str) -> None:
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    results, errors, trouble = [], [], []
    Path(out).mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)[:300]))
        # what a failed look's message shows (not asserted: a missing favicon is a 404 too)
        page.on("requestfailed", lambda r: trouble.append(f"failed {r.url[:160]} {r.failure}"))
        page.on("response", lambda r: trouble.append(f"{r.status} {r.url[:160]}")
                if r.status >= 400 else None)
        page.on("console", lambda m: trouble.append(f"console {m.text[:200]}")
                if m.type == "error" else None)
        page.goto(f"{viewer}/viewer?StudyInstanceUIDs={study}")
        page.wait_for_selector("[data-viewportid] canvas", timeout=120_000)
        _settle(page, at_least=2.0)
        if page.get_by_text("Skip all").count():  # the first-visit tour
            page.get_by_text("Skip all").click()
        for number, step in enumerate(steps):
            if step.startswith(("series:", "series?:")):
                name = step.split(":", 1)[1]
                page.get_by_text(name, exact=True).first.dblclick()
                _settle(page, prompt=step.startswith("series?:"), at_least=2.0)
            elif step == "measurements":
                page.locator('[data-cy="trackedMeasurements-btn"]').click()
                _settle(page)
            else:
                _settle(page)
            step = step.replace("series?:", "series:")
            shot = Path(out) / f"{number}-{step.replace(':', '-').replace(' ', '_')}.png"
            page.screenshot(path=str(shot))
            pixels = _pixels(page.locator("[data-viewportid]").first.screenshot())
            results.append({"step": step, "screenshot": str(shot), **pixels,
                            "text": page.inner_text("body")})
        browser.close()
    (Path(out) / "trouble.txt").write_text("\n".join(trouble) + "\n")
    print(json.dumps({"steps": results, "errors": errors, "trouble": trouble}))


if __name__ == "__main__":
    {"serve": serve, "look": look}[sys.argv[1]](*sys.argv[2:])
