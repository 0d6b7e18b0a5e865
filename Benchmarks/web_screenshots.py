"""Screenshots of ``textseg web`` before and after segmenting the demo case, and the time it takes.

Starts ``textseg web`` on a free port of 127.0.0.1, opens it in headless Chromium (Debian's ``chromium``;
``$CHROMIUM`` names another), opens the demo case (the one ``textseg demo`` segments), writes ``web-before.png``,
presses Segment for its first structure and measures the time until the segment is in the list and until the
slice views show it, writes ``web-after.png``, then segments its second structure with the worker warm (model
loaded) and measures again::

    python Benchmarks/web_screenshots.py [--output Docs]

The first run includes loading the model in the worker process (which the page starts when it starts).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PANEL_WIDTH = 400


def views(page) -> np.ndarray:
    """The views' pixels (right of the panel)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))[:, PANEL_WIDTH:]


def segment(page, prompt: str, rows: int) -> tuple[float, float, float]:
    """Press Segment for ``prompt``; seconds until row ``rows + 1`` is listed, until the views change, and the
    worker's own time for the run (as the page reports it)."""
    page.fill("#textseg-prompt", prompt)
    time.sleep(1.0)
    before = views(page)
    started = time.monotonic()
    page.click("#textseg-segment")
    page.wait_for_function(f"document.querySelectorAll('.textseg-segment').length > {rows}")
    listed = time.monotonic() - started
    while np.array_equal(views(page), before):
        time.sleep(0.05)
    shown = time.monotonic() - started
    page.wait_for_selector("#textseg-message:has-text(' s on ')")
    run = float(re.search(r"in ([0-9.]+) s on", page.inner_text("#textseg-message")).group(1))
    return listed, shown, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "Docs"), help="folder for the PNGs (default: Docs)")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    from TextSegLib.evaluation.demo import DEFAULT_CASE, demo_case

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen([sys.executable, "-m", "TextSegLib", "web", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=environment, text=True)
    try:
        url = None
        for line in server.stdout:
            found = re.search(r"TextSeg web: (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        if url is None:
            print("textseg web did not start", file=sys.stderr)
            return 1
        chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=[
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.click("#textseg-demo")
            page.wait_for_function("document.querySelector('#textseg-volume').textContent.includes('voxels')")
            time.sleep(3.0)
            page.screenshot(path=str(output / "web-before.png"))
            case = demo_case(DEFAULT_CASE)
            first = segment(page, case["targets"][0]["prompt"], 0)
            time.sleep(3.0)
            page.screenshot(path=str(output / "web-after.png"))
            second = segment(page, case["targets"][1]["prompt"], 1)
            browser.close()
        load = os.getloadavg()[0]
        for label, (listed, shown, run) in (("first prompt (model loading included)", first),
                                            ("second prompt", second)):
            print(f"{label}: Segment pressed -> segment listed {listed:.1f} s, shown in the views {shown:.1f} s; "
                  f"the worker's run {run:.1f} s")
        print(f"({os.cpu_count()} CPU cores, load average {load:.1f}); screenshots in {output}")
        return 0
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
