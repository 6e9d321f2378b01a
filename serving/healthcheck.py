"""Container healthcheck: `python -m serving.healthcheck [--serving]`.

Exit 0 when the local server answers /ping (it does while waiting for the alias and while
serving), 1 otherwise. With --serving, exit 0 only once a version is served: the readiness
to wait for before stopping the container this one replaces. Standard library only: the
image may have no curl, and this runs every few seconds.
"""

import argparse
import json
import os
import sys
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.healthcheck")
    parser.add_argument("--serving", action="store_true", help="healthy only once a model version is served")
    args = parser.parse_args(argv)
    port = os.environ.get("SERVING_CONTAINER_PORT", "").strip() or "8080"
    url = f"http://127.0.0.1:{port}/ping"
    # No proxies: HTTP_PROXY set for the container must not capture a loopback call.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as r:
            ok = r.status == 200
            state = json.loads(r.read()).get("state") if args.serving else None
    except Exception as e:  # refused, timeout, HTTP error, not JSON: all mean unhealthy
        print(f"serving healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    if args.serving and state != "serving":
        print(f"serving healthcheck: {url}: state {state!r}, not serving yet", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
