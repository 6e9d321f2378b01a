"""Container healthcheck: a real API call through host validation.

/health skips the Host-header check and the database, so it can pass while every real client
fails; this asks for an experiment list under the service name other containers use. With
basic auth it logs in as the admin and expects the list. With single sign-on (AUTH_MODE=oidc)
there is no password to log in with: the plugin's refusal, a 401, is the healthy answer.
mlflow-init waits for the server with the same check (provision_users.py).
"""

from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request


def problem(base_url: str, host: str) -> str | None:
    """Why the server at base_url is not serving its API yet, or None when it is."""
    single_sign_on = os.environ.get("AUTH_MODE", "basic") == "oidc"
    headers = {"Host": host}
    if not single_sign_on:
        credentials = f"{os.environ['MLFLOW_ADMIN_USERNAME']}:{os.environ['MLFLOW_ADMIN_PASSWORD']}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
    request = urllib.request.Request(f"{base_url}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return None if response.status == 200 and not single_sign_on else f"answered {response.status}"
    except urllib.error.HTTPError as error:
        return None if single_sign_on and error.code == 401 else str(error)
    except Exception as error:  # any other failure is simply "not healthy yet"
        return str(error) or type(error).__name__


def main() -> None:
    port = os.environ.get("MLFLOW_CONTAINER_PORT", "5000")
    why = problem(f"http://127.0.0.1:{port}", host=f"mlflow:{port}")
    if why is not None:
        print(f"unhealthy: {why}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
