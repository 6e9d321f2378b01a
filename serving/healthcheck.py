"""Container healthcheck: `python -m serving.healthcheck`.

Exit 0 when the local server answers /ping (it does while waiting for the alias and while
serving), 1 otherwise. Standard library only: the image may have no curl, and this runs
every few seconds.
"""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("SERVING_CONTAINER_PORT", "").strip() or "8080"
    url = f"http://127.0.0.1:{port}/ping"
    # No proxies: HTTP_PROXY set for the container must not capture a loopback call.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as r:
            ok = r.status == 200
    except Exception as e:  # refused, timeout, HTTP error: all mean unhealthy
        print(f"serving healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
