"""Container healthcheck: a real, authenticated API call through host validation.

/health skips the Host-header check and the database, so it can pass while every real client
fails; this asks for an experiment list under the service name other containers use.
"""

import base64
import os
import sys
import urllib.request

port = os.environ.get("MLFLOW_CONTAINER_PORT", "5000")
credentials = f"{os.environ['MLFLOW_ADMIN_USERNAME']}:{os.environ['MLFLOW_ADMIN_PASSWORD']}"
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
    headers={
        "Host": f"mlflow:{port}",
        "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
    },
)
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as error:  # any failure is simply "not healthy yet"
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
