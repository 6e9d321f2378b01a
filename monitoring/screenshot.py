"""Takes the README's screenshot of Prometheus graphing the main serving metrics, from a
running stack: `make up MONITORING=1`, a served model (`make train`), then

    .venv/bin/python monitoring/screenshot.py [--minutes 5] [--out monitoring/prometheus-serving.png]

It sends one-image requests (and a few malformed ones, for a 4xx line) to the model endpoint
for the given minutes, so that the rates have something to show, then opens Prometheus's
graph page in headless Chromium (tests/integration/browser.py) and saves the screenshot.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import urllib.parse
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from browser import Browser, chromium_binary  # noqa: E402
from stack import read_env  # noqa: E402

# The panels (two fit the window): requests per second by answering version and status, and
# the p99 latency the alert rule watches.
PANELS = (
    "sum by (version, code) (rate(serving_requests_total[1m]))",
    "histogram_quantile(0.99, sum by (le) (rate(serving_request_duration_seconds_bucket[1m])))",
)


def drive(url: str, minutes: float) -> int:
    image = {"inputs": [[[[random.random() for _ in range(28)] for _ in range(28)]]]}
    sent, deadline = 0, time.monotonic() + minutes * 60
    with requests.Session() as session:
        while time.monotonic() < deadline:
            if sent % 50 == 49:
                session.post(url, data=b'{"inputs": [1, 2', headers={"content-type": "application/json"}, timeout=30)
            else:
                session.post(url, json=image, timeout=30)
            sent += 1
            time.sleep(random.uniform(0.0, 0.05))  # an uneven client, so the graph is not flat
    return sent


def graph_url(port: str, range_minutes: int) -> str:
    query = {}
    for i, expr in enumerate(PANELS):
        query.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": f"{range_minutes}m"})
    return f"http://127.0.0.1:{port}/classic/graph?{urllib.parse.urlencode(query)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to send requests first")
    parser.add_argument("--out", type=Path, default=ROOT / "monitoring" / "prometheus-serving.png")
    parser.add_argument("--env-file", type=Path, default=ROOT / ".env")
    args = parser.parse_args()
    env = read_env(args.env_file)
    endpoint = f"http://127.0.0.1:{env.get('SERVING_PORT', '5001')}/invocations"
    print(f"sending requests to {endpoint} for {args.minutes} minutes", file=sys.stderr)
    print(f"{drive(endpoint, args.minutes)} requests sent", file=sys.stderr)
    time.sleep(20)  # one more scrape (every 15 s) after the last request
    browser = Browser(chromium_binary(), None)
    try:
        browser.open(graph_url(env.get("PROMETHEUS_PORT", "9090"), max(5, round(args.minutes * 2))))
        browser.wait_for_text("serving_requests_total", "Load time")
        time.sleep(5)  # the graphs draw after their data arrives
        browser.evaluate("window.scrollTo(0, 0)")  # the page scrolls to the last panel it drew
        browser.screenshot(args.out)
    finally:
        browser.close()
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
