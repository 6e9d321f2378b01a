"""Container healthcheck: a real API call through host validation.

/health skips the Host-header check and the database, so it can pass while every real client
fails; this asks for an experiment list under the service name other containers use. With
basic auth it logs in as the admin and expects the list. With single sign-on (AUTH_MODE=oidc)
there is no password to log in with: the plugin's refusal, a 401, is the healthy answer.
"""

import base64
import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("MLFLOW_CONTAINER_PORT", "5000")
single_sign_on = os.environ.get("AUTH_MODE", "basic") == "oidc"
headers = {"Host": f"mlflow:{port}"}
if not single_sign_on:
    credentials = f"{os.environ['MLFLOW_ADMIN_USERNAME']}:{os.environ['MLFLOW_ADMIN_PASSWORD']}"
    headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers=headers)
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        sys.exit(0 if response.status == 200 and not single_sign_on else 1)
except urllib.error.HTTPError as error:
    if single_sign_on and error.code == 401:
        sys.exit(0)
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
except Exception as error:  # any other failure is simply "not healthy yet"
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
